//! Writing outputs without ever damaging a user's files.
//!
//! One policy for every command ([`Outputs`]):
//!
//! - an output replaces only a regular file or nothing: a folder, a device, a pipe, a socket or
//!   a symbolic link at the output path is refused (links are never followed for writing — give
//!   the target's real path);
//! - an output is never a file the same command reads, nor inside a folder it reads, nor a
//!   folder that holds one of its inputs;
//! - every output location is checked for writability *before* any heavy work starts;
//! - files are written atomically: a temp file with a short name (`.tsr-<pid>-<n>.tmp`, so a
//!   255-byte target name still fits) in the target folder, fsync, rename; the temp file is
//!   removed on error, and temp files left by a killed run are swept at the next write there;
//! - an output *folder* is built in a hidden staging folder beside it and swapped in as a whole
//!   when the command succeeds ([`OutDir`]); a non-empty folder is replaced only when the user
//!   asked for it (`--overwrite`), never mixed with a previous run's files.

use crate::{Error, Result};
use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Prefix of every temp file and staging folder Tessera creates.
pub const TMP_PREFIX: &str = ".tsr-";

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh temp name in `dir` (`.tsr-<pid>-<n>.<ext>`).
fn temp_name(dir: &Path, ext: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!("{TMP_PREFIX}{}-{n}.{ext}", std::process::id()))
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// What kind of thing sits at `path`, for messages (`None`: nothing).
fn what_is(path: &Path) -> Option<&'static str> {
    let m = std::fs::symlink_metadata(path).ok()?;
    let ft = m.file_type();
    Some(if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_dir() {
        "a folder"
    } else if ft.is_file() {
        "a regular file"
    } else {
        #[cfg(unix)]
        {
            use std::os::unix::fs::FileTypeExt;
            if ft.is_block_device() || ft.is_char_device() {
                return Some("a device");
            }
            if ft.is_fifo() {
                return Some("a named pipe");
            }
            if ft.is_socket() {
                return Some("a socket");
            }
        }
        "not a regular file"
    })
}

/// Refuse to replace anything but a regular file (or nothing) at `path`.
fn check_replaceable_file(path: &Path) -> Result<()> {
    match what_is(path) {
        None | Some("a regular file") => Ok(()),
        Some("a symbolic link") => Err(Error::bad_input(
            path,
            "is a symbolic link; Tessera does not write through links (give the path of the \
             file it points to, or another name)",
        )),
        Some(kind) => Err(Error::bad_input(
            path,
            format!("is {kind}, not a regular file; refusing to replace it with an output"),
        )),
    }
}

/// Write `bytes` to `path` atomically (temp file + rename in the same folder).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// Write to `path` atomically with a writer callback.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> Result<()> {
    replace_atomic(path, |tmp| {
        let mut f = std::fs::File::create(tmp)?;
        fill(&mut f)?;
        f.sync_all()
    })
}

/// Let `make` write a temp file next to `path` (given its path), then rename it over `path`.
/// For writers that insist on opening the file themselves. Refuses to replace anything that is
/// not a regular file; the temp file is removed when anything fails.
pub fn replace_atomic(path: &Path, make: impl FnOnce(&Path) -> std::io::Result<()>) -> Result<()> {
    if path.file_name().is_none() {
        return Err(Error::bad_input(path, "not a file path"));
    }
    check_replaceable_file(path)?;
    let dir = parent_dir(path);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    sweep_stale_once(&dir);
    let tmp = temp_name(&dir, "tmp");
    if let Err(e) = make(&tmp).and_then(|()| readable_by_all(&tmp)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    // Checked again just before the rename: something may have appeared meanwhile.
    if let Err(e) = check_replaceable_file(path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Temp files may be created private (0600); artifacts are ordinary files (0644).
#[cfg(unix)]
fn readable_by_all(p: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644))
}

#[cfg(not(unix))]
fn readable_by_all(_: &Path) -> std::io::Result<()> {
    Ok(())
}

/// Whether the process that made a temp name (`.tsr-<pid>-…`) is gone. Unknown (no `/proc`)
/// counts as gone only for entries older than a day.
fn stale(name: &str, path: &Path) -> bool {
    let Some(pid) = name
        .strip_prefix(TMP_PREFIX)
        .and_then(|r| r.split('-').next())
        .and_then(|p| p.parse::<u32>().ok())
    else {
        return false;
    };
    if pid == std::process::id() {
        return false;
    }
    if Path::new("/proc/self").exists() {
        return !Path::new(&format!("/proc/{pid}")).exists();
    }
    std::fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age.as_secs() > 86_400)
}

/// Remove temp files and staging folders in `dir` left behind by Tessera runs that were
/// killed (their process no longer exists). Returns how many were removed.
pub fn sweep_stale(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with(TMP_PREFIX) {
            continue;
        }
        let p = e.path();
        if !stale(&name, &p) {
            continue;
        }
        let ok = match e.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&p).is_ok(),
            Ok(_) => std::fs::remove_file(&p).is_ok(),
            Err(_) => false,
        };
        n += ok as usize;
    }
    n
}

/// [`sweep_stale`] once per folder per process (a run writing thousands of files into one
/// folder lists it once).
fn sweep_stale_once(dir: &Path) {
    use std::collections::HashSet;
    use std::sync::{Mutex, OnceLock};
    static SWEPT: OnceLock<Mutex<HashSet<PathBuf>>> = OnceLock::new();
    let key = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let first = SWEPT
        .get_or_init(Default::default)
        .lock()
        .map(|mut s| s.insert(key))
        .unwrap_or(false);
    if first {
        sweep_stale(dir);
    }
}

/// `path` made absolute and resolved as far as it exists: the longest existing prefix is
/// canonicalised (links resolved), the rest appended. Also returns that existing prefix.
fn resolve(path: &Path) -> Result<(PathBuf, PathBuf)> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| Error::io(".", e))?
            .join(path)
    };
    // Lexically drop `.` and resolve `..` against what came before.
    let mut clean = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                clean.pop();
            }
            other => clean.push(other),
        }
    }
    let mut existing = clean.clone();
    let mut rest = Vec::new();
    loop {
        if let Ok(c) = existing.canonicalize() {
            let mut out = c.clone();
            for r in rest.iter().rev() {
                out.push(r);
            }
            return Ok((out, c));
        }
        match (
            existing.file_name().map(|n| n.to_owned()),
            existing.parent(),
        ) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => return Ok((clean, PathBuf::from("/"))),
        }
    }
}

/// Check that files can be created in `dir` (or, when it does not exist yet, in its nearest
/// existing ancestor) by creating and removing a probe file.
fn probe_writable(dir_existing: &Path, shown: &Path) -> Result<()> {
    if !dir_existing.is_dir() {
        return Err(Error::bad_input(
            shown,
            format!(
                "cannot be created: {} is a file, not a folder",
                dir_existing.display()
            ),
        ));
    }
    let probe = temp_name(dir_existing, "probe");
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(Error::bad_input(
            shown,
            format!(
                "cannot be written: {} ({})",
                crate::error::describe_io(&e),
                dir_existing.display()
            ),
        )),
    }
}

#[derive(Debug, Clone)]
struct Input {
    /// Resolved path.
    path: PathBuf,
    /// The path as the user gave it, for messages.
    shown: PathBuf,
    dir: bool,
    /// (device, inode) when it exists: catches hard links and other spellings.
    id: Option<(u64, u64)>,
    role: String,
}

#[cfg(unix)]
fn file_id(p: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn file_id(_: &Path) -> Option<(u64, u64)> {
    None
}

/// The inputs of one command and the checks its outputs must pass before any work starts.
///
/// ```
/// use tessera_core::io::Outputs;
/// let dir = std::env::temp_dir().join(format!("tessera-doc-outputs-{}", std::process::id()));
/// std::fs::create_dir_all(dir.join("data")).unwrap();
/// let mut o = Outputs::default();
/// o.reads(&dir.join("data"), "--data");
/// assert!(o.check_file(&dir.join("model.safetensors"), "--out").is_ok());
/// assert!(o.check_file(&dir.join("data/model.safetensors"), "--out").is_err());
/// std::fs::remove_dir_all(&dir).unwrap();
/// ```
#[derive(Debug, Clone, Default)]
pub struct Outputs {
    inputs: Vec<Input>,
}

impl Outputs {
    /// Record a file or folder the command reads (`role` names it in messages, e.g.
    /// `"--weights"`). Paths that do not exist are recorded too (the command will fail on them
    /// itself, with its own message).
    pub fn reads(&mut self, path: &Path, role: &str) -> &mut Self {
        if let Ok((resolved, _)) = resolve(path) {
            self.inputs.push(Input {
                dir: resolved.is_dir(),
                id: file_id(&resolved),
                path: resolved,
                shown: path.to_path_buf(),
                role: role.to_string(),
            });
        }
        self
    }

    /// The first input that `out` (resolved) would hit: equal to an input file, inside an input
    /// folder, or a folder holding an input.
    fn clash(&self, out: &Path, out_id: Option<(u64, u64)>, out_is_dir: bool) -> Option<String> {
        for i in &self.inputs {
            let same = out == i.path || (out_id.is_some() && out_id == i.id);
            if same {
                return Some(format!(
                    "is also an input of this command ({} {}); refusing to overwrite it",
                    i.role,
                    i.shown.display()
                ));
            }
            if i.dir && out.starts_with(&i.path) {
                return Some(format!(
                    "is inside the input folder {} ({}); outputs never go into an input folder",
                    i.shown.display(),
                    i.role
                ));
            }
            if out_is_dir && i.path.starts_with(out) {
                return Some(format!(
                    "holds the input {} ({}); replacing it would delete that input",
                    i.shown.display(),
                    i.role
                ));
            }
        }
        None
    }

    /// Check an output file before any work: a regular file or nothing at the path, not an
    /// input, not inside an input folder, and its folder writable. `role` names the option.
    pub fn check_file(&self, out: &Path, role: &str) -> Result<()> {
        let name = out
            .file_name()
            .ok_or_else(|| Error::bad_input(out, format!("{role}: not a file path")))?;
        if name.len() > 255 {
            return Err(Error::bad_input(
                out,
                format!("{role}: the file name is longer than 255 bytes"),
            ));
        }
        check_replaceable_file(out)?;
        let (resolved, existing) = resolve(out)?;
        if let Some(why) = self.clash(&resolved, file_id(out), false) {
            return Err(Error::bad_input(out, format!("{role}: {why}")));
        }
        let dir = if existing == resolved {
            resolved.parent().map(Path::to_path_buf).unwrap_or(existing)
        } else {
            existing
        };
        sweep_stale_once(&dir);
        probe_writable(&dir, out)
    }

    /// Check an output folder before any work and prepare its staging folder: nothing, or a
    /// folder (empty, or non-empty with `overwrite`) at the path; not an input, not inside an
    /// input folder, not holding an input; its parent writable.
    pub fn check_dir(&self, out: &Path, role: &str, overwrite: bool) -> Result<OutDir> {
        match what_is(out) {
            None | Some("a folder") => {}
            Some("a symbolic link") => {
                return Err(Error::bad_input(
                    out,
                    format!(
                        "{role}: is a symbolic link; Tessera does not write through links (give \
                         the real folder)"
                    ),
                ))
            }
            Some(kind) => {
                return Err(Error::bad_input(
                    out,
                    format!("{role}: is {kind}, not a folder"),
                ))
            }
        }
        let (resolved, existing) = resolve(out)?;
        if let Some(why) = self.clash(&resolved, file_id(out), true) {
            return Err(Error::bad_input(out, format!("{role}: {why}")));
        }
        let non_empty = std::fs::read_dir(out)
            .map(|mut r| r.next().is_some())
            .unwrap_or(false);
        if non_empty && !overwrite {
            return Err(Error::bad_input(
                out,
                format!(
                    "{role}: the folder is not empty; pass --overwrite to replace it as a whole \
                     (its old contents are removed when the run succeeds), or choose a new folder"
                ),
            ));
        }
        let parent = if existing == resolved {
            resolved.parent().map(Path::to_path_buf).unwrap_or(existing)
        } else {
            existing
        };
        sweep_stale_once(&parent);
        probe_writable(&parent, out)?;
        Ok(OutDir {
            target: out.to_path_buf(),
            staging: None,
        })
    }
}

/// An output folder under construction: files go into a hidden staging folder beside the
/// target; [`OutDir::commit`] swaps it in as a whole. Dropped without commit, the staging
/// folder is removed and the target left as it was.
#[derive(Debug)]
pub struct OutDir {
    target: PathBuf,
    staging: Option<PathBuf>,
}

impl OutDir {
    /// The folder files are written into now (created on first use).
    pub fn path(&mut self) -> Result<&Path> {
        if self.staging.is_none() {
            let parent = parent_dir(&self.target);
            std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
            let s = temp_name(&parent, "dir");
            std::fs::create_dir(&s).map_err(|e| Error::io(&s, e))?;
            self.staging = Some(s);
        }
        Ok(self.staging.as_deref().expect("just set"))
    }

    /// The final folder.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Where `rel` (relative to the folder) ends up once committed.
    pub fn final_path(&self, rel: &Path) -> PathBuf {
        self.target.join(rel)
    }

    /// Move the staging folder into place, replacing the target folder as a whole.
    pub fn commit(mut self) -> Result<PathBuf> {
        let staging = match self.staging.take() {
            Some(s) => s,
            None => {
                // Nothing was written: the result is an empty folder.
                let mut s = OutDir {
                    target: self.target.clone(),
                    staging: None,
                };
                let p = s.path()?.to_path_buf();
                s.staging = None;
                p
            }
        };
        let target = self.target.clone();
        let old = if what_is(&target) == Some("a folder") {
            let old = temp_name(&parent_dir(&target), "old");
            std::fs::rename(&target, &old).map_err(|e| {
                let _ = std::fs::remove_dir_all(&staging);
                Error::io(&target, e)
            })?;
            Some(old)
        } else {
            None
        };
        if let Err(e) = std::fs::rename(&staging, &target) {
            // Put the old folder back.
            if let Some(o) = &old {
                let _ = std::fs::rename(o, &target);
            }
            let _ = std::fs::remove_dir_all(&staging);
            return Err(Error::io(&target, e));
        }
        if let Some(o) = old {
            let _ = std::fs::remove_dir_all(&o);
        }
        Ok(target)
    }
}

impl Drop for OutDir {
    fn drop(&mut self) {
        if let Some(s) = self.staging.take() {
            let _ = std::fs::remove_dir_all(s);
        }
    }
}

/// Write named tensors and string metadata as one `.safetensors` file, atomically.
pub fn save_safetensors(
    path: &Path,
    tensors: &[(String, candle_core::Tensor)],
    metadata: std::collections::HashMap<String, String>,
) -> Result<()> {
    let items: Vec<(&str, &candle_core::Tensor)> =
        tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    crate::st::write(path, &items, metadata, None).map(|_| ())
}

/// The string metadata of a `.safetensors` file's header (empty when it has none).
pub fn safetensors_metadata(path: &Path) -> Result<std::collections::HashMap<String, String>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| Error::bad_input(path, "not a safetensors file (too short)"))?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 {
        return Err(Error::bad_input(
            path,
            "not a safetensors file (header too large)",
        ));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .map_err(|_| Error::bad_input(path, "not a safetensors file (truncated header)"))?;
    let v: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| Error::bad_input(path, format!("not a safetensors file ({e})")))?;
    Ok(v.get("__metadata__")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                .collect()
        })
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tessera-io-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn writes_and_replaces() {
        let dir = tmp("w");
        let p = dir.join("a.txt");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(TMP_PREFIX))
            .collect();
        assert!(leftovers.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn never_replaces_links_folders_or_devices() {
        let dir = tmp("l");
        let target = dir.join("real.txt");
        std::fs::write(&target, b"keep").unwrap();
        #[cfg(unix)]
        {
            let link = dir.join("link.txt");
            std::os::unix::fs::symlink(&target, &link).unwrap();
            let e = write_atomic(&link, b"x").unwrap_err().to_string();
            assert!(e.contains("symbolic link"), "{e}");
            assert!(std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink());
            let e = write_atomic(Path::new("/dev/null"), b"x")
                .unwrap_err()
                .to_string();
            assert!(e.contains("a device"), "{e}");
        }
        let sub = dir.join("sub");
        std::fs::create_dir(&sub).unwrap();
        let e = write_atomic(&sub, b"x").unwrap_err().to_string();
        assert!(e.contains("a folder"), "{e}");
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn long_names_fit_and_stale_temps_are_swept() {
        let dir = tmp("n");
        let long = "x".repeat(251) + ".png";
        write_atomic(&dir.join(&long), b"ok").unwrap();
        assert_eq!(std::fs::read(dir.join(&long)).unwrap(), b"ok");
        // A temp file of a process that no longer exists (pid 1 << 30 is never live).
        let stale = dir.join(format!("{TMP_PREFIX}{}-0.tmp", 1u32 << 30));
        std::fs::write(&stale, b"partial").unwrap();
        let live = dir.join(format!("{TMP_PREFIX}{}-99.tmp", std::process::id()));
        std::fs::write(&live, b"mine").unwrap();
        assert_eq!(sweep_stale(&dir), 1);
        assert!(!stale.exists() && live.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn outputs_never_hit_inputs() {
        let dir = tmp("o");
        let data = dir.join("data");
        std::fs::create_dir_all(data.join("train")).unwrap();
        let weights = dir.join("w.safetensors");
        std::fs::write(&weights, b"w").unwrap();
        let mut o = Outputs::default();
        o.reads(&data, "--data").reads(&weights, "--weights");
        let e = o.check_file(&weights, "--out").unwrap_err().to_string();
        assert!(
            e.contains("also an input") && e.contains("--weights"),
            "{e}"
        );
        // Another spelling of the same file.
        let other = dir.join("data/../w.safetensors");
        assert!(o.check_file(&other, "--out").is_err());
        let e = o
            .check_file(&data.join("train/m.safetensors"), "--out")
            .unwrap_err()
            .to_string();
        assert!(e.contains("inside the input folder"), "{e}");
        let e = o.check_dir(&dir, "--out", true).unwrap_err().to_string();
        assert!(e.contains("holds the input"), "{e}");
        assert!(o
            .check_file(&dir.join("new/m.safetensors"), "--out")
            .is_ok());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let ro = dir.join("ro");
            std::fs::create_dir(&ro).unwrap();
            std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
            // Root ignores permission bits; only check where they bite.
            let probe = ro.join("p");
            let bites = std::fs::write(&probe, b"").is_err();
            let _ = std::fs::remove_file(&probe);
            if bites {
                let e = o
                    .check_file(&ro.join("m.safetensors"), "--out")
                    .unwrap_err()
                    .to_string();
                assert!(e.contains("cannot be written"), "{e}");
            }
            std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn out_dirs_are_replaced_whole_or_not_at_all() {
        let dir = tmp("d");
        let out = dir.join("pred");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("old.png"), b"old").unwrap();
        let o = Outputs::default();
        let e = o.check_dir(&out, "--out", false).unwrap_err().to_string();
        assert!(e.contains("not empty") && e.contains("--overwrite"), "{e}");
        // A failed run (dropped without commit) leaves the old folder as it was.
        {
            let mut d = o.check_dir(&out, "--out", true).unwrap();
            std::fs::write(d.path().unwrap().join("new.png"), b"new").unwrap();
        }
        assert!(out.join("old.png").exists() && !out.join("new.png").exists());
        let mut d = o.check_dir(&out, "--out", true).unwrap();
        std::fs::write(d.path().unwrap().join("new.png"), b"new").unwrap();
        d.commit().unwrap();
        assert!(!out.join("old.png").exists() && out.join("new.png").exists());
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["pred".to_string()], "no staging leftovers");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! Atomic file writes: a temp file in the same directory, fsync, then rename, so a crash or a
//! full disk never leaves a half-written model, report or heatmap behind.

use crate::{Error, Result};
use std::io::Write;
use std::path::Path;

/// Write `bytes` to `path` atomically (temp file + rename in the same directory).
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
/// For writers that insist on opening the file themselves.
pub fn replace_atomic(path: &Path, make: impl FnOnce(&Path) -> std::io::Result<()>) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let name = path
        .file_name()
        .ok_or_else(|| Error::bad_input(path, "not a file path"))?
        .to_string_lossy()
        .into_owned();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    if let Err(e) = make(&tmp).and_then(|()| readable_by_all(&tmp)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
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

/// Write named tensors and string metadata as one `.safetensors` file, atomically.
pub fn save_safetensors(
    path: &Path,
    tensors: &[(String, candle_core::Tensor)],
    metadata: std::collections::HashMap<String, String>,
) -> Result<()> {
    let mut items: Vec<&(String, candle_core::Tensor)> = tensors.iter().collect();
    items.sort_by(|a, b| a.0.cmp(&b.0));
    replace_atomic(path, |tmp| {
        safetensors::serialize_to_file(
            items.iter().map(|(k, v)| (k.as_str(), v)),
            Some(metadata),
            tmp,
        )
        .map_err(std::io::Error::other)
    })
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

    #[test]
    fn writes_and_replaces() {
        let dir = std::env::temp_dir().join(format!("tessera-io-{}", std::process::id()));
        let p = dir.join("a.txt");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

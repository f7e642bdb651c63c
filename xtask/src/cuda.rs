//! `cargo xtask cuda-build`: build `tessera` with candle's CUDA kernels on a machine without a
//! GPU, with NVIDIA's CUDA 13.0 toolkit from pinned PyPI wheels (the recipe verified in
//! `../shared/design/cuda-build.md`; Debian's CUDA 11.8 cannot build `sm_90a` for H100/H200).
//!
//! Idempotent: the toolkit is set up once in a cache folder (a marker file records the pinned
//! versions) and reused; the build goes to its own target folder (`target/cuda`) so it never
//! invalidates the CPU build.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// NVIDIA wheels, pinned so that nvcc, nvvm and crt stay at 13.0 (pip otherwise pulls 13.5
/// nvvm/crt, whose output driver 580 may refuse).
const WHEELS: &[&str] = &[
    "nvidia-cuda-nvcc==13.0.88",
    "nvidia-nvvm==13.0.88",
    "nvidia-cuda-crt==13.0.88",
    "nvidia-cuda-runtime==13.0.96",
    "nvidia-cuda-cccl==13.0.85",
    "nvidia-cuda-nvrtc==13.0.88",
    "nvidia-cublas==13.0.2.14",
    "nvidia-curand==10.4.0.35",
];

/// Unversioned names the linker needs, and the soname each points to.
const LINKS: &[(&str, &str)] = &[
    ("libcudart.so", "libcudart.so.13"),
    ("libcublas.so", "libcublas.so.13"),
    ("libcublasLt.so", "libcublasLt.so.13"),
    ("libnvrtc.so", "libnvrtc.so.13"),
    ("libcurand.so", "libcurand.so.10"),
];

pub const USAGE: &str = "  cuda-build [--cache DIR] [--compute-cap 90] [--setup-only]
        Build target/cuda/release/tessera with --features cuda: sets up the CUDA 13.0 toolkit
        from pinned PyPI wheels in DIR (default ~/.cache/tessera-cuda, ~740 MB, reused), the
        link-time libcuda.so from Debian's libcuda1 package (extracted, not installed), then
        builds (~11 min on 2 cores). Prints the binary's path and how to run it on a GPU machine.";

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let st = cmd
        .status()
        .with_context(|| format!("{what}: cannot start {cmd:?}"))?;
    if !st.success() {
        bail!("{what} failed ({st}): {cmd:?}");
    }
    Ok(())
}

fn default_cache() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(x).join("tessera-cuda");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".cache/tessera-cuda")
}

/// `<venv>/lib/python3.*/site-packages/nvidia/cu13`, if the wheels are installed.
fn find_cu13(venv: &Path) -> Option<PathBuf> {
    let lib = venv.join("lib");
    std::fs::read_dir(&lib)
        .ok()?
        .flatten()
        .map(|e| e.path().join("site-packages/nvidia/cu13"))
        .find(|p| p.join("bin/nvcc").is_file())
}

fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() && !p.is_symlink() {
            if let Some(f) = find_file(&p, name) {
                return Some(f);
            }
        } else if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
    }
    None
}

fn symlink(target: &Path, link: &Path) -> Result<()> {
    if link.symlink_metadata().is_ok() {
        std::fs::remove_file(link).with_context(|| format!("replacing {}", link.display()))?;
    }
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("linking {} → {}", link.display(), target.display()))
}

/// Set up (or reuse) the toolkit; returns the `cu13` folder.
fn setup(cache: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
    let venv = cache.join("venv");
    let marker = cache.join("toolkit.ok");
    let want = WHEELS.join("\n");
    let ready = std::fs::read_to_string(&marker).is_ok_and(|m| m == want);
    if !ready {
        if !venv.join("bin/pip").is_file() {
            eprintln!("cuda-build: creating a Python venv in {}", venv.display());
            run(
                Command::new("python3").args(["-m", "venv"]).arg(&venv),
                "python3 -m venv (is python3 with the venv module installed?)",
            )?;
        }
        eprintln!("cuda-build: installing the CUDA 13.0 wheels (~740 MB download, once)");
        run(
            Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet", "--disable-pip-version-check"])
                .args(WHEELS),
            "pip install of the pinned CUDA wheels (PyPI must be reachable)",
        )?;
    }
    let cu13 = find_cu13(&venv).with_context(|| {
        format!(
            "the wheels are installed but {}/lib/python3.*/site-packages/nvidia/cu13/bin/nvcc \
             is missing; delete {} and rerun",
            venv.display(),
            cache.display()
        )
    })?;
    let lib = cu13.join("lib");
    for (link, target) in LINKS {
        if !lib.join(target).exists() {
            bail!(
                "{} is missing from the CUDA wheels",
                lib.join(target).display()
            );
        }
        symlink(Path::new(target), &lib.join(link))?;
    }
    // libcuda.so is the driver's: needed at link time only. Take it from Debian's package
    // without installing it (installing would shadow a real driver).
    let libcuda = lib.join("libcuda.so");
    if !libcuda.exists() {
        let debs = cache.join("deb");
        std::fs::create_dir_all(&debs)?;
        let have_deb = std::fs::read_dir(&debs)?
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("libcuda1_"));
        if !have_deb {
            eprintln!("cuda-build: downloading Debian's libcuda1 (link-time libcuda.so)");
            // A private apt configuration (lists in the cache, `non-free` enabled): the
            // system's sources and state stay untouched, and most images carry only `main`.
            let apt = cache.join("apt");
            for d in ["lists/partial", "cache/archives/partial", "empty"] {
                std::fs::create_dir_all(apt.join(d))?;
            }
            let codename = std::fs::read_to_string("/etc/os-release")
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("VERSION_CODENAME=").map(str::to_string))
                })
                .unwrap_or_else(|| "bookworm".into());
            std::fs::write(
                apt.join("sources.list"),
                format!(
                    "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
                     http://deb.debian.org/debian {codename} non-free\n"
                ),
            )?;
            let opts = [
                format!(
                    "Dir::Etc::SourceList={}",
                    apt.join("sources.list").display()
                ),
                format!("Dir::Etc::SourceParts={}", apt.join("empty").display()),
                format!("Dir::State::Lists={}", apt.join("lists").display()),
                format!("Dir::Cache={}", apt.join("cache").display()),
                "APT::Sandbox::User=root".to_string(),
            ];
            let apt_get = |sub: &[&str]| {
                let mut c = Command::new("apt-get");
                for o in &opts {
                    c.arg("-o").arg(o);
                }
                c.args(["-q", "-q"]).args(sub).current_dir(&debs);
                c
            };
            run(
                &mut apt_get(&["update"]),
                "apt-get update (private lists, deb.debian.org must be reachable)",
            )?;
            run(
                &mut apt_get(&["download", "libcuda1"]),
                "apt-get download libcuda1",
            )?;
        }
        let deb = std::fs::read_dir(&debs)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("libcuda1_"))
            })
            .context("libcuda1 .deb not found after download")?;
        let root = cache.join("libcuda-root");
        run(
            Command::new("dpkg").arg("-x").arg(&deb).arg(&root),
            "dpkg -x libcuda1",
        )?;
        let so = find_file(&root, "libcuda.so.1").context("libcuda.so.1 not in the package")?;
        symlink(&so, &libcuda)?;
    }
    // nvcc must be 13.0: newer nvvm output may be refused by driver 580.
    let out = Command::new(cu13.join("bin/nvcc"))
        .arg("--version")
        .output()
        .context("running nvcc --version")?;
    let v = String::from_utf8_lossy(&out.stdout);
    if !v.contains("release 13.0") {
        bail!("nvcc is not CUDA 13.0:\n{v}");
    }
    std::fs::write(&marker, want)?;
    Ok(cu13)
}

pub fn cuda_build(root: &Path, args: &[String]) -> Result<()> {
    let cache = crate::flag(args, "--cache")
        .map(PathBuf::from)
        .unwrap_or_else(default_cache);
    let cap = crate::flag(args, "--compute-cap").unwrap_or_else(|| "90".into());
    if cap.parse::<u32>().is_err() {
        bail!("--compute-cap must be a number such as 90 (H100/H200), got '{cap}'");
    }
    let cu13 = setup(&cache)?;
    eprintln!("cuda-build: toolkit ready at {}", cu13.display());
    if args.iter().any(|a| a == "--setup-only") {
        return Ok(());
    }
    let path = std::env::var("PATH").unwrap_or_default();
    let target = root.join("target/cuda");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // Library search at run time: a `cudalib/` folder beside the binary first (carry
    // libcudart there), then the usual CUDA locations; LD_LIBRARY_PATH overrides all.
    let rustflags =
        "-C link-arg=-Wl,-rpath,$ORIGIN/cudalib:/usr/local/cuda/lib64:/usr/lib/x86_64-linux-gnu";
    eprintln!("cuda-build: cargo build --release -p tessera-cli --features cuda (sm_{cap}; ~11 min on 2 cores the first time)");
    run(
        Command::new(cargo)
            .args([
                "build",
                "--release",
                "-p",
                "tessera-cli",
                "--features",
                "cuda",
            ])
            .arg("--target-dir")
            .arg(&target)
            .current_dir(root)
            .env("PATH", format!("{}:{path}", cu13.join("bin").display()))
            .env("CUDA_HOME", &cu13)
            .env("CUDA_PATH", &cu13)
            .env("CUDA_ROOT", &cu13)
            .env("CUDA_COMPUTE_CAP", &cap)
            .env("LIBRARY_PATH", cu13.join("lib"))
            .env("RUSTFLAGS", rustflags),
        "cargo build --features cuda",
    )?;
    let bin = target.join("release/tessera");
    if !bin.is_file() {
        bail!("the build succeeded but {} is missing", bin.display());
    }
    let size = std::fs::metadata(&bin).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "cuda-build: done ({:.1} MB). On a GPU machine, point LD_LIBRARY_PATH at the folder \
         holding libcublasLt.so.13 (`find / -name libcublasLt.so.13`), e.g.\n  \
         LD_LIBRARY_PATH=<that folder> ./tessera fit --device cuda ...",
        size as f64 / 1e6
    );
    println!("{}", bin.display());
    Ok(())
}

//! Hostile input: real files (an image in four formats, a mask, a dataset description, a
//! weights file, a model file) mutated at random — bytes flipped, runs overwritten, cut short,
//! junk appended, mostly in the headers where parsers decide how much to allocate — and fed to
//! the loaders. Every case must end in a typed error (or a clean load when the mutation was
//! harmless), never a panic, and the whole suite must stay within bounded memory.
//!
//! Cases per loader: `HOSTILE_CASES` (default 96; CI runs the default). Also a few crafted
//! cases: a decompression bomb, a safetensors header that promises terabytes.

use proptest::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tessera_backbone::{Arch, Backbone, WeightsSource};
use tessera_core::model::Preprocess;
use tessera_data::{generate_category, Dataset, SyntheticSpec};
use tessera_pipeline::{fit, Detector, FitOptions, Silent};

struct Fixture {
    _dir: tempfile::TempDir,
    /// name → original bytes
    files: Vec<(&'static str, PathBuf, Vec<u8>)>,
    scratch: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("ring");
        generate_category(
            &data,
            &SyntheticSpec {
                size: 64,
                train: 8,
                test_good: 1,
                test_defect: 1,
                seed: 1,
            },
        )
        .unwrap();
        let png = data.join("train/good/000.png");
        let img = image::open(&png).unwrap();
        let mut files = vec![("png", png.clone(), std::fs::read(&png).unwrap())];
        for (name, fmt) in [
            ("jpg", image::ImageFormat::Jpeg),
            ("bmp", image::ImageFormat::Bmp),
            ("tiff", image::ImageFormat::Tiff),
        ] {
            let p = dir.path().join(format!("img.{name}"));
            img.to_rgb8().save_with_format(&p, fmt).unwrap();
            files.push((name, p.clone(), std::fs::read(&p).unwrap()));
        }
        let mask = data.join("ground_truth/crack/000_mask.png");
        files.push(("mask", mask.clone(), std::fs::read(&mask).unwrap()));
        let spec = br#"{"normal_train": "train/good", "abnormal": ["test/crack"], "mask": "ground_truth", "normal_test_ratio": 0.25, "split_seed": 3, "category": "object"}"#;
        files.push(("spec", data.join("tessera-dataset.json"), spec.to_vec()));
        let weights = dir.path().join("w.safetensors");
        let t = tessera_backbone::random_weights(
            &Arch::ResNet18.spec(),
            3,
            0,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let items: Vec<(String, candle_core::Tensor)> = t.into_iter().collect();
        tessera_core::io::save_safetensors(&weights, &items, Default::default()).unwrap();
        files.push(("weights", weights.clone(), std::fs::read(&weights).unwrap()));
        let model = dir.path().join("m.safetensors");
        let o = FitOptions::random_backbone(&data, &model, Preprocess::square(64, 64), 0);
        fit(&o, &Silent).unwrap();
        files.push(("model", model.clone(), std::fs::read(&model).unwrap()));
        // The spec is written last: the fit above reads the MVTec layout.
        std::fs::write(data.join("tessera-dataset.json"), spec).unwrap();
        let scratch = dir.path().join("scratch");
        std::fs::create_dir_all(&scratch).unwrap();
        Fixture {
            _dir: dir,
            files,
            scratch,
        }
    })
}

fn original(name: &str) -> (&'static Path, &'static [u8]) {
    let f = fixture();
    let (_, p, b) = f.files.iter().find(|(n, _, _)| *n == name).unwrap();
    (p, b)
}

/// A mutation of a file's bytes.
#[derive(Debug, Clone)]
struct Mutation {
    /// (position as a fraction of the header region or the file, new byte)
    flips: Vec<(f64, bool, u8)>,
    /// Overwrite a run near the start with these bytes.
    run: Option<(f64, Vec<u8>)>,
    /// Cut the file to this fraction of its length.
    truncate: Option<f64>,
    /// Append junk.
    append: Vec<u8>,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    (
        prop::collection::vec((0.0..1.0f64, any::<bool>(), any::<u8>()), 0..12),
        prop::option::of((0.0..1.0f64, prop::collection::vec(any::<u8>(), 1..24))),
        prop::option::weighted(0.3, 0.0..1.0f64),
        prop::collection::vec(any::<u8>(), 0..8),
    )
        .prop_map(|(flips, run, truncate, append)| Mutation {
            flips,
            run,
            truncate,
            append,
        })
}

/// Apply `m` to `bytes`; positions marked "head" land in the first `head` bytes (where the
/// format's header and sizes live).
fn mutate(bytes: &[u8], head: usize, m: &Mutation) -> Vec<u8> {
    let mut b = bytes.to_vec();
    let n = b.len();
    for &(f, in_head, v) in &m.flips {
        let span = if in_head { head.min(n) } else { n };
        let i = ((f * span as f64) as usize).min(n - 1);
        b[i] = v;
    }
    if let Some((f, run)) = &m.run {
        let start = ((f * head.min(n) as f64) as usize).min(n - 1);
        for (k, v) in run.iter().enumerate() {
            if start + k < n {
                b[start + k] = *v;
            }
        }
    }
    if let Some(t) = m.truncate {
        b.truncate(((t * n as f64) as usize).max(1));
    }
    b.extend_from_slice(&m.append);
    b
}

/// Write the mutated bytes to a scratch copy and run `load` on it; a panic fails the case, an
/// error must name the file.
fn check<T>(
    tag: &str,
    name: &str,
    ext: &str,
    m: &Mutation,
    head: usize,
    load: impl Fn(&Path) -> tessera_core::Result<T>,
) {
    let (_, bytes) = original(name);
    let data = mutate(bytes, head, m);
    let p = fixture().scratch.join(format!(
        "{tag}-{}.{ext}",
        std::thread::current()
            .name()
            .unwrap_or("t")
            .replace("::", "_")
    ));
    std::fs::write(&p, &data).unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| load(&p)));
    match r {
        Err(_) => panic!("{tag}: the loader panicked on a mutated {name} ({m:?})"),
        Ok(Err(e)) => {
            let msg = e.to_string();
            assert!(!msg.is_empty(), "{tag}: empty error");
            assert!(
                msg.contains(&p.display().to_string()) || msg.contains("tessera-dataset.json"),
                "{tag}: the error does not name the file: {msg}"
            );
        }
        Ok(Ok(_)) => {}
    }
}

fn cases() -> u32 {
    std::env::var("HOSTILE_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(96)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn images_in_four_formats(m in mutation(), which in 0..4usize) {
        let (name, ext) = [("png", "png"), ("jpg", "jpg"), ("bmp", "bmp"), ("tiff", "tiff")][which];
        check("image", name, ext, &m, 256, |p| tessera_data::load_image(p, &Preprocess::paper()));
    }

    #[test]
    fn masks(m in mutation()) {
        check("mask", "mask", "png", &m, 256, |p| {
            tessera_data::load_mask_checked(p, (64, 64), &Preprocess::paper())
        });
    }

    #[test]
    fn dataset_descriptions(m in mutation()) {
        let (spec_path, _) = original("spec");
        let root = spec_path.parent().unwrap();
        let (_, bytes) = original("spec");
        let data = mutate(bytes, bytes.len(), &m);
        // Each case in its own copy of the dataset root's description (the images are shared
        // through the relative paths of the original folder).
        let case = fixture().scratch.join(format!(
            "ds-{}",
            std::thread::current().name().unwrap_or("t").replace("::", "_")
        ));
        let _ = std::fs::remove_dir_all(&case);
        std::fs::create_dir_all(&case).unwrap();
        for sub in ["train", "test", "ground_truth"] {
            std::os::unix::fs::symlink(root.join(sub), case.join(sub)).unwrap();
        }
        std::fs::write(case.join("tessera-dataset.json"), &data).unwrap();
        let r = std::panic::catch_unwind(|| {
            Dataset::open(&case).and_then(|d| {
                d.train()?;
                d.test()
            })
        });
        prop_assert!(r.is_ok(), "Dataset::open panicked on {:?}", String::from_utf8_lossy(&data));
    }

    #[test]
    fn weights_files(m in mutation()) {
        check("weights", "weights", "safetensors", &m, 4096, |p| {
            Backbone::load(Arch::ResNet18, &WeightsSource::File(p.to_path_buf()), 3, &candle_core::Device::Cpu)
        });
    }

    #[test]
    fn model_files(m in mutation()) {
        check("model", "model", "safetensors", &m, 8192, |p| {
            Detector::load(p, &candle_core::Device::Cpu)
        });
    }
}

/// Peak resident memory of this process (VmHWM), bytes.
fn peak_rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |k| k * 1024)
}

#[test]
fn crafted_bombs_are_refused_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    // A PNG whose header claims 60 000 × 60 000 pixels (10.8 GB decoded).
    let (_, png) = original("png");
    let mut bomb = png.to_vec();
    bomb[16..20].copy_from_slice(&60_000u32.to_be_bytes());
    bomb[20..24].copy_from_slice(&60_000u32.to_be_bytes());
    let p = dir.path().join("bomb.png");
    std::fs::write(&p, &bomb).unwrap();
    let e = tessera_data::load_image(&p, &Preprocess::paper()).unwrap_err();
    assert!(e.to_string().contains("bomb.png"), "{e}");
    // A safetensors header promising a 2^40-element tensor in a tiny file.
    let header =
        br#"{"w":{"dtype":"F32","shape":[1099511627776],"data_offsets":[0,4398046511104]}}"#;
    let mut st = (header.len() as u64).to_le_bytes().to_vec();
    st.extend_from_slice(header);
    st.extend_from_slice(&[0u8; 16]);
    let p = dir.path().join("huge.safetensors");
    std::fs::write(&p, &st).unwrap();
    let e = Detector::load(&p, &candle_core::Device::Cpu).unwrap_err();
    assert!(e.to_string().contains("huge.safetensors"), "{e}");
    let e = Backbone::load(
        Arch::ResNet18,
        &WeightsSource::File(p.clone()),
        3,
        &candle_core::Device::Cpu,
    )
    .unwrap_err();
    assert!(e.to_string().contains("huge.safetensors"), "{e}");
    // A header length that claims the file is larger than it is.
    let mut st = (1u64 << 40).to_le_bytes().to_vec();
    st.extend_from_slice(b"{}");
    std::fs::write(&p, &st).unwrap();
    assert!(Detector::load(&p, &candle_core::Device::Cpu).is_err());
    let peak = peak_rss();
    assert!(peak < 3 << 30, "peak RSS {peak} bytes");
    eprintln!(
        "hostile inputs: peak RSS {:.0} MiB",
        peak as f64 / (1 << 20) as f64
    );
}

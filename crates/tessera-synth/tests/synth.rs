//! Behaviour of the public API on small images.

use image::{GrayImage, Rgb, RgbImage};
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use tessera_synth::{
    blend, foreground_mask, image_seed, perlin_mask, write_dataset, DeformConfig, SourceKind,
    SynthConfig, Synthesizer, MANIFEST_FILE,
};

/// A varied test image (every channel changes across the image).
fn pattern(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([
            (x * 255 / w.max(1)) as u8,
            (y * 255 / h.max(1)) as u8,
            ((x * 13 + y * 7) % 200 + 30) as u8,
        ])
    })
}

/// Dark background with a bright disc of radius `r` at the centre.
fn disc(size: u32, r: f32, bright_on_dark: bool) -> RgbImage {
    let c = size as f32 / 2.0;
    RgbImage::from_fn(size, size, |x, y| {
        let inside = (x as f32 + 0.5 - c).hypot(y as f32 + 0.5 - c) < r;
        // A little texture so the structure source has something to shuffle.
        let t = ((x * 5 + y * 3) % 16) as u8;
        if inside == bright_on_dark {
            Rgb([200 + t, 190 + t, 170 + t])
        } else {
            Rgb([20 + t, 25 + t, 30 + t])
        }
    })
}

fn count_on(m: &GrayImage) -> usize {
    m.pixels().filter(|p| p[0] != 0).count()
}

fn assert_binary_nonempty(m: &GrayImage) {
    assert!(
        m.pixels().all(|p| p[0] == 0 || p[0] == 255),
        "mask not 0/255"
    );
    assert!(count_on(m) > 0, "mask empty");
}

fn assert_outside_unchanged(input: &RgbImage, out: &RgbImage, mask: &GrayImage) {
    assert_eq!(input.dimensions(), out.dimensions());
    for (i, ((a, b), m)) in input
        .pixels()
        .zip(out.pixels())
        .zip(mask.pixels())
        .enumerate()
    {
        if m[0] == 0 {
            assert_eq!(a, b, "pixel {i} outside the mask changed");
        }
    }
}

/// A folder of small generated textures (one subfolder, as DTD's class folders).
fn texture_dir(root: &Path) -> PathBuf {
    let d = root.join("textures");
    std::fs::create_dir_all(d.join("striped")).unwrap();
    for k in 0..3u32 {
        let t = RgbImage::from_fn(40 + 10 * k, 30, |x, y| {
            Rgb([
                ((x * (k + 3)) % 256) as u8,
                ((y * 11) % 256) as u8,
                (k * 60) as u8,
            ])
        });
        t.save(d.join("striped").join(format!("t{k}.png"))).unwrap();
    }
    std::fs::write(d.join("README.txt"), "not an image").unwrap();
    d
}

#[test]
fn deterministic_across_instances_and_threads() {
    let tmp = tempfile::tempdir().unwrap();
    let tex = texture_dir(tmp.path());
    let img = pattern(48, 40);
    let a = Synthesizer::new(SynthConfig::default(), Some(&tex)).unwrap();
    let b = Synthesizer::new(SynthConfig::default(), Some(&tex)).unwrap();
    let seeds: Vec<u64> = (0..16).map(|i| image_seed(9, i)).collect();
    let seq: Vec<_> = seeds
        .iter()
        .map(|&s| a.synthesize(&img, s).unwrap())
        .collect();
    let par: Vec<_> = seeds
        .par_iter()
        .rev()
        .map(|&s| b.synthesize(&img, s).unwrap())
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    for (x, y) in seq.iter().zip(&par) {
        assert_eq!(x.image, y.image);
        assert_eq!(x.mask, y.mask);
        assert_eq!(x.source, y.source);
        assert_eq!(x.beta.to_bits(), y.beta.to_bits());
    }
    // Both kinds of source occur with the default probability 0.5.
    assert!(seq.iter().any(|s| s.source == SourceKind::Structure));
    assert!(seq
        .iter()
        .any(|s| matches!(s.source, SourceKind::Texture(_))));
}

#[test]
fn different_seeds_differ() {
    let img = pattern(64, 64);
    let s = Synthesizer::new(SynthConfig::default(), None).unwrap();
    let outs: Vec<_> = (0..8).map(|i| s.synthesize(&img, i).unwrap()).collect();
    for i in 0..outs.len() {
        for j in i + 1..outs.len() {
            assert_ne!(outs[i].image, outs[j].image, "seeds {i} and {j}");
            assert_ne!(outs[i].mask, outs[j].mask, "seeds {i} and {j}");
        }
    }
    let betas: Vec<f32> = outs.iter().map(|o| o.beta).collect();
    assert!(betas.iter().all(|b| (0.15..=1.0).contains(b)), "{betas:?}");
}

#[test]
fn masks_nonempty_binary_and_outside_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let tex = texture_dir(tmp.path());
    let s = Synthesizer::new(SynthConfig::default(), Some(&tex)).unwrap();
    for (w, h) in [(8, 8), (33, 21), (64, 64), (50, 90)] {
        let img = pattern(w, h);
        for seed in 0..12 {
            let o = s.synthesize(&img, seed).unwrap();
            assert_binary_nonempty(&o.mask);
            assert_outside_unchanged(&img, &o.image, &o.mask);
            assert_eq!(o.mask.dimensions(), (w, h));
        }
    }
    // The mask is the documented Perlin mask for that size and seed.
    let img = pattern(40, 40);
    let o = s.synthesize(&img, 3).unwrap();
    assert_eq!(o.mask, perlin_mask(40, 40, s.config(), None, 3));
    // Something inside the mask changed.
    let changed = img
        .pixels()
        .zip(o.image.pixels())
        .zip(o.mask.pixels())
        .filter(|((a, b), m)| m[0] != 0 && a != b)
        .count();
    assert!(changed > 0);
}

#[test]
fn foreground_restriction_keeps_defects_on_the_object() {
    let cfg = SynthConfig {
        foreground: true,
        ..Default::default()
    };
    let s = Synthesizer::new(cfg.clone(), None).unwrap();
    let (size, r) = (64u32, 14.0f32);
    for bright_on_dark in [true, false] {
        let img = disc(size, r, bright_on_dark);
        let fg = foreground_mask(&img, cfg.foreground_dilation);
        // The Otsu foreground is the disc (either polarity), dilated by 1 px (0.01 × 64 → 1).
        let c = size as f32 / 2.0;
        for (x, y, p) in fg.enumerate_pixels() {
            let d = (x as f32 + 0.5 - c).hypot(y as f32 + 0.5 - c);
            if d < r - 0.5 {
                assert_eq!(p[0], 255, "({x},{y}) inside the disc is not foreground");
            }
            if d > r + 2.5 {
                assert_eq!(p[0], 0, "({x},{y}) far outside the disc is foreground");
            }
        }
        let mut total = 0;
        for seed in 0..24 {
            let o = s.synthesize(&img, seed).unwrap();
            assert_binary_nonempty(&o.mask);
            for (m, f) in o.mask.pixels().zip(fg.pixels()) {
                assert!(m[0] == 0 || f[0] == 255, "mask outside the foreground");
            }
            assert_outside_unchanged(&img, &o.image, &o.mask);
            total += count_on(&o.mask);
        }
        assert!(total > 0);
    }
    // Without the restriction, some mask pixels do fall on the background (the test can fail).
    let plain = Synthesizer::new(SynthConfig::default(), None).unwrap();
    let img = disc(size, r, true);
    let fg = foreground_mask(&img, 0.01);
    let outside: usize = (0..24)
        .map(|seed| {
            let o = plain.synthesize(&img, seed).unwrap();
            o.mask
                .pixels()
                .zip(fg.pixels())
                .filter(|(m, f)| m[0] != 0 && f[0] == 0)
                .count()
        })
        .sum();
    assert!(outside > 0);
}

#[test]
fn constant_image_foreground_falls_back_to_whole_image() {
    let img = RgbImage::from_pixel(32, 32, Rgb([90, 90, 90]));
    let cfg = SynthConfig {
        foreground: true,
        ..Default::default()
    };
    let o = Synthesizer::new(cfg, None)
        .unwrap()
        .synthesize(&img, 1)
        .unwrap();
    assert_binary_nonempty(&o.mask);
}

#[test]
fn blend_formula_exact() {
    let img = pattern(16, 12);
    let src = RgbImage::from_pixel(16, 12, Rgb([200, 0, 255]));
    let mask = GrayImage::from_fn(16, 12, |x, y| {
        image::Luma([if (x + y) % 3 == 0 { 255 } else { 0 }])
    });
    for beta in [0.0f32, 0.25, 0.6, 1.0] {
        let out = blend(&img, &src, &mask, beta).unwrap();
        for ((i, o), m) in img.pixels().zip(out.pixels()).zip(mask.pixels()) {
            for c in 0..3 {
                let expect = if m[0] == 0 {
                    i[c]
                } else {
                    ((1.0 - beta) * i[c] as f32 + beta * src.get_pixel(0, 0)[c] as f32).round()
                        as u8
                };
                assert_eq!(o[c], expect);
            }
        }
    }
    // Hand-computed: 100 and 200 at β = 0.25 → 125; β = 1 → the source.
    let a = RgbImage::from_pixel(2, 2, Rgb([100, 100, 100]));
    let b = RgbImage::from_pixel(2, 2, Rgb([200, 200, 200]));
    let full = GrayImage::from_pixel(2, 2, image::Luma([255]));
    assert_eq!(
        blend(&a, &b, &full, 0.25).unwrap().get_pixel(1, 1),
        &Rgb([125, 125, 125])
    );
    assert_eq!(blend(&a, &b, &full, 1.0).unwrap(), b);
    assert!(blend(&a, &pattern(3, 3), &full, 0.5).is_err());
}

#[test]
fn synthesize_blends_exactly_without_deformation() {
    // A single constant texture, no jitter, no warp: inside the mask every pixel must be
    // round((1 − β)·I + β·c) with the returned β.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("flat");
    std::fs::create_dir_all(&dir).unwrap();
    let c = [10u8, 240, 128];
    RgbImage::from_pixel(24, 20, Rgb(c))
        .save(dir.join("flat.png"))
        .unwrap();
    let cfg = SynthConfig {
        texture_probability: 1.0,
        texture_jitter: 0.0,
        deform: DeformConfig {
            enabled: false,
            ..Default::default()
        },
        ..Default::default()
    };
    let s = Synthesizer::new(cfg, Some(&dir)).unwrap();
    let img = pattern(48, 40); // resized texture: still constant
    for seed in 0..6 {
        let o = s.synthesize(&img, seed).unwrap();
        assert_eq!(o.source, SourceKind::Texture(dir.join("flat.png")));
        let beta = o.beta;
        for ((i, p), m) in img.pixels().zip(o.image.pixels()).zip(o.mask.pixels()) {
            for ch in 0..3 {
                let expect = if m[0] == 0 {
                    i[ch]
                } else {
                    ((1.0 - beta) * i[ch] as f32 + beta * c[ch] as f32).round() as u8
                };
                assert_eq!(p[ch], expect, "seed {seed}, β {beta}");
            }
        }
    }
}

#[test]
fn deformation_changes_the_result_only_inside_the_mask() {
    let img = pattern(64, 64);
    let on = Synthesizer::new(SynthConfig::default(), None).unwrap();
    let mut cfg = SynthConfig::default();
    cfg.deform.enabled = false;
    let off = Synthesizer::new(cfg, None).unwrap();
    let mut differs = 0;
    for seed in 0..6 {
        let (a, b) = (
            on.synthesize(&img, seed).unwrap(),
            off.synthesize(&img, seed).unwrap(),
        );
        assert_eq!(a.mask, b.mask);
        assert_eq!(a.beta, b.beta);
        assert_outside_unchanged(&img, &a.image, &a.mask);
        differs += (a.image != b.image) as usize;
    }
    assert!(differs >= 5, "the warp had no effect");
}

#[test]
fn texture_folder_errors_name_the_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-textures");
    let e = Synthesizer::new(SynthConfig::default(), Some(&missing)).unwrap_err();
    assert!(e.to_string().contains("no-such-textures"), "{e}");
    let empty = tmp.path().join("empty-textures");
    std::fs::create_dir_all(empty.join("sub")).unwrap();
    std::fs::write(empty.join("sub/notes.txt"), "x").unwrap();
    let e = Synthesizer::new(SynthConfig::default(), Some(&empty)).unwrap_err();
    assert!(e.to_string().contains("empty-textures"), "{e}");
    assert!(e.to_string().contains("no images"), "{e}");
    // Recursive listing, sorted, non-images ignored.
    let tex = texture_dir(tmp.path());
    let s = Synthesizer::new(SynthConfig::default(), Some(&tex)).unwrap();
    assert_eq!(s.texture_files().len(), 3);
    assert!(s.texture_files().windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn corrupt_texture_file_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tex");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("broken.jpg"), b"definitely not a jpeg").unwrap();
    let cfg = SynthConfig {
        texture_probability: 1.0,
        ..Default::default()
    };
    let s = Synthesizer::new(cfg, Some(&dir)).unwrap();
    let e = s.synthesize(&pattern(32, 32), 0).unwrap_err();
    assert!(e.to_string().contains("broken.jpg"), "{e}");
}

#[test]
fn bad_config_and_tiny_images_are_errors() {
    let cfg = SynthConfig {
        texture_probability: 1.5,
        ..Default::default()
    };
    let e = Synthesizer::new(cfg, None).unwrap_err();
    assert!(e.to_string().contains("texture_probability"), "{e}");
    let s = Synthesizer::new(SynthConfig::default(), None).unwrap();
    assert!(s.synthesize(&pattern(7, 30), 0).is_err());
    assert!(s.synthesize(&pattern(0, 0), 0).is_err());
}

/// A category folder with `n` normal PNGs (sizes may differ).
fn category(root: &Path, n: u32) -> PathBuf {
    let good = root.join("cat/train/good");
    std::fs::create_dir_all(&good).unwrap();
    for i in 0..n {
        pattern(40 + 4 * i, 36)
            .save(good.join(format!("{i:03}.png")))
            .unwrap();
    }
    root.join("cat")
}

#[test]
fn write_dataset_layout_determinism_and_thread_independence() {
    let tmp = tempfile::tempdir().unwrap();
    let cat = category(tmp.path(), 3);
    let tex = texture_dir(tmp.path());
    let s = Synthesizer::new(SynthConfig::default(), Some(&tex)).unwrap();
    let calls = std::sync::atomic::AtomicUsize::new(0);
    let out_a = tmp.path().join("a");
    let sum = write_dataset(&cat, &out_a, 7, 5, &s, |_| {
        calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    })
    .unwrap();
    assert_eq!(sum.count, 7);
    assert_eq!(sum.normals, 3);
    assert_eq!(sum.texture_sources + sum.structure_sources, 7);
    assert!(sum.images_per_second > 0.0);
    assert_eq!(calls.into_inner(), 7);
    // The same run on one thread gives the same bytes.
    let out_b = tmp.path().join("b");
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(|| write_dataset(&cat, &out_b, 7, 5, &s, |_| {}).unwrap());
    for i in 0..7 {
        for f in [
            format!("test/synthetic/{i:03}.png"),
            format!("ground_truth/synthetic/{i:03}_mask.png"),
        ] {
            let a = std::fs::read(out_a.join(&f)).unwrap();
            assert_eq!(a, std::fs::read(out_b.join(&f)).unwrap(), "{f}");
        }
        let img = image::open(out_a.join(format!("test/synthetic/{i:03}.png")))
            .unwrap()
            .to_rgb8();
        let mask = image::open(out_a.join(format!("ground_truth/synthetic/{i:03}_mask.png")))
            .unwrap()
            .to_luma8();
        assert_binary_nonempty(&mask);
        // Round robin over the normals: image i comes from normal i mod 3.
        let normal = image::open(cat.join(format!("train/good/{:03}.png", i % 3)))
            .unwrap()
            .to_rgb8();
        assert_outside_unchanged(&normal, &img, &mask);
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_a.join(MANIFEST_FILE)).unwrap()).unwrap();
    assert_eq!(manifest["images"].as_array().unwrap().len(), 7);
    assert_eq!(manifest["seed"], 5);
    // Re-running into the same folder is fine; a larger earlier run is refused.
    write_dataset(&cat, &out_a, 7, 5, &s, |_| {}).unwrap();
    let e = write_dataset(&cat, &out_a, 3, 5, &s, |_| {}).unwrap_err();
    assert!(e.to_string().contains("003.png"), "{e}");
}

#[test]
fn write_dataset_names_corrupt_and_missing_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let cat = category(tmp.path(), 2);
    std::fs::write(
        cat.join("train/good/zz_corrupt.png"),
        b"\x89PNG but not really",
    )
    .unwrap();
    let s = Synthesizer::new(SynthConfig::default(), None).unwrap();
    let e = write_dataset(&cat, &tmp.path().join("o"), 6, 0, &s, |_| {}).unwrap_err();
    assert!(e.to_string().contains("zz_corrupt.png"), "{e}");
    let e = write_dataset(
        &tmp.path().join("nope"),
        &tmp.path().join("o2"),
        1,
        0,
        &s,
        |_| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
    // A too-small normal image is named too.
    let small = tmp.path().join("small");
    std::fs::create_dir_all(small.join("train/good")).unwrap();
    pattern(5, 5)
        .save(small.join("train/good/tiny.png"))
        .unwrap();
    let e = write_dataset(&small, &tmp.path().join("o3"), 1, 0, &s, |_| {}).unwrap_err();
    assert!(e.to_string().contains("tiny.png"), "{e}");
}

/// The real DTD subset, when this machine has it (never needed to pass).
#[test]
fn real_dtd_textures_when_present() {
    let dir = std::env::var_os("TESSERA_TEXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../../shared/data/textures/dtd10"
            ))
        });
    if !dir.is_dir() {
        println!(
            "skipping: no texture folder at {} (set TESSERA_TEXTURES)",
            dir.display()
        );
        return;
    }
    let cfg = SynthConfig {
        texture_probability: 1.0,
        ..Default::default()
    };
    let s = Synthesizer::new(cfg, Some(&dir)).unwrap();
    println!(
        "{} texture files under {}",
        s.texture_files().len(),
        dir.display()
    );
    assert!(!s.texture_files().is_empty());
    let img = pattern(64, 64);
    for seed in 0..4 {
        let o = s.synthesize(&img, seed).unwrap();
        assert_binary_nonempty(&o.mask);
        assert_outside_unchanged(&img, &o.image, &o.mask);
        match &o.source {
            SourceKind::Texture(p) => assert!(p.starts_with(&dir)),
            SourceKind::Structure => panic!("texture_probability 1 gave a structure source"),
        }
    }
}

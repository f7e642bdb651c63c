//! Layout detection, listing and the bad-input matrix for data.

use image::{GrayImage, Luma, Rgb, RgbImage};
use std::path::{Path, PathBuf};
use tessera_core::model::Preprocess;
use tessera_data::{load_batch, Dataset};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tessera-data-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn rgb(path: &Path, w: u32, h: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    RgbImage::from_fn(w, h, |x, y| Rgb([(x * 7) as u8, (y * 3) as u8, 100]))
        .save(path)
        .unwrap();
}

fn mask(path: &Path, w: u32, h: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    GrayImage::from_fn(w, h, |x, _| Luma([if x < w / 2 { 255 } else { 0 }]))
        .save(path)
        .unwrap();
}

fn mvtec(root: &Path) {
    for i in 0..3 {
        rgb(&root.join(format!("train/good/{i:03}.png")), 40, 30);
        rgb(&root.join(format!("test/good/{i:03}.png")), 40, 30);
    }
    rgb(&root.join("test/crack/000.png"), 40, 30);
    mask(&root.join("ground_truth/crack/000_mask.png"), 40, 30);
}

fn err<T: std::fmt::Debug>(r: tessera_core::Result<T>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn mvtec_layout_lists_train_and_test_with_masks() {
    let root = tmp("mvtec");
    mvtec(&root);
    let ds = Dataset::open(&root).unwrap();
    assert_eq!(ds.train().unwrap().len(), 3);
    let test = ds.test().unwrap();
    assert_eq!(test.len(), 4);
    assert_eq!(test[0].defect_type, "good");
    assert_eq!(test[3].name, "crack/000.png");
    assert!(test[3].mask.is_some());
    let pre = Preprocess::square(32, 24);
    let b = load_batch(&test, &pre, &candle_core::Device::Cpu).unwrap();
    assert_eq!(b.tensor.dims(), &[4, 3, 24, 24]);
    let m = b.masks[3].as_ref().unwrap();
    assert_eq!(m.len(), 24 * 24);
    assert!(m[0] && !m[23]);
}

#[test]
fn gray_and_jpeg_and_bmp_inputs_become_rgb() {
    let root = tmp("formats");
    let g = GrayImage::from_fn(50, 20, |x, _| Luma([x as u8]));
    g.save(root.join("a.png")).unwrap();
    RgbImage::from_pixel(17, 33, Rgb([10, 20, 30]))
        .save(root.join("b.jpg"))
        .unwrap();
    RgbImage::from_pixel(64, 64, Rgb([10, 20, 30]))
        .save(root.join("c.bmp"))
        .unwrap();
    RgbImage::from_pixel(64, 64, Rgb([10, 20, 30]))
        .save(root.join("d.tiff"))
        .unwrap();
    let files = tessera_data::list_images(&root).unwrap();
    assert_eq!(files.len(), 4);
    for f in files {
        let img = tessera_data::load_image(&f, &Preprocess::paper()).unwrap();
        assert_eq!(img.chw.len(), 3 * 224 * 224);
    }
}

#[test]
fn folder_layout_with_holdout_split() {
    let root = tmp("folder");
    for i in 0..10 {
        rgb(&root.join(format!("ok/{i}.png")), 20, 20);
    }
    rgb(&root.join("bad/scratch/x.png"), 20, 20);
    mask(&root.join("masks/x_mask.png"), 20, 20);
    std::fs::write(
        root.join("tessera-dataset.json"),
        r#"{"normal_train":"ok","abnormal":["bad/scratch"],"mask":"masks","category":"texture"}"#,
    )
    .unwrap();
    let ds = Dataset::open(&root).unwrap();
    assert_eq!(
        ds.category_kind(),
        Some(tessera_data::CategoryKind::Texture)
    );
    let train = ds.train().unwrap();
    let test = ds.test().unwrap();
    assert_eq!(train.len(), 8);
    assert_eq!(test.len(), 3);
    assert_eq!(test[2].defect_type, "scratch");
    assert!(test[2].mask.is_some());
    for t in &test[..2] {
        assert!(!train.contains(t), "held-out image also in train");
    }
}

#[test]
fn bad_input_matrix_gives_clear_errors() {
    // Missing dataset folder.
    let e = err(Dataset::open(Path::new("/nonexistent/tessera/ds")));
    assert!(
        e.contains("/nonexistent/tessera/ds") && e.contains("does not exist"),
        "{e}"
    );

    // Not a dataset.
    let root = tmp("notds");
    let e = err(Dataset::open(&root));
    assert!(e.contains("not a dataset"), "{e}");

    // Missing train/good.
    let root = tmp("notrain");
    rgb(&root.join("test/good/0.png"), 8, 8);
    let e = err(Dataset::open(&root).unwrap().train());
    assert!(
        e.contains("train/good") && e.contains("does not exist"),
        "{e}"
    );

    // Empty train dir.
    let root = tmp("emptytrain");
    std::fs::create_dir_all(root.join("train/good")).unwrap();
    std::fs::write(root.join("train/good/readme.txt"), "x").unwrap();
    let e = err(Dataset::open(&root).unwrap().train());
    assert!(e.contains("holds no image"), "{e}");

    // Missing mask.
    let root = tmp("nomask");
    mvtec(&root);
    std::fs::remove_file(root.join("ground_truth/crack/000_mask.png")).unwrap();
    let e = err(Dataset::open(&root).unwrap().test());
    assert!(
        e.contains("test/crack/000.png") && e.contains("no ground-truth mask"),
        "{e}"
    );

    // Mask of another size.
    let root = tmp("masksize");
    mvtec(&root);
    mask(&root.join("ground_truth/crack/000_mask.png"), 41, 30);
    let test = Dataset::open(&root).unwrap().test().unwrap();
    let e = err(load_batch(
        &test,
        &Preprocess::paper(),
        &candle_core::Device::Cpu,
    ));
    assert!(
        e.contains("000_mask.png") && e.contains("41×30") && e.contains("40×30"),
        "{e}"
    );

    // Corrupt image.
    let root = tmp("corrupt");
    mvtec(&root);
    std::fs::write(root.join("train/good/001.png"), b"\x89PNG\r\n\x1a\ngarbage").unwrap();
    let train = Dataset::open(&root).unwrap().train().unwrap();
    let e = err(load_batch(
        &train,
        &Preprocess::paper(),
        &candle_core::Device::Cpu,
    ));
    assert!(
        e.contains("train/good/001.png") && e.contains("cannot decode"),
        "{e}"
    );

    // Bad folder description.
    let root = tmp("badspec");
    std::fs::write(root.join("tessera-dataset.json"), r#"{"normal":"x"}"#).unwrap();
    let e = err(Dataset::open(&root));
    assert!(
        e.contains("tessera-dataset.json") && e.contains("invalid dataset description"),
        "{e}"
    );
}

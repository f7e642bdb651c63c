//! Pixel metrics against a numpy/scipy/scikit-learn reference (`tools/golden/metrics.py`):
//! AUPRO computed as MVTec AD's evaluation code does, scipy's 8-connected component labels,
//! pixel and image AUROC / F1-max.

use safetensors::{Dtype, SafeTensors};
use tessera_core::AnomalyMap;
use tessera_eval::{
    aupro, auroc, connected_components, evaluate, f1_max, pro_curve, EvalSample, ProImage, RunInfo,
    Timings,
};

const N: usize = 6;
const W: usize = 64;
const H: usize = 64;

struct Golden {
    bytes: Vec<u8>,
}

impl Golden {
    fn load() -> Self {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden/metrics.safetensors");
        Self {
            bytes: std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
        }
    }
    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).unwrap()
    }
    fn raw(&self, name: &str, dtype: Dtype) -> Vec<u8> {
        let st = self.st();
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), dtype, "{name}");
        t.data().to_vec()
    }
    fn f32s(&self, name: &str) -> Vec<f32> {
        self.raw(name, Dtype::F32)
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }
    fn f64(&self, name: &str) -> f64 {
        let b = self.raw(name, Dtype::F64);
        assert_eq!(b.len(), 8, "{name}");
        f64::from_le_bytes(b.try_into().unwrap())
    }
    fn u8s(&self, name: &str) -> Vec<u8> {
        self.raw(name, Dtype::U8)
    }
}

struct Data {
    maps: Vec<Vec<f32>>,
    masks: Vec<Vec<bool>>,
}

fn data(g: &Golden) -> Data {
    let maps = g.f32s("maps");
    let masks = g.u8s("masks");
    assert_eq!(maps.len(), N * H * W);
    Data {
        maps: maps.chunks(H * W).map(<[f32]>::to_vec).collect(),
        masks: masks
            .chunks(H * W)
            .map(|m| m.iter().map(|&v| v != 0).collect())
            .collect(),
    }
}

fn assert_close(got: f64, want: f64, tol: f64, what: &str) {
    assert!(
        (got - want).abs() <= tol,
        "{what}: got {got:.15}, reference {want:.15} (|Δ| = {:e})",
        (got - want).abs()
    );
}

/// Relabel by first appearance in raster order, so label numbering conventions cannot matter.
fn canonical(labels: &[u32]) -> Vec<u32> {
    let mut map = std::collections::HashMap::new();
    labels
        .iter()
        .map(|&l| {
            if l == 0 {
                0
            } else {
                let n = map.len() as u32 + 1;
                *map.entry(l).or_insert(n)
            }
        })
        .collect()
}

#[test]
fn components_match_scipy_label_8_connectivity() {
    let g = Golden::load();
    let d = data(&g);
    let want = g.u8s("labels");
    let mut total = 0;
    for (i, m) in d.masks.iter().enumerate() {
        let c = connected_components(m, W, H);
        let w: Vec<u32> = want[i * H * W..(i + 1) * H * W]
            .iter()
            .map(|&v| v as u32)
            .collect();
        assert_eq!(canonical(&c.labels), canonical(&w), "image {i}");
        // scipy numbers regions in raster order too: even the raw labels agree.
        assert_eq!(c.labels, w, "image {i}");
        total += c.count();
    }
    // Image 3 holds a corner-touching pair and a diagonal line: 4-connectivity would give more.
    assert_eq!(total, 8);
}

#[test]
fn aupro_matches_mvtec_reference() {
    let g = Golden::load();
    let d = data(&g);
    let images: Vec<ProImage> = d
        .maps
        .iter()
        .zip(&d.masks)
        .map(|(s, m)| ProImage {
            scores: s,
            mask: Some(m),
            width: W,
            height: H,
        })
        .collect();
    let curve = pro_curve(&images).unwrap();
    for (limit, name) in [(0.3, "30"), (0.05, "05"), (1.0, "100")] {
        let a = aupro(&images, limit).unwrap();
        // The float64 transcription of the reference: agreement to rounding.
        assert_close(a, g.f64(&format!("aupro_{name}")), 1e-9, name);
        // The reference as MVTec ships it keeps FPRs in float32.
        assert_close(a, g.f64(&format!("aupro_{name}_f32")), 1e-6, name);
        assert_close(curve.area(limit), a, 1e-12, name);
    }
    // Normal images passed without a mask are the same as all-false masks.
    let no_mask: Vec<ProImage> = images
        .iter()
        .enumerate()
        .map(|(i, im)| ProImage {
            mask: if i < 2 { None } else { im.mask },
            ..*im
        })
        .collect();
    assert_eq!(aupro(&no_mask, 0.3), aupro(&images, 0.3));
}

#[test]
fn pixel_and_image_metrics_match_sklearn() {
    let g = Golden::load();
    let d = data(&g);
    let s: Vec<f32> = d.maps.concat();
    let l: Vec<bool> = d.masks.concat();
    assert_close(
        auroc(&s, &l).unwrap(),
        g.f64("pixel_auroc"),
        1e-12,
        "pixel AUROC",
    );
    let (f1, t) = f1_max(&s, &l).unwrap();
    assert_close(f1, g.f64("pixel_f1_max"), 1e-12, "pixel F1-max");
    assert_eq!(t, g.f32s("pixel_threshold")[0]);
}

#[test]
fn evaluate_reports_the_reference_values() {
    let g = Golden::load();
    let d = data(&g);
    let samples: Vec<EvalSample> = d
        .maps
        .iter()
        .zip(&d.masks)
        .enumerate()
        .map(|(i, (s, m))| {
            let anomalous = m.iter().any(|&b| b);
            EvalSample {
                name: format!("{i:03}.png"),
                defect_type: if anomalous { "defect" } else { "good" }.into(),
                map: AnomalyMap::new(W, H, s.clone()),
                // Normal images without a mask: all-normal.
                mask: anomalous.then(|| m.clone()),
            }
        })
        .collect();
    let r = evaluate(&samples, Timings::default(), RunInfo::default());
    assert_close(r.pixel_aupro.unwrap(), g.f64("aupro_30"), 1e-9, "AUPRO");
    assert_close(r.pixel_auroc.unwrap(), g.f64("pixel_auroc"), 1e-12, "AUROC");
    assert_close(r.pixel_f1_max.unwrap(), g.f64("pixel_f1_max"), 1e-12, "F1");
    assert_eq!(r.pixel_threshold, Some(g.f32s("pixel_threshold")[0]));
    assert_close(
        r.image_auroc.unwrap(),
        g.f64("image_auroc"),
        1e-12,
        "image AUROC",
    );
    assert_close(
        r.image_f1_max.unwrap(),
        g.f64("image_f1_max"),
        1e-12,
        "image F1",
    );
    assert_eq!(r.image_threshold, Some(g.f32s("image_threshold")[0]));
    // One defect type: its breakdown is the whole set.
    assert_eq!(r.per_type["defect"].pixel_aupro, r.pixel_aupro);
    assert_eq!(r.counts.pixels, (N * H * W) as u64);
}

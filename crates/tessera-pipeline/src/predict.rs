//! `predict`: score image files and folders with a model; heatmaps under paths that mirror
//! the inputs, `scores.csv`, and one record per image for callers that stream them.

use crate::batches::batches;
use crate::detector::Detector;
use crate::observer::{stage, Counter, Observer};
use serde::Serialize;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use tessera_backbone::Precision;
use tessera_core::io::Outputs;
use tessera_core::{DeviceSpec, Error, Result};
use tessera_data::{is_image_path, walk_images, Sample};
use tessera_eval::{render_panel, save_png};

/// Options of `predict`.
#[derive(Debug, Clone)]
pub struct PredictOptions {
    pub model: PathBuf,
    /// Image files and/or folders of images.
    pub inputs: Vec<PathBuf>,
    /// Output folder for heatmaps and `scores.csv` (built aside, swapped in when done).
    pub out: PathBuf,
    /// Replace a non-empty output folder as a whole.
    pub overwrite: bool,
    /// Also score images in sub-folders of folder inputs.
    pub recursive: bool,
    /// Threshold for the anomalous flag and the predicted mask; the model's if `None`.
    pub threshold: Option<f32>,
    pub device: DeviceSpec,
    pub batch_size: usize,
    /// The backbone's products: f32, or bf16 where the CPU has native bf16 dot products.
    pub precision: Precision,
}

/// One scored image.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    /// The input file.
    pub path: PathBuf,
    /// The raw image score.
    pub score: f32,
    /// The normalised score, 0.5 at the threshold.
    pub normalized: f32,
    /// How many calibration normals score this high (conformal p-value).
    pub p_value: Option<f64>,
    /// `score > threshold`.
    pub anomalous: bool,
    /// The heatmap panel, relative to the output folder.
    pub heatmap: PathBuf,
}

/// What `predict` did.
#[derive(Debug, Clone, Serialize)]
pub struct PredictSummary {
    pub images: usize,
    pub anomalous: usize,
    pub threshold: f32,
    pub scores_csv: PathBuf,
}

/// An input image and where its heatmap goes (relative to the output folder, no extension).
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub path: PathBuf,
    pub rel: PathBuf,
}

/// Expand files and folders into images with mirrored output paths: a file's heatmap is its
/// stem at the top; a folder's images keep their paths below it — under the folder's own name
/// when there are several inputs. Names that would collide get `_1`, `_2`, ….
pub fn expand_inputs(inputs: &[PathBuf], recursive: bool) -> Result<Vec<Job>> {
    let mut jobs = Vec::new();
    let several = inputs.len() > 1;
    for input in inputs {
        let meta = std::fs::metadata(input);
        match meta {
            Ok(m) if m.is_dir() => {
                let base = if several {
                    input
                        .file_name()
                        .map(PathBuf::from)
                        .unwrap_or_else(|| PathBuf::from("input"))
                } else {
                    PathBuf::new()
                };
                for p in walk_images(input, recursive)? {
                    let rel = p.strip_prefix(input).unwrap_or(&p).with_extension("");
                    jobs.push(Job {
                        rel: base.join(rel),
                        path: p,
                    });
                }
            }
            Ok(m) if m.is_file() => {
                if !is_image_path(input) {
                    return Err(Error::bad_input(
                        input,
                        format!(
                            "not an image file by its extension (expected {})",
                            tessera_data::IMAGE_EXTS.join(", ")
                        ),
                    ));
                }
                let stem = input.file_stem().map(PathBuf::from).unwrap_or_default();
                jobs.push(Job {
                    rel: stem,
                    path: input.clone(),
                });
            }
            Ok(_) => {
                return Err(Error::bad_input(
                    input,
                    "is neither a file nor a folder (a device, pipe or socket)",
                ))
            }
            Err(_) => return Err(Error::bad_input(input, "no such file or folder")),
        }
    }
    let mut used = HashSet::new();
    for j in &mut jobs {
        let key = |r: &Path| r.to_string_lossy().to_lowercase();
        if !used.insert(key(&j.rel)) {
            let stem = j.rel.clone();
            let mut k = 1;
            loop {
                let name = format!(
                    "{}_{k}",
                    stem.file_name()
                        .map(|n| n.to_string_lossy())
                        .unwrap_or_default()
                );
                let cand = stem.with_file_name(name);
                if used.insert(key(&cand)) {
                    j.rel = cand;
                    break;
                }
                k += 1;
            }
        }
    }
    Ok(jobs)
}

/// Score images (files or folders of images) with a model file: heatmap panels and
/// `scores.csv` in `out`; `each` sees every prediction as it is made (e.g. to print JSON
/// lines). The output folder is checked before any work and replaced as a whole at the end.
pub fn predict(
    o: &PredictOptions,
    obs: &dyn Observer,
    each: &mut dyn FnMut(&Prediction),
) -> Result<PredictSummary> {
    if o.batch_size == 0 {
        return Err(Error::Config("--batch-size must be at least 1".into()));
    }
    if let Some(t) = o.threshold {
        if !t.is_finite() {
            return Err(Error::Config(format!(
                "--threshold {t} is not a finite number"
            )));
        }
    }
    let mut outs = Outputs::default();
    outs.reads(&o.model, "--model");
    for i in &o.inputs {
        outs.reads(i, "an input");
    }
    let mut dir = outs.check_dir(&o.out, "--out", o.overwrite)?;
    let jobs = expand_inputs(&o.inputs, o.recursive)?;
    if jobs.is_empty() {
        return Err(Error::bad_input(
            &o.inputs[0],
            if o.recursive {
                "no images found (png/jpg/jpeg/bmp/tif/tiff)"
            } else {
                "no images found directly in the given folders (pass --recursive for sub-folders)"
            },
        ));
    }
    let device = o.device.open()?;
    let mut det = Detector::load(&o.model, &device)?;
    det.set_precision(o.precision, obs);
    let thr = o.threshold.unwrap_or(det.image_threshold());
    let pixel_thr = det.pixel_threshold_at(o.threshold);
    let samples: Vec<Sample> = jobs
        .iter()
        .map(|j| Sample {
            path: j.path.clone(),
            defect_type: "unknown".into(),
            mask: None,
            name: j.path.display().to_string(),
        })
        .collect();
    let root = dir.path()?.to_path_buf();
    let mut csv = csv::Writer::from_writer(Vec::new());
    let csv_err = |e: csv::Error| Error::Config(format!("scores.csv: {e}"));
    csv.write_record([
        "path",
        "score",
        "normalized",
        "p_value",
        "anomalous",
        "heatmap",
    ])
    .map_err(csv_err)?;
    let mut anomalous = 0;
    {
        let count = Counter::start(obs, stage::PREDICT, samples.len() as u64);
        let mut at = 0;
        for b in batches(&samples, &det.meta.preprocess, o.batch_size, &device) {
            let b = b?;
            let (maps, _) = det.score(&b.tensor)?;
            let n = maps.len();
            for ((job, map), img) in jobs[at..at + n].iter().zip(maps).zip(&b.images) {
                let v = det.verdict(map.image_score(), o.threshold);
                anomalous += v.anomalous as usize;
                let heatmap = job.rel.with_extension("png");
                let panel = render_panel(img, &map, None, pixel_thr, det.meta.heat_range)?;
                save_png(&panel, &root.join(&heatmap))?;
                let p = Prediction {
                    path: job.path.clone(),
                    score: v.score,
                    normalized: v.normalized,
                    p_value: v.p_value,
                    anomalous: v.anomalous,
                    heatmap,
                };
                csv.write_record([
                    p.path.display().to_string(),
                    p.score.to_string(),
                    format!("{:.6}", p.normalized),
                    p.p_value.map(|v| format!("{v:.6}")).unwrap_or_default(),
                    p.anomalous.to_string(),
                    p.heatmap.display().to_string(),
                ])
                .map_err(csv_err)?;
                each(&p);
            }
            at += n;
            count.add(n as u64);
        }
    }
    let bytes = csv
        .into_inner()
        .map_err(|e| Error::Config(format!("scores.csv: {e}")))?;
    tessera_core::io::write_atomic(&root.join("scores.csv"), &bytes)?;
    let target = dir.commit()?;
    Ok(PredictSummary {
        images: samples.len(),
        anomalous,
        threshold: thr,
        scores_csv: target.join("scores.csv"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_mirror_and_never_collide() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("line");
        std::fs::create_dir_all(a.join("cam1")).unwrap();
        std::fs::create_dir_all(a.join(".hidden")).unwrap();
        for f in ["x.png", "x.jpg", "cam1/y.png", ".hidden/z.png", "notes.txt"] {
            std::fs::write(a.join(f), b"").unwrap();
        }
        let flat = expand_inputs(std::slice::from_ref(&a), false).unwrap();
        let rels: Vec<String> = flat.iter().map(|j| j.rel.display().to_string()).collect();
        assert_eq!(rels, vec!["x_1", "x"].into_iter().rev().collect::<Vec<_>>());
        let deep = expand_inputs(std::slice::from_ref(&a), true).unwrap();
        let rels: Vec<String> = deep.iter().map(|j| j.rel.display().to_string()).collect();
        assert_eq!(rels, vec!["cam1/y", "x", "x_1"]);
        // Several inputs: each under its own name.
        let two = expand_inputs(&[a.clone(), a.join("x.png")], false).unwrap();
        let rels: Vec<String> = two.iter().map(|j| j.rel.display().to_string()).collect();
        assert_eq!(rels, vec!["line/x", "line/x_1", "x"]);
        let e = expand_inputs(&[a.join("notes.txt")], false).unwrap_err();
        assert!(e.to_string().contains("not an image"), "{e}");
        let e = expand_inputs(&[a.join("nope")], false).unwrap_err();
        assert!(e.to_string().contains("no such file"), "{e}");
    }
}

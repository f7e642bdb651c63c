//! Galleries comparing runs: the heatmap folders of `tessera test --heatmaps` for several runs
//! of one category, composed image by image (Fig. 5 of the paper).

use std::path::{Path, PathBuf};
use tessera_core::io::Outputs;
use tessera_core::{Error, Result};

/// Compose up to `rows` defect images found in every one of `runs` (heatmap folders, each
/// `<type>/<image>.png`), one defect type after another, into `out` (PNG, atomically). Returns
/// the images used.
pub fn gallery(runs: &[PathBuf], rows: usize, out: &Path) -> Result<Vec<PathBuf>> {
    let mut outs = Outputs::default();
    for r in runs {
        outs.reads(r, "--heatmaps");
    }
    outs.check_file(out, "--out")?;
    let Some(base) = runs.first() else {
        return Err(Error::Config(
            "a gallery needs at least one heatmap folder".into(),
        ));
    };
    let entries = tessera_data::read_folder(base).map_err(|e| Error::io(base, e))?;
    let mut lists: Vec<Vec<PathBuf>> = entries
        .dirs
        .iter()
        .filter(|d| !d.ends_with("good"))
        .map(|d| tessera_data::list_images(d).unwrap_or_default())
        .collect();
    // The same image must exist in every run.
    for l in &mut lists {
        l.retain(|p| {
            let rel = p.strip_prefix(base).unwrap_or(p);
            runs.iter().all(|r| r.join(rel).is_file())
        });
    }
    let mut picks = Vec::new();
    let mut i = 0;
    while picks.len() < rows && lists.iter().any(|l| i < l.len()) {
        for l in &lists {
            if let (Some(p), true) = (l.get(i), picks.len() < rows) {
                picks.push(p.strip_prefix(base).unwrap_or(p).to_path_buf());
            }
        }
        i += 1;
    }
    if picks.is_empty() {
        return Err(Error::bad_input(
            base,
            "no defect image's heatmap is in every folder (run `tessera test --heatmaps` on a \
             dataset with defects)",
        ));
    }
    let mut panels = Vec::new();
    for rel in &picks {
        let row = runs
            .iter()
            .map(|r| {
                let p = r.join(rel);
                image::open(&p).map(|i| i.to_rgb8()).map_err(|e| {
                    Error::bad_input(&p, format!("cannot read the heatmap panel: {e}"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        panels.push(row);
    }
    let img = tessera_eval::compose_gallery(&panels)?;
    tessera_eval::save_png(&img, out)?;
    Ok(picks)
}

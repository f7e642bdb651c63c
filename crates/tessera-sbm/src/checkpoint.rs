//! Checkpoints: everything needed to resume an SBM run after any epoch (trained tensors,
//! optimiser state, history), refused when the settings or images changed.

use crate::nets::Nets;
use crate::optim::Optimizers;
use crate::{EpochStats, SbmConfig, SbmEvent};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use tessera_core::{Error, Result};

const CHECKPOINT_KEY: &str = "tessera_sbm_checkpoint";

fn prefixed(p: &str, v: Vec<(String, Tensor)>) -> impl Iterator<Item = (String, Tensor)> + '_ {
    v.into_iter().map(move |(k, t)| (format!("{p}.{k}"), t))
}

fn strip(p: &str, t: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    let p = format!("{p}.");
    t.iter()
        .filter_map(|(k, v)| k.strip_prefix(&p).map(|s| (s.to_string(), v.clone())))
        .collect()
}

#[derive(Serialize, Deserialize)]
struct CheckpointMeta {
    resume_key: String,
    epochs_done: usize,
    history: Vec<EpochStats>,
    train_images: usize,
}

/// Resume from `ck` when it exists: restore the tensors and optimiser state, return the
/// finished epochs' history (empty when there is no checkpoint).
pub(crate) fn resume(
    ck: Option<&Path>,
    config: &SbmConfig,
    nets: &Nets,
    opts: &mut Optimizers,
    n_img: usize,
    progress: &dyn Fn(&SbmEvent),
) -> Result<Vec<EpochStats>> {
    let dev = nets.net.device().clone();
    let mut history: Vec<EpochStats> = Vec::new();
    if let Some(ck) = ck.filter(|p| p.is_file()) {
        let meta = tessera_core::io::safetensors_metadata(ck)?;
        let m: CheckpointMeta = meta
            .get(CHECKPOINT_KEY)
            .and_then(|j| serde_json::from_str(j).ok())
            .ok_or_else(|| Error::bad_model(ck, "not an SBM checkpoint"))?;
        if m.resume_key != config.resume_key() || m.train_images != n_img {
            return Err(Error::bad_model(
                ck,
                "this checkpoint was made with other settings or images; delete it (or pass --restart) to start over",
            ));
        }
        let t = candle_core::safetensors::load(ck, &dev)
            .map_err(|e| Error::bad_model(ck, format!("unreadable checkpoint: {e}")))?;
        let get = |k: &str| {
            t.get(k)
                .ok_or_else(|| Error::bad_model(ck, format!("checkpoint lacks '{k}'")))
        };
        for (name, v) in &nets.vars {
            v.set(get(&format!("bb.{name}"))?)?;
        }
        for (k, v) in ["weight", "bias"].iter().zip(nets.head.vars()) {
            v.set(get(&format!("head.{k}"))?)?;
        }
        for (name, v) in &nets.pfam_vars {
            v.set(get(&format!("pfam_vars.{name}"))?)?;
        }
        if let Some(o) = opts.bb.as_mut() {
            o.load(&strip("opt_bb", &t))?;
        }
        if let Some(o) = opts.pfam.as_mut() {
            o.load(&strip("opt_pfam", &t))?;
        }
        opts.head.load(&strip("opt_head", &t))?;
        history = m.history;
        progress(&SbmEvent::Resumed {
            epochs_done: history.len(),
        });
    }

    Ok(history)
}

pub(crate) fn save(
    path: &Path,
    config: &SbmConfig,
    nets: &Nets,
    opts: &Optimizers,
    history: &[EpochStats],
    train_images: usize,
) -> Result<()> {
    let mut t: Vec<(String, Tensor)> = nets
        .vars
        .iter()
        .map(|(k, v)| (format!("bb.{k}"), v.as_tensor().detach()))
        .collect();
    let (hw, hb) = nets.head.tensors();
    t.push(("head.weight".into(), hw.detach()));
    t.push(("head.bias".into(), hb.detach()));
    if let Some(o) = &opts.bb {
        t.extend(prefixed("opt_bb", o.state()?));
    }
    if let Some(o) = &opts.pfam {
        t.extend(prefixed("opt_pfam", o.state()?));
    }
    t.extend(
        nets.pfam_vars
            .iter()
            .map(|(k, v)| (format!("pfam_vars.{k}"), v.as_tensor().detach())),
    );
    t.extend(prefixed("opt_head", opts.head.state()?));
    let meta = CheckpointMeta {
        resume_key: config.resume_key(),
        epochs_done: history.len(),
        history: history.to_vec(),
        train_images,
    };
    let json = serde_json::to_string(&meta)
        .map_err(|e| Error::bad_model(path, format!("cannot serialise checkpoint: {e}")))?;
    tessera_core::io::save_safetensors(path, &t, HashMap::from([(CHECKPOINT_KEY.into(), json)]))
}

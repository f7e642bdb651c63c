//! The networks of one SBM run: the backbone copy being trained, its frozen reference, PFAM and
//! the jigsaw head.

use crate::train::mix;
use crate::{Anchor, JigsawHead, SbmConfig};
use candle_core::{DType, Device, Tensor, Var};
use tessera_backbone::Backbone;
use tessera_core::{Error, Result};
use tessera_pfam::Pfam;

/// The network being trained plus its frozen reference.
pub(crate) struct Nets {
    pub(crate) net: Backbone,
    pub(crate) reference: Backbone,
    pub(crate) head: JigsawHead,
    pub(crate) pfam: Option<Pfam>,
    /// (name, var) of PFAM's parameters.
    pub(crate) pfam_vars: Vec<(String, Var)>,
    /// (name, var) of the trained backbone tensors.
    pub(crate) vars: Vec<(String, Var)>,
    /// Their starting values (L2-SP).
    pub(crate) start: Vec<Tensor>,
    pub(crate) first: usize,
}

impl Nets {
    /// Training forward: trained features of layers ≥ first, the reference's (anchoring), and
    /// the logits. Layers before the first trained one are shared, computed once.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        with_ref: bool,
    ) -> Result<(Vec<Tensor>, Vec<Tensor>, Tensor)> {
        let mut h = self.net.stem(x)?;
        let mut feats = Vec::new();
        let mut refs = Vec::new();
        let mut levels = Vec::new();
        let mut r: Option<Tensor> = None;
        for l in 0..3 {
            if l + 1 == self.first && with_ref {
                r = Some(h.clone());
            }
            h = self.net.layer(l, &h)?;
            if let Some(rr) = r.take() {
                let nr = self.reference.layer(l, &rr)?;
                refs.push(nr.clone());
                r = Some(nr);
            }
            if l + 1 >= self.first {
                feats.push(h.clone());
            }
            levels.push(h.clone());
        }
        let logits = match &self.pfam {
            Some(p) => {
                let out = p.forward(&tessera_core::FeatureMaps::new(levels))?;
                self.head.forward_levels(&out.levels)?
            }
            None => self.head.forward(&h)?,
        };
        Ok((feats, refs, logits))
    }
}

impl Nets {
    /// The anchoring term of a batch, unweighted: relative feature change against the frozen
    /// reference ([`Anchor::Features`]; `with_ref` says the reference ran) or the L2-SP
    /// distance to the starting weights; `None` when nothing anchors.
    pub(crate) fn anchor_term(
        &self,
        config: &SbmConfig,
        feats: &[Tensor],
        refs: &[Tensor],
        with_ref: bool,
    ) -> Result<Option<Tensor>> {
        let dev = self.net.device();
        Ok(match config.anchor {
            Anchor::Features if with_ref => {
                let mut a = Tensor::zeros((), DType::F32, dev)?;
                for (f, r) in feats.iter().zip(refs) {
                    a = (a + rel_sq(f, r)?)?;
                }
                Some(a)
            }
            Anchor::L2Sp if config.anchor_weight > 0.0 => {
                let mut a = Tensor::zeros((), DType::F32, dev)?;
                for ((_, v), w0) in self.vars.iter().zip(&self.start) {
                    a = (a + (v.as_tensor() - w0)?.sqr()?.sum_all()?)?;
                }
                Some((a * 0.5)?)
            }
            _ => None,
        })
    }
}

fn rel_sq(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let num = (a - b)?.sqr()?.sum_all()?;
    let den = b.sqr()?.sum_all()?.detach();
    Ok(num.broadcast_div(&(den + 1e-12)?)?)
}

/// The variables of a `VarMap`, sorted by name (a fixed order for optimisers and checkpoints).
pub(crate) fn sorted_vars(varmap: &candle_nn::VarMap) -> Result<Vec<(String, Var)>> {
    let mut v: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .map_err(|_| Error::Config("pfam: poisoned variable map".into()))?
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(v)
}

pub(crate) fn to_batch(
    items: Vec<Vec<f32>>,
    c: usize,
    h: usize,
    w: usize,
    dev: &Device,
) -> Result<Tensor> {
    let b = items.len();
    Ok(Tensor::from_vec(
        items.into_iter().flatten().collect::<Vec<_>>(),
        (b, c, h, w),
        dev,
    )?)
}

impl Nets {
    /// The trainable copy of `backbone` (its `config.train_layers` as variables), the frozen
    /// reference, PFAM (when configured) and the jigsaw head for `classes` classes.
    pub(crate) fn build(config: &SbmConfig, backbone: &Backbone, classes: usize) -> Result<Self> {
        let dev = backbone.device().clone();
        let mut net = backbone.clone();
        let vars = net.make_trainable(&config.train_layers)?;
        // 4 = no backbone layer trains (PFAM alone, e.g. texture classes).
        let first = config.train_layers.iter().min().copied().unwrap_or(4);
        let ch = backbone.channels();
        let (pfam, pfam_vars) = match &config.pfam {
            Some(pc) => {
                let varmap = candle_nn::VarMap::new();
                let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev).pp("pfam");
                let p = Pfam::new(pc.clone(), [ch[0], ch[1], ch[2]], vb)?;
                (Some(p), sorted_vars(&varmap)?)
            }
            None => (None, Vec::new()),
        };
        let head_channels = if pfam.is_some() {
            ch.iter().sum()
        } else {
            ch[2]
        };
        let head = JigsawHead::new(
            head_channels,
            config.grid,
            classes,
            mix(&[config.seed, 2]),
            &dev,
        )?;
        let start: Vec<Tensor> = vars
            .iter()
            .map(|(_, v)| v.as_tensor().detach().copy())
            .collect::<candle_core::Result<_>>()?;
        Ok(Nets {
            net,
            reference: backbone.clone(),
            head,
            pfam,
            pfam_vars,
            vars,
            start,
            first,
        })
    }
}

//! Where the blocks' parameters come from: a candle `VarBuilder` (trainable `Var`s, created with a
//! seeded PyTorch-default initialisation when the builder does not hold them yet) or a map of
//! saved tensors (a model file), with errors that name the offending tensor.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use tessera_core::{Error, Result};

/// How a fresh parameter is initialised.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Init {
    /// Uniform in `[-bound, bound)`: PyTorch's default for conv/linear weights (kaiming-uniform
    /// with a = √5, i.e. bound = 1/√fan_in) and biases (bound = 1/√fan_in).
    Uniform(f64),
    /// A constant (the attention scale α = 0).
    Const(f64),
}

impl Init {
    /// PyTorch's default for a weight or bias whose layer has `fan_in` inputs.
    pub(crate) fn torch_default(fan_in: usize) -> Self {
        Init::Uniform(1.0 / (fan_in.max(1) as f64).sqrt())
    }

    fn values(self, n: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
        match self {
            Init::Uniform(b) => (0..n).map(|_| rng.random_range(-b..b) as f32).collect(),
            Init::Const(c) => vec![c as f32; n],
        }
    }
}

enum Backing<'a> {
    Vars(VarBuilder<'a>),
    Tensors {
        map: &'a HashMap<String, Tensor>,
        device: Device,
    },
}

/// A parameter source with a dotted name prefix. Cloning with [`Source::pp`] shares the RNG and
/// the record of every parameter handed out (in creation order).
pub(crate) struct Source<'a> {
    backing: Rc<Backing<'a>>,
    prefix: String,
    rng: Rc<RefCell<ChaCha8Rng>>,
    used: Rc<RefCell<Vec<(String, Tensor)>>>,
}

/// What the errors of [`Source::from_tensors`] call the tensor collection.
const ORIGIN: &str = "PFAM tensors";

impl<'a> Source<'a> {
    /// Parameters from `vb` (its prefix is kept); missing ones are created as `Var`s in the
    /// builder's `VarMap` and filled from a ChaCha8 RNG seeded with `seed`.
    pub(crate) fn from_vb(vb: VarBuilder<'a>, seed: u64) -> Self {
        let prefix = vb.prefix();
        Self {
            backing: Rc::new(Backing::Vars(vb.root())),
            prefix,
            rng: Rc::new(RefCell::new(ChaCha8Rng::seed_from_u64(seed))),
            used: Rc::new(RefCell::new(Vec::new())),
        }
    }

    /// Parameters read from `map` under `prefix`, moved to `device` as f32.
    pub(crate) fn from_tensors(
        map: &'a HashMap<String, Tensor>,
        prefix: &str,
        device: &Device,
    ) -> Self {
        Self {
            backing: Rc::new(Backing::Tensors {
                map,
                device: device.clone(),
            }),
            prefix: prefix.trim_end_matches('.').to_string(),
            rng: Rc::new(RefCell::new(ChaCha8Rng::seed_from_u64(0))),
            used: Rc::new(RefCell::new(Vec::new())),
        }
    }

    /// The same source one name level down.
    pub(crate) fn pp(&self, name: &str) -> Self {
        Self {
            backing: self.backing.clone(),
            prefix: self.full(name),
            rng: self.rng.clone(),
            used: self.used.clone(),
        }
    }

    /// The full dotted name of `name` under this prefix (the prefix itself for "").
    pub(crate) fn full(&self, name: &str) -> String {
        crate::join(&self.prefix, name)
    }

    /// The device parameters live on.
    /// Whether the parameters are plain tensors ([`Source::from_tensors`]: a loaded model,
    /// never changed in place) rather than `Var`s that an optimiser updates.
    pub(crate) fn is_frozen(&self) -> bool {
        matches!(&*self.backing, Backing::Tensors { .. })
    }

    pub(crate) fn device(&self) -> Device {
        match &*self.backing {
            Backing::Vars(vb) => vb.device().clone(),
            Backing::Tensors { device, .. } => device.clone(),
        }
    }

    /// Parameter `name` of shape `shape`.
    pub(crate) fn get(&self, shape: &[usize], name: &str, init: Init) -> Result<Tensor> {
        let full = self.full(name);
        let n: usize = shape.iter().product();
        // Always draw, so that every parameter's initial value depends on the seed and its
        // position only, whether or not earlier ones were already present.
        let fresh = init.values(n, &mut self.rng.borrow_mut());
        let t = match &*self.backing {
            Backing::Vars(vb) => {
                if vb.contains_tensor(&full) {
                    vb.get(shape, &full).map_err(|e| {
                        Error::Config(format!(
                            "PFAM parameter '{full}' (expected shape {shape:?}): {e}"
                        ))
                    })?
                } else {
                    let seeded =
                        Tensor::from_vec(fresh, shape, vb.device())?.to_dtype(vb.dtype())?;
                    let t = vb
                        .get_with_hints(shape, &full, candle_nn::Init::Const(0.))
                        .map_err(|e| {
                            Error::Config(format!("PFAM parameter '{full}' ({shape:?}): {e}"))
                        })?;
                    if t.is_variable() {
                        // The builder created a Var (a VarMap backend): fill it in place.
                        Var::from_tensor(&t)?.set(&seeded)?;
                        t
                    } else {
                        seeded
                    }
                }
            }
            Backing::Tensors { map, device } => {
                let t = map.get(&full).ok_or_else(|| {
                    Error::bad_model(
                        ORIGIN,
                        format!(
                            "tensor '{full}' (shape {shape:?}) is missing: were these tensors \
                             saved by a PFAM with the same configuration and channel counts?"
                        ),
                    )
                })?;
                if t.dims() != shape {
                    return Err(Error::bad_model(
                        ORIGIN,
                        format!(
                            "tensor '{full}' has shape {:?}, expected {shape:?} for this \
                             configuration and channel counts",
                            t.dims()
                        ),
                    ));
                }
                t.to_device(device)?.to_dtype(DType::F32)?
            }
        };
        self.used.borrow_mut().push((full, t.clone()));
        Ok(t)
    }

    /// For a tensor-map source: fail on tensors under the prefix that no block asked for (a
    /// saved model whose configuration differs from the one given).
    pub(crate) fn check_no_extra(&self) -> Result<()> {
        let Backing::Tensors { map, .. } = &*self.backing else {
            return Ok(());
        };
        let used: HashSet<String> = self.used.borrow().iter().map(|(n, _)| n.clone()).collect();
        let under = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}.", self.prefix)
        };
        let mut extra: Vec<&String> = map
            .keys()
            .filter(|k| k.starts_with(&under) && !used.contains(*k))
            .collect();
        extra.sort();
        if let Some(first) = extra.first() {
            return Err(Error::bad_model(
                ORIGIN,
                format!(
                    "unexpected tensor '{first}' ({} unused under '{}'): the tensors were saved \
                     with a different PFAM configuration",
                    extra.len(),
                    self.prefix
                ),
            ));
        }
        Ok(())
    }
}

/// `new` (trainable, from a `VarBuilder`) and `load` (from saved tensors) for a block built by
/// `from_source(cfg, channels, &Source)`.
macro_rules! block_constructors {
    ($block:ty, $cfg:ty, $params:literal, $names:literal) => {
        impl $block {
            #[doc = concat!("A trainable block ", $params, " under `vb`'s prefix: parameters the \
                builder's `VarMap` already holds are used as they are; missing ones are created \
                with PyTorch's default initialisation from a ChaCha8 RNG seeded with `seed`.")]
            pub fn new(
                cfg: $cfg,
                channels: usize,
                vb: candle_nn::VarBuilder,
                seed: u64,
            ) -> tessera_core::Result<Self> {
                Self::from_source(cfg, channels, &crate::params::Source::from_vb(vb, seed))
            }

            #[doc = concat!("The block from saved tensors named ", $names, " on `device`; \
                missing, mis-shaped or unexpected tensors are errors that name the tensor.")]
            pub fn load(
                tensors: &std::collections::HashMap<String, candle_core::Tensor>,
                prefix: &str,
                cfg: $cfg,
                channels: usize,
                device: &candle_core::Device,
            ) -> tessera_core::Result<Self> {
                let src = crate::params::Source::from_tensors(tensors, prefix, device);
                let m = Self::from_source(cfg, channels, &src)?;
                src.check_no_extra()?;
                Ok(m)
            }
        }
    };
}

pub(crate) use block_constructors;

//! # tessera-cfa
//!
//! CFA (Lee et al., 2022): coupled-hypersphere-based feature adaptation. A small patch
//! descriptor on top of frozen CNN features is trained so that each normal patch falls inside a
//! hypersphere of radius `r` around its nearest memory-bank centres and away from the others;
//! the anomaly score of a patch is the softmin-weighted distance to its nearest centre.
//!
//! Follows the reference implementation:
//! 1. layer1..3, each averaged over 3×3 (`avg_pool2d(3, 1, 1)`), deeper levels upsampled
//!    (bilinear) to layer1's grid and concatenated (448 channels for ResNet-18);
//! 2. descriptor: CoordConv — two coordinate channels in [−1, 1] (row, column) appended — then
//!    a 1×1 convolution to `C / γ_d` channels;
//! 3. memory bank: the mean descriptor per location over the training set (with the initial
//!    descriptor), reduced by k-means to `HW / γ_c` centres when `γ_c > 1`;
//! 4. loss over the `K + J` nearest centres of every patch (squared distances `d`):
//!    `L = (1/ν)·mean(max(0, d[:K] − r²)) + (1/ν)·mean(max(0, r² − d[J:] − α))`, with
//!    K = J = 3, 1/ν = 1000, α = 0.1, `r` a trained scalar initialised to 1e-5;
//! 5. AdamW with AMSGrad (lr 1e-3, weight decay 5e-4), 30 epochs, batch 4;
//! 6. score: `softmin(d[:K])[0] · d[0]` per patch; the caller upsamples and blurs (σ = 4).
//!
//! Deviations: the reference keeps the epoch with the best *test* AUROC; we never look at test
//! data — training runs for `epochs` epochs or stops when the mean training loss has not improved
//! for `patience` epochs, keeping the descriptor of the epoch with the lowest training loss.
//! Backbone features are computed once and cached (the backbone is frozen, so this changes
//! nothing but the time). Initialisation and shuffling use our seeded ChaCha8 RNG. On the CPU
//! (f32) each training step is fused — search, loss and `∂L/∂φ` per block of rows
//! ([`soft_boundary_grad`]), the descriptor's product and parameter gradients by
//! [`descriptor_forward`] / [`descriptor_backward`] — equal to the tensor form
//! ([`soft_boundary_loss`] + autograd) up to the order of its sums (tested). With one centre
//! per position (`γ_c = 1`), the nearest-centre searches of training and scoring skip tiles of
//! positions whose distance bound rules them out; the neighbours are a full scan's.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use tessera_core::scorer::{FitScorer, Scorer};
//! use tessera_core::FeatureMaps;
//! use tessera_cfa::CfaConfig;
//! let dev = Device::Cpu;
//! let batch = |s: f64| -> tessera_core::Result<FeatureMaps> {
//!     let l1 = (Tensor::rand(0f32, 1., (2, 4, 8, 8), &dev)? + s)?;
//!     let l2 = Tensor::rand(0f32, 1., (2, 6, 4, 4), &dev)?;
//!     let l3 = Tensor::rand(0f32, 1., (2, 8, 2, 2), &dev)?;
//!     Ok(FeatureMaps::new(vec![l1, l2, l3]))
//! };
//! let cfg = CfaConfig { epochs: 2, ..Default::default() };
//! let model = cfg.fit(&mut (0..3).map(|i| batch(i as f64 * 0.1)))?;
//! let raw = model.score(&batch(0.0)?)?;
//! assert_eq!((raw.batch, raw.height, raw.width), (2, 8, 8));
//! assert_eq!(model.history().len(), 2);
//! # Ok::<(), tessera_core::Error>(())
//! ```

mod centres;
mod config;
mod descriptor;
pub mod kmeans;
mod loss;
mod model;
mod partition;
mod step;
mod train;

pub use centres::{nearest_centres, nearest_centres_tensor_ops};
pub use config::CfaConfig;
pub use descriptor::{coords, descriptor, embed, rows_with_coords};
pub use loss::soft_boundary_loss;
pub use model::Cfa;
pub use step::{descriptor_backward, descriptor_forward, soft_boundary_grad, LossGrad};
pub use train::{EpochStats, FeatureTransform, TrainProgress};

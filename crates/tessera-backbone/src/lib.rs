//! # tessera-backbone
//!
//! ResNet-18/34/50 and Wide-ResNet-50-2 feature extractors returning the outputs of layer1,
//! layer2 and layer3 — the paper's X1, X2, X3 — in candle.
//!
//! - Tensor names follow torchvision/timm (`conv1.weight`, `bn1.*`, `layerK.i.convJ.weight`,
//!   `layerK.i.bnJ.*`, `layerK.0.downsample.{0,1}.*`), so their checkpoints load without renaming.
//!   Only what is needed is read: files truncated after layer3 load, layer4/fc are ignored.
//! - Batch norm runs in eval mode and is folded into the preceding convolution at load time
//!   (`w' = w·γ/√(σ²+ε)`, `b' = β − μ·γ/√(σ²+ε)`), which is exact and saves a pass per layer.
//! - On the CPU the forward pass runs channels-last through `tessera-conv`'s packed kernels
//!   (weights packed once per model, Winograd for 3×3 stride-1 layers, fused bias + residual +
//!   ReLU); trainable layers run the differentiable NHWC ops. `TESSERA_CONV=stock` selects
//!   candle's own conv2d, `TESSERA_CONV=direct` disables Winograd (A/B checks).
//!   [`Backbone::set_precision`]`(Precision::Bf16)` runs the products in bf16 (sums in f32) on
//!   CPUs with native bf16 dot products (AVX512-BF16), f32 elsewhere.
//! - Weights come from a local `.safetensors` file, from the Hugging Face hub through `hf-hub`
//!   (cache and `HF_HOME`/`HF_HUB_OFFLINE` honoured), or from a seeded random initialisation
//!   (for demos and tests only).
//!
//! ```
//! use tessera_backbone::{Arch, Backbone, WeightsSource};
//! let dev = candle_core::Device::Cpu;
//! let net = Backbone::load(Arch::ResNet18, &WeightsSource::Random { seed: 0 }, 3, &dev)?;
//! let x = candle_core::Tensor::zeros((1, 3, 64, 64), candle_core::DType::F32, &dev)?;
//! let f = net.forward(&x)?;
//! assert_eq!(f.channels(), vec![64, 128, 256]);
//! assert_eq!(f.levels[0].dims(), &[1, 64, 16, 16]);
//! # Ok::<(), tessera_core::Error>(())
//! ```

mod arch;
mod hub;
mod resnet;

pub use arch::{Arch, ArchSpec, BlockKind};
pub use hub::{hub_weights, HubSpec};
pub use resnet::{random_weights, Backbone, Precision, WeightsSource};

/// Whether this CPU runs [`Precision::Bf16`] natively (AVX512-BF16); f32 is used elsewhere.
pub fn bf16_supported() -> bool {
    tessera_conv::bf16::supported()
}

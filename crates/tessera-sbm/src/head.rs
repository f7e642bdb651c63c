//! The jigsaw classifier: layer3 pooled to the n×n tile grid, flattened, one linear layer.

use crate::jigsaw::adaptive_pool_matrix;
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use tessera_core::{Error, Result};

/// Linear classifier over a feature map pooled to the `grid × grid` tiles. Pooling per tile
/// (not globally) keeps *where* each tile's content sits, which is what the task asks.
#[derive(Debug, Clone)]
pub struct JigsawHead {
    grid: usize,
    channels: usize,
    weight: Var,
    bias: Var,
}

impl JigsawHead {
    /// A new head, initialised as PyTorch's `nn.Linear` (uniform ±1/√fan_in), from `seed`.
    pub fn new(
        channels: usize,
        grid: usize,
        classes: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let fan_in = channels * grid * grid;
        let bound = 1.0 / (fan_in as f32).sqrt();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut draw =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-bound..bound)).collect() };
        let w = Tensor::from_vec(draw(classes * fan_in), (classes, fan_in), device)?;
        let b = Tensor::from_vec(draw(classes), classes, device)?;
        Ok(Self {
            grid,
            channels,
            weight: Var::from_tensor(&w)?,
            bias: Var::from_tensor(&b)?,
        })
    }

    /// Rebuild from stored weight `(classes, channels·grid²)` and bias.
    pub fn from_tensors(grid: usize, weight: &Tensor, bias: &Tensor) -> Result<Self> {
        let (classes, fan_in) = weight.dims2()?;
        if fan_in % (grid * grid) != 0 || bias.dims() != [classes] {
            return Err(Error::Config(format!(
                "jigsaw head tensors {:?} / {:?} do not fit a {grid}×{grid} grid",
                weight.dims(),
                bias.dims()
            )));
        }
        Ok(Self {
            grid,
            channels: fan_in / (grid * grid),
            weight: Var::from_tensor(&weight.to_dtype(DType::F32)?)?,
            bias: Var::from_tensor(&bias.to_dtype(DType::F32)?)?,
        })
    }

    /// The trainable variables (weight, bias).
    pub fn vars(&self) -> Vec<Var> {
        vec![self.weight.clone(), self.bias.clone()]
    }

    /// Weight and bias tensors.
    pub fn tensors(&self) -> (Tensor, Tensor) {
        (
            self.weight.as_tensor().clone(),
            self.bias.as_tensor().clone(),
        )
    }

    /// Logits `(B, classes)` for a `(B, C, H, W)` feature map.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_levels(std::slice::from_ref(x))
    }

    /// Logits for several feature maps (e.g. PFAM's three levels), each pooled to the grid
    /// and concatenated; their channel counts must sum to the head's.
    pub fn forward_levels(&self, xs: &[Tensor]) -> Result<Tensor> {
        let n2 = self.grid * self.grid;
        let mut pooled = Vec::with_capacity(xs.len());
        let mut total = 0;
        for x in xs {
            let (b, c, h, w) = x.dims4()?;
            total += c;
            let pool = Tensor::from_vec(
                adaptive_pool_matrix(h, w, self.grid),
                (h * w, n2),
                x.device(),
            )?;
            pooled.push(
                x.contiguous()?
                    .reshape((b * c, h * w))?
                    .matmul(&pool)?
                    .reshape((b, c * n2))?,
            );
        }
        if total != self.channels {
            return Err(Error::Config(format!(
                "jigsaw head expects {} channels, got {total}",
                self.channels
            )));
        }
        let pooled = Tensor::cat(&pooled, 1)?;
        Ok(pooled
            .matmul(&self.weight.as_tensor().t()?)?
            .broadcast_add(self.bias.as_tensor())?)
    }
}

//! Minimise a quadratic with AdamW (AMSGrad) and SGD-Nesterov, as PyTorch's optimisers would.
//!
//! ```text
//! cargo run -p tessera-optim --example adamw
//! ```

use candle_core::{Device, Tensor, Var};
use candle_nn::Optimizer;
use tessera_optim::{AdamW, AdamWConfig, Sgd, SgdConfig};

fn loss(x: &Var, target: &Tensor) -> candle_core::Result<Tensor> {
    (x.as_tensor() - target)?.sqr()?.sum_all()
}

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let target = Tensor::new(&[3f32, -2., 0.5], &dev)?;
    let x = Var::zeros(3, candle_core::DType::F32, &dev)?;
    let mut opt = AdamW::new(
        vec![x.clone()],
        AdamWConfig {
            lr: 0.1,
            amsgrad: true,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    for _ in 0..300 {
        opt.backward_step(&loss(&x, &target)?)?;
    }
    println!("AdamW (AMSGrad): x = {:?}", x.as_tensor().to_vec1::<f32>()?);
    let y = Var::zeros(3, candle_core::DType::F32, &dev)?;
    let mut sgd = Sgd::new(
        vec![y.clone()],
        SgdConfig {
            lr: 0.05,
            momentum: 0.9,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: true,
        },
    )?;
    for _ in 0..200 {
        sgd.backward_step(&loss(&y, &target)?)?;
    }
    println!("SGD (Nesterov):  y = {:?}", y.as_tensor().to_vec1::<f32>()?);
    Ok(())
}

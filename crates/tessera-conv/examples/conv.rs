//! Tessera's CPU convolution against candle's on a ResNet layer shape: same values, and the
//! time of each.
//!
//! ```text
//! cargo run --release -p tessera-conv --example conv
//! ```

use candle_core::{Device, Tensor};
use std::time::Instant;
use tessera_conv::{conv2d, stock_conv2d, ConvParams};

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1., (8, 64, 56, 56), &dev)?;
    let w = Tensor::randn(0f32, 0.05, (64, 64, 3, 3), &dev)?;
    let b = Tensor::randn(0f32, 0.1, 64, &dev)?;
    let p = ConvParams {
        padding: 1,
        ..Default::default()
    };
    let time = |f: &dyn Fn() -> candle_core::Result<Tensor>| -> candle_core::Result<(Tensor, f64)> {
        f()?; // warm-up
        let t = Instant::now();
        let y = f()?;
        Ok((y, t.elapsed().as_secs_f64() * 1e3))
    };
    let (ours, t_ours) = time(&|| conv2d(&x, &w, Some(&b), p, true))?;
    let (theirs, t_theirs) = time(&|| stock_conv2d(&x, &w, Some(&b), p, true))?;
    let err = (&ours - &theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
    println!(
        "64→64 3×3 on 8×56×56: tessera {t_ours:.1} ms, candle {t_theirs:.1} ms, max |Δ| {err:.2e}"
    );
    Ok(())
}

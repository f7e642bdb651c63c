//! Helpers shared by the workspace's tests (feature `test-util`): tensor comparisons that print
//! what differs, and golden-file loading. Not for production code.

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// `max |a − b|` over all elements (shapes must match).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(candle_core::DType::F32).expect("to f32");
    let b = b.to_dtype(candle_core::DType::F32).expect("to f32");
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("tensor difference")
}

/// `max |a − b| / max |b|`: the error relative to the reference's scale.
pub fn max_rel_err(a: &Tensor, reference: &Tensor) -> f32 {
    let scale = reference
        .to_dtype(candle_core::DType::F32)
        .and_then(|r| r.abs())
        .and_then(|r| r.flatten_all())
        .and_then(|r| r.max(0))
        .and_then(|r| r.to_scalar::<f32>())
        .expect("reference scale");
    max_abs_diff(a, reference) / scale
}

/// `max |b|`.
pub fn max_abs(t: &Tensor) -> f32 {
    t.to_dtype(candle_core::DType::F32)
        .and_then(|r| r.abs())
        .and_then(|r| r.flatten_all())
        .and_then(|r| r.max(0))
        .and_then(|r| r.to_scalar::<f32>())
        .expect("max abs")
}

/// Assert `max |a − b| <= tol · (1 + max |b|)`, naming `what`.
pub fn assert_close(what: &str, a: &Tensor, reference: &Tensor, tol: f32) {
    let err = max_abs_diff(a, reference);
    let scale = max_abs(reference);
    assert!(
        err <= tol * (1.0 + scale),
        "{what}: max abs error {err} (scale {scale}, tolerance {tol})"
    );
}

/// Load a golden `.safetensors` file on the CPU (tests panic with the path when it is missing).
pub fn load_golden(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences() {
        let a = Tensor::new(&[1f32, 2., 3.], &Device::Cpu).unwrap();
        let b = Tensor::new(&[1f32, 2.5, 4.], &Device::Cpu).unwrap();
        assert_eq!(max_abs_diff(&a, &b), 1.0);
        assert_eq!(max_rel_err(&a, &b), 0.25);
        assert_close("same", &a, &a, 0.0);
    }
}

/// A seeded 64-bit linear congruential generator (Knuth's MMIX constants) for reproducible
/// test and bench data: cheap, the same stream on every machine, and easy to restate in a
/// Python golden script. Not for anything that needs statistical quality.
#[derive(Debug, Clone)]
pub struct Lcg(pub u64);

impl Lcg {
    /// The next state (the state itself is the output).
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0
    }

    /// Uniform in `[0, 1)`, from the state's top 24 bits.
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in `[-1, 1)`: `2 · unit − 1`.
    pub fn signed(&mut self) -> f32 {
        self.unit() * 2.0 - 1.0
    }
}

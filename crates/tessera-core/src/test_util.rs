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

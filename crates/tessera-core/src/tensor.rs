//! Small tensor utilities shared by the scorers.

use crate::Result;
use candle_core::Tensor;

/// Run `f` on an f32 tensor's data in row-major order: borrowed in place when the tensor is a
/// contiguous CPU tensor (no copy of large distance blocks), copied otherwise (other devices,
/// strided views).
pub fn with_f32_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    with_f32_slices(&[t], |s| f(s[0]))
}

/// Whether every tensor is f32 on the CPU and not tracked by autograd: the condition for an
/// inference kernel that reads the data in place and builds no graph.
pub fn untracked_cpu_f32(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && !t.track_op())
}

/// [`with_f32_slice`] for several f32 tensors at once, in the order given: each borrowed in
/// place when it is a contiguous CPU tensor, copied to one otherwise.
pub fn with_f32_slices<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Result<R> {
    let cpu = candle_core::Device::Cpu;
    let ts = ts
        .iter()
        .map(|t| t.to_device(&cpu)?.contiguous())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let slices = guards
        .iter()
        .map(
            |(storage, layout)| match (&**storage, layout.contiguous_offsets()) {
                (candle_core::Storage::Cpu(c), Some((a, b))) => Ok(&c.as_slice::<f32>()?[a..b]),
                _ => Err(candle_core::Error::Msg(
                    "with_f32_slices: a contiguous CPU tensor was not contiguous on the CPU".into(),
                )),
            },
        )
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(f(&slices))
}

/// [`with_f32_slice`] for f16 tensors.
pub fn with_f16_slice<R>(t: &Tensor, f: impl FnOnce(&[half::f16]) -> R) -> Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(cpu), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(f(&cpu.as_slice::<half::f16>()?[a..b]));
        }
    }
    let v: Vec<half::f16> = t.flatten_all()?.to_vec1()?;
    Ok(f(&v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn borrows_and_copies_alike() {
        let t = Tensor::arange(0f32, 6., &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let a = with_f32_slice(&t, |s| s.to_vec()).unwrap();
        assert_eq!(a, vec![0., 1., 2., 3., 4., 5.]);
        let tt = t.t().unwrap();
        let b = with_f32_slice(&tt, |s| s.to_vec()).unwrap();
        assert_eq!(b, vec![0., 3., 1., 4., 2., 5.]);
        let n = t.narrow(0, 1, 1).unwrap();
        assert_eq!(
            with_f32_slice(&n, |s| s.to_vec()).unwrap(),
            vec![3., 4., 5.]
        );
    }
}

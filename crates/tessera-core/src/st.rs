//! `.safetensors` files: read through a memory map (each tensor is copied once, straight from
//! the mapped pages, which are released as soon as the tensor is built, so peak memory is the
//! tensors plus one tensor's pages, never the file twice), written atomically without copying
//! the tensors first, and checked on the way in: every float value finite, an optional
//! SHA-256 over the content (names, dtypes, shapes, bytes).

use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

/// The bytes of a tensor in row-major order: borrowed from its storage (a read guard is held)
/// when it is a contiguous CPU tensor, else copied once.
pub enum TensorBytes<'a> {
    Borrowed {
        guard: candle_core::StorageRef<'a>,
        range: (usize, usize),
    },
    Owned(Vec<u8>),
}

impl TensorBytes<'_> {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            TensorBytes::Owned(v) => v,
            TensorBytes::Borrowed { guard, range } => {
                let all = match &**guard {
                    candle_core::Storage::Cpu(cpu) => cpu_bytes(cpu),
                    _ => unreachable!("only CPU storage is borrowed"),
                };
                &all[range.0..range.1]
            }
        }
    }
}

fn cpu_bytes(cpu: &candle_core::CpuStorage) -> &[u8] {
    use candle_core::CpuStorage as C;
    match cpu {
        C::F32(v) => as_bytes(v),
        C::F16(v) => as_bytes(v),
        C::BF16(v) => as_bytes(v),
        C::F64(v) => as_bytes(v),
        C::U32(v) => as_bytes(v),
        C::I64(v) => as_bytes(v),
        C::I32(v) => as_bytes(v),
        C::I16(v) => as_bytes(v),
        C::U8(v) => v,
        _ => &[],
    }
}

/// The bytes of `t` (see [`TensorBytes`]).
pub fn tensor_bytes(t: &Tensor) -> Result<TensorBytes<'_>> {
    let size = t.dtype().size_in_bytes();
    let (guard, layout) = t.storage_and_layout();
    if let (candle_core::Storage::Cpu(cpu), Some((a, b))) = (&*guard, layout.contiguous_offsets()) {
        if cpu_bytes(cpu).len() >= b * size {
            return Ok(TensorBytes::Borrowed {
                range: (a * size, b * size),
                guard,
            });
        }
    }
    drop(guard);
    let c = t.to_device(&Device::Cpu)?.contiguous()?;
    let bytes = tensor_bytes(&c)?.as_slice().to_vec();
    Ok(TensorBytes::Owned(bytes))
}

fn as_bytes<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: plain numeric types without padding, viewed as bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

fn st_dtype(d: DType) -> Result<safetensors::Dtype> {
    Ok(match d {
        DType::F32 => safetensors::Dtype::F32,
        DType::F16 => safetensors::Dtype::F16,
        DType::BF16 => safetensors::Dtype::BF16,
        DType::F64 => safetensors::Dtype::F64,
        DType::U32 => safetensors::Dtype::U32,
        DType::U8 => safetensors::Dtype::U8,
        DType::I64 => safetensors::Dtype::I64,
        other => return Err(Error::Config(format!("cannot store a {other:?} tensor"))),
    })
}

fn candle_dtype(d: safetensors::Dtype) -> Option<DType> {
    Some(match d {
        safetensors::Dtype::F32 => DType::F32,
        safetensors::Dtype::F16 => DType::F16,
        safetensors::Dtype::BF16 => DType::BF16,
        safetensors::Dtype::F64 => DType::F64,
        safetensors::Dtype::U32 => DType::U32,
        safetensors::Dtype::U8 => DType::U8,
        safetensors::Dtype::I64 => DType::I64,
        _ => return None,
    })
}

/// `(offset, chunk)` pieces of at most 16 MiB (a multiple of every element size).
fn chunks(bytes: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    const CHUNK: usize = 16 << 20;
    bytes.chunks(CHUNK).enumerate().map(|(i, c)| (i * CHUNK, c))
}

/// A tensor as safetensors sees it, borrowing its bytes.
struct Raw<'a> {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: TensorBytes<'a>,
}

impl safetensors::View for &Raw<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.data.as_slice())
    }
    fn data_len(&self) -> usize {
        self.data.as_slice().len()
    }
}

/// The content hash of a set of tensors: SHA-256 over every tensor in name order (name, dtype,
/// shape, bytes), as lowercase hex. Independent of the file layout.
pub struct ContentHash(Sha256);

impl Default for ContentHash {
    fn default() -> Self {
        Self(Sha256::new())
    }
}

impl ContentHash {
    /// Add one tensor (call in name order).
    pub fn update(&mut self, name: &str, dtype: &str, shape: &[usize], bytes: &[u8]) {
        self.header(name, dtype, shape, bytes.len());
        self.data(bytes);
    }
    /// Start a tensor of `len` bytes; its bytes follow through [`ContentHash::data`].
    pub fn header(&mut self, name: &str, dtype: &str, shape: &[usize], len: usize) {
        self.0.update((name.len() as u64).to_le_bytes());
        self.0.update(name.as_bytes());
        self.0.update(dtype.as_bytes());
        self.0.update((shape.len() as u64).to_le_bytes());
        for d in shape {
            self.0.update((*d as u64).to_le_bytes());
        }
        self.0.update((len as u64).to_le_bytes());
    }
    /// More bytes of the current tensor.
    pub fn data(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    /// The hex digest.
    pub fn finish(self) -> String {
        self.0
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// Whether every value of a float tensor's bytes is finite; `Some(index)` of the first that is
/// not. Integer dtypes are always fine.
pub fn first_non_finite(dtype: DType, bytes: &[u8]) -> Option<usize> {
    fn scan<T: Copy>(bytes: &[u8], ok: impl Fn(T) -> bool) -> Option<usize> {
        let n = bytes.len() / std::mem::size_of::<T>();
        (0..n).find(|&i| {
            // SAFETY: i < n, reads are unaligned-safe.
            let v: T = unsafe { std::ptr::read_unaligned((bytes.as_ptr() as *const T).add(i)) };
            !ok(v)
        })
    }
    match dtype {
        DType::F32 => {
            // Fast path: an aligned slice scans vectorised.
            if (bytes.as_ptr() as usize).is_multiple_of(4) {
                let v: &[f32] = unsafe {
                    std::slice::from_raw_parts(bytes.as_ptr() as *const f32, bytes.len() / 4)
                };
                if v.iter().all(|x| x.is_finite()) {
                    return None;
                }
                return v.iter().position(|x| !x.is_finite());
            }
            scan::<f32>(bytes, f32::is_finite)
        }
        DType::F64 => scan::<f64>(bytes, f64::is_finite),
        DType::F16 => scan::<u16>(bytes, |b| (b & 0x7c00) != 0x7c00),
        DType::BF16 => scan::<u16>(bytes, |b| (b & 0x7f80) != 0x7f80),
        _ => None,
    }
}

/// Check that a tensor holds only finite values; the error names `origin` and the tensor.
pub fn check_finite(t: &Tensor, origin: &Path, name: &str) -> Result<()> {
    let bytes = tensor_bytes(t)?;
    match first_non_finite(t.dtype(), bytes.as_slice()) {
        None => Ok(()),
        Some(i) => Err(Error::bad_model(
            origin,
            format!(
                "tensor '{name}' holds a non-finite value (NaN or infinity) at element {i}: \
                 the file is corrupt or was written by a run that diverged"
            ),
        )),
    }
}

/// Write named tensors and string metadata as one `.safetensors` file, atomically (see
/// [`crate::io::replace_atomic`]). Tensors are not copied when they are contiguous CPU
/// tensors. Returns the content hash ([`ContentHash`]) of what was written when `hash` is set.
pub fn write(
    path: &Path,
    tensors: &[(&str, &Tensor)],
    mut metadata: HashMap<String, String>,
    hash_key: Option<&str>,
) -> Result<Option<String>> {
    let mut items: Vec<(&str, Raw<'_>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        items.push((
            name,
            Raw {
                dtype: st_dtype(t.dtype())?,
                shape: t.dims().to_vec(),
                data: tensor_bytes(t)?,
            },
        ));
    }
    items.sort_by(|a, b| a.0.cmp(b.0));
    let digest = hash_key.map(|key| {
        let mut h = ContentHash::default();
        for (name, r) in &items {
            h.update(name, &format!("{:?}", r.dtype), &r.shape, r.data.as_slice());
        }
        let d = h.finish();
        metadata.insert(key.to_string(), d.clone());
        d
    });
    crate::io::replace_atomic(path, |tmp| {
        safetensors::serialize_to_file(items.iter().map(|(k, v)| (*k, v)), Some(metadata), tmp)
            .map_err(std::io::Error::other)
    })?;
    Ok(digest)
}

/// A `.safetensors` file mapped into memory.
pub struct Mapped {
    path: std::path::PathBuf,
    map: memmap2::Mmap,
    /// Byte offset of the data section.
    data_start: usize,
    metadata: HashMap<String, String>,
}

/// How [`Mapped::load`] checks what it reads.
#[derive(Debug, Clone, Default)]
pub struct LoadChecks {
    /// Refuse a float tensor holding NaN or infinity.
    pub finite: bool,
    /// Verify this hex content hash ([`ContentHash`]) over *all* tensors of the file.
    pub expect_hash: Option<String>,
}

impl Mapped {
    /// Map a file and parse its header. The errors name the file.
    pub fn open(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_dir() {
            return Err(Error::bad_input(
                path,
                "is a folder, not a .safetensors file",
            ));
        }
        if !meta.is_file() {
            return Err(Error::bad_input(
                path,
                "is not a regular file (a device, pipe or socket)",
            ));
        }
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        if meta.len() < 8 {
            return Err(Error::bad_model(
                path,
                "not a safetensors file (shorter than its 8-byte header length)",
            ));
        }
        // SAFETY: the map is read-only; Tessera replaces files by rename, never in place, so
        // the mapped inode does not change under us.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (n, header) = safetensors::SafeTensors::read_metadata(&map)
            .map_err(|e| Error::bad_model(path, format!("not a safetensors file ({e})")))?;
        // Validate every tensor's offsets against the file once, here.
        safetensors::SafeTensors::deserialize(&map)
            .map_err(|e| Error::bad_model(path, format!("not a safetensors file ({e})")))?;
        let metadata = header.metadata().clone().unwrap_or_default();
        Ok(Self {
            path: path.to_path_buf(),
            map,
            data_start: 8 + n,
            metadata,
        })
    }

    /// The header's string metadata.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// The tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let st = self.view();
        let mut v: Vec<String> = st.names().into_iter().map(str::to_string).collect();
        v.sort();
        v
    }

    fn view(&self) -> safetensors::SafeTensors<'_> {
        safetensors::SafeTensors::deserialize(&self.map).expect("validated in open")
    }

    /// Load the tensors whose name `keep` accepts onto `device`, checking them as asked. Every
    /// tensor of the file is hashed when a hash is expected (a corrupt tensor that is not
    /// loaded still fails the check).
    pub fn load(
        &self,
        device: &Device,
        keep: impl Fn(&str) -> bool,
        checks: &LoadChecks,
    ) -> Result<HashMap<String, Tensor>> {
        let path = &self.path;
        let st = self.view();
        let mut names: Vec<&str> = st.names();
        names.sort();
        let mut hash = checks.expect_hash.as_ref().map(|_| ContentHash::default());
        let mut out = HashMap::new();
        for name in names {
            let view = st
                .tensor(name)
                .map_err(|e| Error::bad_model(path, format!("tensor '{name}': {e}")))?;
            let bytes = view.data();
            let keep_it = keep(name);
            let dtype = candle_dtype(view.dtype());
            if keep_it && dtype.is_none() {
                return Err(Error::bad_model(
                    path,
                    format!(
                        "tensor '{name}' has the unsupported type {:?}",
                        view.dtype()
                    ),
                ));
            }
            if let Some(h) = hash.as_mut() {
                h.header(
                    name,
                    &format!("{:?}", view.dtype()),
                    view.shape(),
                    bytes.len(),
                );
            }
            // One pass over the mapped bytes, a chunk at a time: hash, check, copy, release.
            let mut visit = |chunk: &[u8], offset: usize| -> Result<()> {
                if let Some(h) = hash.as_mut() {
                    h.data(chunk);
                }
                if let (true, Some(d)) = (keep_it && checks.finite, dtype) {
                    if let Some(i) = first_non_finite(d, chunk) {
                        return Err(Error::bad_model(
                            path,
                            format!(
                                "tensor '{name}' holds a non-finite value (NaN or infinity) at \
                                 element {}: the file is corrupt or was written by a run that \
                                 diverged",
                                offset / d.size_in_bytes() + i
                            ),
                        ));
                    }
                }
                Ok(())
            };
            let Some(dtype) = dtype.filter(|_| keep_it) else {
                for (off, chunk) in chunks(bytes) {
                    visit(chunk, off)?;
                    self.release(chunk);
                }
                continue;
            };
            let shape = view.shape();
            let t = match dtype {
                DType::F32 => self.copy_out::<f32>(bytes, shape, device, &mut visit),
                DType::F16 => self.copy_out::<half::f16>(bytes, shape, device, &mut visit),
                DType::BF16 => self.copy_out::<half::bf16>(bytes, shape, device, &mut visit),
                DType::F64 => self.copy_out::<f64>(bytes, shape, device, &mut visit),
                DType::U32 => self.copy_out::<u32>(bytes, shape, device, &mut visit),
                DType::U8 => self.copy_out::<u8>(bytes, shape, device, &mut visit),
                DType::I64 => self.copy_out::<i64>(bytes, shape, device, &mut visit),
                other => Err(Error::bad_model(
                    path,
                    format!("tensor '{name}' has the unsupported type {other:?}"),
                )),
            }
            .map_err(|e| e.in_file(path))?;
            out.insert(name.to_string(), t);
        }
        if let (Some(h), Some(want)) = (hash, checks.expect_hash.as_deref()) {
            let got = h.finish();
            if got != want {
                return Err(Error::bad_model(
                    path,
                    format!(
                        "checksum mismatch: the tensors hash to {got}, the header says {want}; \
                         the file is corrupt (truncated, edited or damaged on disk)"
                    ),
                ));
            }
        }
        Ok(out)
    }

    /// Copy a tensor out of the map into a typed buffer, chunk by chunk (each chunk visited
    /// first, then released), so the mapped pages never add up to a second copy.
    fn copy_out<T: candle_core::WithDType>(
        &self,
        bytes: &[u8],
        shape: &[usize],
        device: &Device,
        visit: &mut dyn FnMut(&[u8], usize) -> Result<()>,
    ) -> Result<Tensor> {
        let size = std::mem::size_of::<T>();
        if !bytes.len().is_multiple_of(size) {
            return Err(Error::Config(format!(
                "{} bytes are not a whole number of {size}-byte values",
                bytes.len()
            )));
        }
        let n = bytes.len() / size;
        let mut v: Vec<T> = Vec::with_capacity(n);
        let dst = v.as_mut_ptr() as *mut u8;
        for (off, chunk) in chunks(bytes) {
            visit(chunk, off)?;
            // SAFETY: `off + chunk.len() <= n * size`, the capacity of `v`; the source is the
            // read-only map, which never overlaps a fresh allocation.
            unsafe { std::ptr::copy_nonoverlapping(chunk.as_ptr(), dst.add(off), chunk.len()) };
            self.release(chunk);
        }
        // SAFETY: every byte of the n values was written above.
        unsafe { v.set_len(n) };
        Ok(Tensor::from_vec(v, shape, device)?)
    }

    /// Drop the mapped pages of a tensor already copied (they would otherwise stay resident
    /// until the map is closed).
    fn release(&self, bytes: &[u8]) {
        let base = self.map.as_ptr() as usize;
        let start = bytes.as_ptr() as usize - base;
        // Whole pages inside the range only.
        let page = 4096;
        let a = start.div_ceil(page) * page;
        let b = (start + bytes.len()) / page * page;
        if b > a && a >= self.data_start.saturating_sub(page) {
            // SAFETY: a read-only shared mapping of a file: dropped pages read back from the
            // file if touched again.
            let _ = unsafe {
                self.map
                    .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, a, b - a)
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_map_and_check() {
        let dir = tempfile_dir("st");
        let p = dir.join("t.safetensors");
        let a = Tensor::arange(0f32, 6., &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let b = Tensor::new(&[1u32, 2], &Device::Cpu).unwrap();
        let digest = write(&p, &[("a", &a), ("b", &b)], HashMap::new(), Some("h"))
            .unwrap()
            .unwrap();
        let m = Mapped::open(&p).unwrap();
        assert_eq!(m.metadata()["h"], digest);
        let checks = LoadChecks {
            finite: true,
            expect_hash: Some(digest.clone()),
        };
        let t = m.load(&Device::Cpu, |_| true, &checks).unwrap();
        // A wrong hash is refused.
        let wrong = LoadChecks {
            finite: true,
            expect_hash: Some("00".repeat(32)),
        };
        let e = m
            .load(&Device::Cpu, |_| true, &wrong)
            .unwrap_err()
            .to_string();
        assert!(e.contains("checksum mismatch"), "{e}");
        assert_eq!(t["a"].to_vec2::<f32>().unwrap()[1], vec![3., 4., 5.]);
        assert_eq!(t["b"].to_vec1::<u32>().unwrap(), vec![1, 2]);
        // A strided view is written as its logical content.
        let at = a.t().unwrap();
        write(&p, &[("a", &at)], HashMap::new(), None).unwrap();
        let t = Mapped::open(&p)
            .unwrap()
            .load(&Device::Cpu, |_| true, &LoadChecks::default())
            .unwrap();
        assert_eq!(t["a"].to_vec2::<f32>().unwrap()[0], vec![0., 3.]);
        // NaN is refused, naming the tensor.
        let bad = Tensor::new(&[1f32, f32::NAN], &Device::Cpu).unwrap();
        write(&p, &[("stats.mean", &bad)], HashMap::new(), None).unwrap();
        let e = Mapped::open(&p)
            .unwrap()
            .load(
                &Device::Cpu,
                |_| true,
                &LoadChecks {
                    finite: true,
                    expect_hash: None,
                },
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("stats.mean") && e.contains("non-finite"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn non_finite_in_every_float_type() {
        // f16 +inf is 0x7c00, 65504 (the largest finite) 0x7bff; bf16 NaN 0x7fc0.
        assert_eq!(
            first_non_finite(DType::F16, &0x7c00u16.to_le_bytes()),
            Some(0)
        );
        assert_eq!(first_non_finite(DType::F16, &0x7bffu16.to_le_bytes()), None);
        assert_eq!(
            first_non_finite(DType::BF16, &0x7fc0u16.to_le_bytes()),
            Some(0)
        );
        let mut f64s = 1f64.to_le_bytes().to_vec();
        f64s.extend(f64::NEG_INFINITY.to_le_bytes());
        assert_eq!(first_non_finite(DType::F64, &f64s), Some(1));
        assert_eq!(first_non_finite(DType::U32, &[255; 8]), None);
    }

    fn tempfile_dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("tessera-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}

//! Cutting a CHW image into n×n tiles and reassembling them in a permuted order.

/// Rearrange the tiles of a `c × h × w` image: output tile `i` (row-major) is input tile
/// `perm[i]`. Tiles are `⌊h/n⌋ × ⌊w/n⌋`; the few rows/columns beyond `n` whole tiles (224 px
/// with n = 3 leaves 2) stay in place, so every tile keeps its exact content and size.
pub fn permute_tiles(chw: &[f32], c: usize, h: usize, w: usize, perm: &[u8]) -> Vec<f32> {
    let n = (perm.len() as f64).sqrt().round() as usize;
    debug_assert_eq!(n * n, perm.len());
    debug_assert_eq!(chw.len(), c * h * w);
    let (th, tw) = (h / n, w / n);
    let mut out = chw.to_vec();
    for (dst, &src) in perm.iter().enumerate() {
        let src = src as usize;
        if src == dst {
            continue;
        }
        let (dy, dx) = ((dst / n) * th, (dst % n) * tw);
        let (sy, sx) = ((src / n) * th, (src % n) * tw);
        for ch in 0..c {
            let plane = ch * h * w;
            for r in 0..th {
                let d = plane + (dy + r) * w + dx;
                let s = plane + (sy + r) * w + sx;
                out[d..d + tw].copy_from_slice(&chw[s..s + tw]);
            }
        }
    }
    out
}

/// The `(h·w) × (n·n)` matrix of PyTorch's `adaptive_avg_pool2d` from `h × w` to `n × n`
/// (bin `i` spans `⌊i·h/n⌋ .. ⌈(i+1)·h/n⌉`), so pooling is one differentiable matmul.
pub fn adaptive_pool_matrix(h: usize, w: usize, n: usize) -> Vec<f32> {
    let bins = |len: usize, i: usize| (i * len / n, ((i + 1) * len).div_ceil(n));
    let mut m = vec![0f32; h * w * n * n];
    for by in 0..n {
        let (y0, y1) = bins(h, by);
        for bx in 0..n {
            let (x0, x1) = bins(w, bx);
            let inv = 1.0 / ((y1 - y0) * (x1 - x0)) as f32;
            for y in y0..y1 {
                for x in x0..x1 {
                    m[(y * w + x) * n * n + by * n + bx] = inv;
                }
            }
        }
    }
    m
}

//! Seeded k-means (k-means++ initialisation, Lloyd iterations), for CFA's memory compression
//! (`γ_c > 1`; the reference uses scikit-learn's KMeans).

use rayon::prelude::*;

fn sq(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Cluster the rows of `points` (`n × dim`) into `k` centres; returns `k × dim` centres.
pub fn kmeans(points: &[f32], dim: usize, k: usize, iters: usize, seed: u64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let n = points.len() / dim;
    let k = k.min(n).max(1);
    let row = |i: usize| &points[i * dim..(i + 1) * dim];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x6b6d_6561_6e73);
    let mut centres: Vec<f32> = row(rng.random_range(0..n)).to_vec();
    let mut d2: Vec<f32> = (0..n)
        .into_par_iter()
        .map(|i| sq(row(i), &centres[..dim]))
        .collect();
    while centres.len() / dim < k {
        let total: f64 = d2.iter().map(|&v| v as f64).sum();
        let pick = if total > 0.0 {
            let mut t = rng.random_range(0.0..total);
            let mut p = n - 1;
            for (i, &v) in d2.iter().enumerate() {
                t -= v as f64;
                if t <= 0.0 {
                    p = i;
                    break;
                }
            }
            p
        } else {
            rng.random_range(0..n)
        };
        let c = row(pick).to_vec();
        d2.par_iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = v.min(sq(row(i), &c)));
        centres.extend(c);
    }
    for _ in 0..iters {
        let assign: Vec<usize> = (0..n)
            .into_par_iter()
            .map(|i| {
                (0..k)
                    .map(|j| (sq(row(i), &centres[j * dim..(j + 1) * dim]), j))
                    .min_by(|a, b| a.0.total_cmp(&b.0))
                    .expect("k ≥ 1")
                    .1
            })
            .collect();
        let mut sums = vec![0f64; k * dim];
        let mut counts = vec![0usize; k];
        for (i, &a) in assign.iter().enumerate() {
            counts[a] += 1;
            for (s, &v) in sums[a * dim..(a + 1) * dim].iter_mut().zip(row(i)) {
                *s += v as f64;
            }
        }
        let mut moved = false;
        for j in 0..k {
            if counts[j] == 0 {
                continue; // keep an empty cluster's centre where it is
            }
            for t in 0..dim {
                let v = (sums[j * dim + t] / counts[j] as f64) as f32;
                moved |= v != centres[j * dim + t];
                centres[j * dim + t] = v;
            }
        }
        if !moved {
            break;
        }
    }
    centres
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_separated_blobs() {
        let mut pts = Vec::new();
        for (cx, cy) in [(0.0f32, 0.0f32), (10.0, 0.0), (0.0, 10.0)] {
            for i in 0..20 {
                pts.extend([cx + (i % 5) as f32 * 0.1, cy + (i / 5) as f32 * 0.1]);
            }
        }
        let c = kmeans(&pts, 2, 3, 50, 1);
        let mut got: Vec<(i32, i32)> = c
            .chunks(2)
            .map(|p| (p[0].round() as i32, p[1].round() as i32))
            .collect();
        got.sort();
        assert_eq!(got, vec![(0, 0), (0, 10), (10, 0)]);
        assert_eq!(kmeans(&pts, 2, 3, 50, 1), c, "seeded");
    }
}

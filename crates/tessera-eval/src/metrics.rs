//! Exact threshold-free metrics: ROC AUC (Mann–Whitney with exact tie handling) and the best F1
//! over all thresholds.
//!
//! Both work by sorting once (`O(n log n)`, parallel via rayon) and sweeping groups of tied
//! scores, so pooled pixel metrics over millions of pixels take well under a second in release
//! builds.
//!
//! # NaN and signed zero
//!
//! A NaN score has no place in a ranking, so any NaN makes these functions return `None`
//! (callers that pool pixels report the metric as undefined). `-0.0` and `0.0` are treated as
//! the same score (tied), as `==` and scikit-learn do.

use rayon::prelude::*;

/// Order-preserving map from a non-NaN `f32` to a `u32`: `a < b` ⇔ `key(a) < key(b)`, and
/// `-0.0`/`0.0` share a key.
#[inline]
pub(crate) fn score_key(s: f32) -> u32 {
    let s = if s == 0.0 { 0.0 } else { s };
    let b = s.to_bits();
    if b >> 31 == 1 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// Inverse of [`score_key`].
#[inline]
pub(crate) fn key_score(k: u32) -> f32 {
    if k >> 31 == 1 {
        f32::from_bits(k & 0x7fff_ffff)
    } else {
        f32::from_bits(!k)
    }
}

/// Pack one (score, label) pair into a sortable `u64`: score key in the high bits, label in bit 0.
/// `None` for NaN.
#[inline]
pub(crate) fn pack(score: f32, label: bool) -> Option<u64> {
    if score.is_nan() {
        None
    } else {
        Some(((score_key(score) as u64) << 1) | label as u64)
    }
}

/// Pack a whole score/label slice; `None` if any score is NaN.
pub(crate) fn pack_all(scores: &[f32], labels: &[bool]) -> Option<Vec<u64>> {
    assert_eq!(
        scores.len(),
        labels.len(),
        "scores and labels must have the same length"
    );
    scores
        .par_iter()
        .zip(labels.par_iter())
        .with_min_len(1 << 14)
        .map(|(&s, &l)| pack(s, l))
        .collect()
}

/// Metrics computed from one sorted pool of packed keys.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PoolStats {
    pub(crate) positives: u64,
    pub(crate) auroc: Option<f64>,
    pub(crate) f1: Option<(f64, f32)>,
}

/// Sort packed keys (in place) and compute AUROC and F1-max in one pass each.
pub(crate) fn pool_stats(keys: &mut [u64], want_f1: bool) -> PoolStats {
    keys.par_sort_unstable();
    sorted_stats(keys, 1, want_f1)
}

/// AUROC and F1-max of keys sorted by `key >> shift` (the score key), label in bit 0: packed
/// pairs ([`pack`], shift 1) or a pixel pool (`crate::pro::Pool`, shift 32).
pub(crate) fn sorted_stats(keys: &[u64], shift: u32, want_f1: bool) -> PoolStats {
    let positives = keys.iter().filter(|&&k| k & 1 == 1).count() as u64;
    PoolStats {
        positives,
        auroc: auroc_sorted(keys, shift, positives),
        f1: if want_f1 {
            f1_sorted(keys, shift, positives)
        } else {
            None
        },
    }
}

/// Walk groups of equal scores in ascending order, yielding (score key, positives, negatives).
fn groups(keys: &[u64], shift: u32) -> impl DoubleEndedIterator<Item = (u32, u64, u64)> + '_ {
    keys.chunk_by(move |a, b| a >> shift == b >> shift)
        .map(move |g| {
            let pos = g.iter().filter(|&&k| k & 1 == 1).count() as u64;
            ((g[0] >> shift) as u32, pos, g.len() as u64 - pos)
        })
}

fn auroc_sorted(keys: &[u64], shift: u32, positives: u64) -> Option<f64> {
    let negatives = keys.len() as u64 - positives;
    if positives == 0 || negatives == 0 {
        return None;
    }
    // Twice the Mann–Whitney U statistic, kept exact in integers: each positive beats every
    // negative strictly below it (2 points) and ties with each negative of equal score (1 point).
    let mut neg_below: u128 = 0;
    let mut twice_u: u128 = 0;
    for (_, p, q) in groups(keys, shift) {
        twice_u += p as u128 * (2 * neg_below + q as u128);
        neg_below += q as u128;
    }
    Some(twice_u as f64 / (2.0 * positives as f64 * negatives as f64))
}

fn f1_sorted(keys: &[u64], shift: u32, positives: u64) -> Option<(f64, f32)> {
    if positives == 0 {
        return None;
    }
    let (mut tp, mut fp) = (0u64, 0u64);
    let mut best: Option<(f64, f32)> = None;
    // Descending thresholds: predicting "anomalous" for score >= threshold admits whole groups.
    for (k, p, q) in groups(keys, shift).rev() {
        tp += p;
        fp += q;
        // F1 = 2TP / (2TP + FP + FN) = 2TP / (TP + FP + P).
        let f1 = 2.0 * tp as f64 / (tp + fp + positives) as f64;
        if best.is_none_or(|(b, _)| f1 > b) {
            best = Some((f1, key_score(k)));
        }
    }
    best
}

/// Exact area under the ROC curve.
///
/// Equivalent to scikit-learn's `roc_auc_score`: the Mann–Whitney U statistic with average
/// ranks, so a positive and a negative with equal scores count ½. `labels[i]` is `true` for the
/// positive (anomalous) class; higher scores mean "more anomalous".
///
/// Returns `None` when either class is absent or any score is NaN. Runs in `O(n log n)`.
///
/// # Panics
///
/// If `scores` and `labels` differ in length.
///
/// ```
/// use tessera_eval::auroc;
/// let auc = auroc(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true]).unwrap();
/// assert!((auc - 0.75).abs() < 1e-12);
/// assert_eq!(auroc(&[0.5, 0.5], &[true, true]), None);
/// ```
pub fn auroc(scores: &[f32], labels: &[bool]) -> Option<f64> {
    let mut keys = pack_all(scores, labels)?;
    pool_stats(&mut keys, false).auroc
}

/// The best F1 score over every distinct threshold, and the threshold achieving it.
///
/// A sample is predicted anomalous when `score >= threshold`; thresholds range over the distinct
/// scores, so the result is exact. When several thresholds reach the same best F1, the highest
/// one is returned. Returns `None` for empty input, when there are no positives (F1 is
/// undefined), or when any score is NaN.
///
/// # Panics
///
/// If `scores` and `labels` differ in length.
///
/// ```
/// use tessera_eval::f1_max;
/// let (f1, t) = f1_max(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true]).unwrap();
/// assert!((f1 - 0.8).abs() < 1e-12); // threshold 0.35: TP 2, FP 1, FN 0
/// assert_eq!(t, 0.35);
/// ```
pub fn f1_max(scores: &[f32], labels: &[bool]) -> Option<(f64, f32)> {
    let mut keys = pack_all(scores, labels)?;
    pool_stats(&mut keys, true).f1
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_core::test_util::Lcg;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn key_roundtrip_and_order() {
        let xs = [
            f32::NEG_INFINITY,
            -3.5,
            -1e-30,
            -0.0,
            0.0,
            1e-30,
            0.25,
            7.0,
            f32::INFINITY,
        ];
        for w in xs.windows(2) {
            assert!(score_key(w[0]) <= score_key(w[1]), "{w:?}");
        }
        assert_eq!(score_key(-0.0), score_key(0.0));
        for &x in &xs {
            assert_eq!(key_score(score_key(x)), if x == 0.0 { 0.0 } else { x });
        }
    }

    #[test]
    fn auroc_hand_cases() {
        let f = false;
        let t = true;
        // Classic sklearn example.
        assert!(close(
            auroc(&[0.1, 0.4, 0.35, 0.8], &[f, f, t, t]).unwrap(),
            0.75
        ));
        // All tied → 0.5.
        assert!(close(auroc(&[0.3; 6], &[f, t, f, t, t, f]).unwrap(), 0.5));
        // Perfect and inverted.
        assert!(close(auroc(&[1.0, 2.0, 3.0], &[f, t, t]).unwrap(), 1.0));
        assert!(close(auroc(&[3.0, 2.0, 1.0], &[f, t, t]).unwrap(), 0.0));
        // Partial ties: pos {1, 2, 2}, neg {0, 2}: pairs beaten: 1>0 (1), 2>0 (1), 2~2 (.5),
        // 2>0 (1), 2~2 (.5), 1<2 (0) → 4 / 6.
        assert!(close(
            auroc(&[1.0, 2.0, 2.0, 0.0, 2.0], &[t, t, t, f, f]).unwrap(),
            4.0 / 6.0
        ));
        // -0.0 and 0.0 tie.
        assert!(close(auroc(&[-0.0, 0.0], &[t, f]).unwrap(), 0.5));
    }

    #[test]
    fn auroc_undefined() {
        assert_eq!(auroc(&[], &[]), None);
        assert_eq!(auroc(&[0.1, 0.2], &[false, false]), None);
        assert_eq!(auroc(&[0.1, 0.2], &[true, true]), None);
        assert_eq!(auroc(&[0.1, f32::NAN], &[true, false]), None);
        assert_eq!(f1_max(&[0.1, f32::NAN], &[true, false]), None);
        assert_eq!(f1_max(&[], &[]), None);
        assert_eq!(f1_max(&[0.1, 0.2], &[false, false]), None);
    }

    #[test]
    #[should_panic(expected = "same length")]
    fn length_mismatch_panics() {
        let _ = auroc(&[0.1, 0.2], &[true]);
    }

    #[test]
    fn f1_hand_cases() {
        let f = false;
        let t = true;
        let (f1, th) = f1_max(&[0.5, 0.5, 0.5, 0.9], &[t, f, f, t]).unwrap();
        // 0.9: TP1 FP0 FN1 → 2/3; 0.5: TP2 FP2 FN0 → 4/6 = 2/3 → tie, highest threshold wins.
        assert!(close(f1, 2.0 / 3.0));
        assert_eq!(th, 0.9);
        let (f1, th) = f1_max(&[0.2, 0.7, 0.7, 0.1], &[f, t, t, f]).unwrap();
        assert!(close(f1, 1.0));
        assert_eq!(th, 0.7);
        // Only positives: F1 = 1 at the lowest score.
        let (f1, th) = f1_max(&[0.3, 0.6], &[t, t]).unwrap();
        assert!(close(f1, 1.0));
        assert_eq!(th, 0.3);
    }

    /// The data set of `matches_sklearn`, generated identically in Python.
    fn lcg_data() -> (Vec<f32>, Vec<bool>) {
        let mut rng = Lcg(42);
        let (mut s, mut l) = (Vec::new(), Vec::new());
        for _ in 0..1000 {
            let x = rng.next_u64();
            let lab = (x >> 33).is_multiple_of(4);
            let base = (x >> 40) % 64;
            s.push((base + if lab { 20 } else { 0 }) as f32);
            l.push(lab);
        }
        (s, l)
    }

    /// Reference values from scikit-learn 1.x on the same data (integer scores, many ties):
    ///
    /// ```python
    /// import numpy as np
    /// from sklearn.metrics import roc_auc_score, precision_recall_curve
    /// M = (1 << 64) - 1; x = 42; s = []; l = []
    /// for i in range(1000):
    ///     x = (x * 6364136223846793005 + 1442695040888963407) & M
    ///     lab = ((x >> 33) % 4) == 0; base = (x >> 40) % 64
    ///     s.append(float(base + (20 if lab else 0))); l.append(lab)
    /// s = np.array(s, dtype=np.float32); l = np.array(l)
    /// print(repr(roc_auc_score(l, s)))            # 0.7485494574837298 (249 positives)
    /// p, r, t = precision_recall_curve(l, s)
    /// f = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0)[:-1]
    /// i = np.argmax(f); print(repr(f[i]), t[i])   # 0.49082568807339444 57.0
    /// ```
    #[test]
    fn matches_sklearn() {
        let (s, l) = lcg_data();
        assert_eq!(l.iter().filter(|&&b| b).count(), 249);
        let auc = auroc(&s, &l).unwrap();
        assert!((auc - 0.7485494574837298).abs() < 1e-12, "{auc}");
        let (f1, th) = f1_max(&s, &l).unwrap();
        assert!((f1 - 0.49082568807339444).abs() < 1e-12, "{f1}");
        assert_eq!(th, 57.0);
    }

    /// Brute-force O(n²) AUROC for cross-checking.
    fn auroc_naive(s: &[f32], l: &[bool]) -> f64 {
        let (mut num, mut den) = (0.0, 0.0);
        for (i, &li) in l.iter().enumerate() {
            if !li {
                continue;
            }
            for (j, &lj) in l.iter().enumerate() {
                if lj {
                    continue;
                }
                den += 1.0;
                num += if s[i] > s[j] {
                    1.0
                } else if s[i] == s[j] {
                    0.5
                } else {
                    0.0
                };
            }
        }
        num / den
    }

    #[test]
    fn matches_naive_with_negative_scores() {
        let (s, l) = lcg_data();
        let s: Vec<f32> = s.iter().map(|v| (v - 40.0) / 8.0).collect();
        let a = auroc(&s, &l).unwrap();
        assert!((a - auroc_naive(&s, &l)).abs() < 1e-12);
    }

    #[test]
    fn five_million_pixels() {
        let n = 5_000_000usize;
        let labels: Vec<bool> = (0..n).map(|i| i % 10 == 0).collect();
        // Positives score in [0.5, 1.5), negatives in [0, 1): overlap, many ties.
        let scores: Vec<f32> = (0..n)
            .map(|i| (i % 1000) as f32 / 1000.0 + if i % 10 == 0 { 0.5 } else { 0.0 })
            .collect();
        let t = std::time::Instant::now();
        let a = auroc(&scores, &labels).unwrap();
        assert!(a > 0.5 && a < 1.0);
        assert!(t.elapsed().as_secs_f64() < 30.0);
    }
}

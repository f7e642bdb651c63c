//! Decisions at a threshold, and thresholds that come with a guarantee.
//!
//! - [`conformal_threshold`]: from `n` scores of normal images that the model never trained
//!   on, the threshold whose false-alarm rate on a new normal image is at most `α` (split
//!   conformal prediction: the `⌈(n+1)(1−α)⌉`-th smallest score). It holds for any model and
//!   any score distribution, as long as calibration and future normal images are exchangeable
//!   (drawn the same way); with too few images for `α` it says so and gives the best rate
//!   `1/(n+1)` the set can guarantee.
//! - [`p_value`]: how unusual a score is among the calibration normals.
//! - [`Normalizer`]: anomalib's normalised score, 0.5 at the threshold.
//! - [`operating_point`]: confusion counts, false-alarm rate, recall, precision and F1 at a
//!   fixed threshold (the one the model runs with, not the best one in hindsight).
//!
//! The decision rule everywhere is **anomalous when `score > threshold`**.
//!
//! ```
//! use tessera_eval::decision::{conformal_threshold, p_value};
//! let normals: Vec<f32> = (1..=39).map(|i| i as f32).collect(); // 39 calibration scores
//! let c = conformal_threshold(&normals, 0.05);
//! assert!(c.target_met);
//! assert_eq!(c.threshold, 38.0); // the ⌈40 · 0.95⌉ = 38th smallest
//! assert!(c.guaranteed_fpr <= 0.05 + 1e-12);
//! assert_eq!(p_value(&normals, 100.0), 1.0 / 40.0);
//! ```

use serde::{Deserialize, Serialize};

/// A threshold from calibration normals, with what it guarantees.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Conformal {
    /// Anomalous when `score > threshold`.
    pub threshold: f32,
    /// Calibration scores used.
    pub n: usize,
    /// The rank of the threshold among them (1 = smallest).
    pub rank: usize,
    /// The false-alarm rate asked for.
    pub target_fpr: f64,
    /// The rate guaranteed at this threshold: `1 − rank/(n+1)` (≤ target when met).
    pub guaranteed_fpr: f64,
    /// Whether the set was large enough for the target (`n ≥ 1/α − 1`).
    pub target_met: bool,
}

/// The conformal threshold for false-alarm rate `alpha` from calibration normals' `scores`
/// (NaN scores are not allowed; callers check finiteness first). `scores` need not be sorted.
///
/// # Panics
///
/// When `scores` is empty or `alpha` is not in `(0, 1)`.
pub fn conformal_threshold(scores: &[f32], alpha: f64) -> Conformal {
    assert!(
        !scores.is_empty(),
        "conformal_threshold needs calibration scores"
    );
    assert!(alpha > 0.0 && alpha < 1.0, "alpha must lie in (0, 1)");
    let mut s = scores.to_vec();
    s.sort_by(f32::total_cmp);
    let n = s.len();
    let k = ((n + 1) as f64 * (1.0 - alpha) - 1e-9).ceil() as usize;
    let (rank, met) = if k <= n { (k.max(1), true) } else { (n, false) };
    Conformal {
        threshold: s[rank - 1],
        n,
        rank,
        target_fpr: alpha,
        guaranteed_fpr: 1.0 - rank as f64 / (n + 1) as f64,
        target_met: met,
    }
}

/// The conformal p-value of `score` among calibration normals: `(1 + #{s ≥ score}) / (n + 1)`
/// — "how many good parts score this high". Small means unusual.
pub fn p_value(calibration: &[f32], score: f32) -> f64 {
    let above = calibration.iter().filter(|&&s| s >= score).count();
    (1 + above) as f64 / (calibration.len() + 1) as f64
}

/// anomalib's normalisation: `clamp((score − threshold) / (max − min) + 0.5, 0, 1)`, with the
/// range of the calibration scores: 0.5 exactly at the threshold, above it anomalous.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Normalizer {
    /// The decision threshold (normalised to 0.5).
    pub threshold: f32,
    /// The lowest calibration score.
    pub min: f32,
    /// The highest calibration score.
    pub max: f32,
}

impl Normalizer {
    /// The normalised score in `[0, 1]`.
    pub fn normalize(&self, score: f32) -> f32 {
        let range = (self.max - self.min).max(f32::EPSILON);
        ((score - self.threshold) / range + 0.5).clamp(0.0, 1.0)
    }

    /// The raw range that maps linearly onto `[0, 1]` (for colouring heatmaps).
    pub fn range(&self) -> (f32, f32) {
        let half = (self.max - self.min).max(f32::EPSILON) / 2.0;
        (self.threshold - half, self.threshold + half)
    }
}

/// Confusion counts and rates at one threshold (anomalous when `score > threshold`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct OperatingPoint {
    /// The threshold the counts are taken at.
    pub threshold: f32,
    /// Anomalous predicted anomalous.
    pub tp: u64,
    /// Normal predicted anomalous (false alarms).
    pub fp: u64,
    /// Normal predicted normal.
    pub tn: u64,
    /// Anomalous predicted normal (misses).
    pub fn_: u64,
    /// `fp / (fp + tn)`; `None` without normal samples.
    pub false_alarm_rate: Option<f64>,
    /// `tp / (tp + fn)`; `None` without anomalous samples.
    pub recall: Option<f64>,
    /// `tp / (tp + fp)`; `None` when nothing is predicted anomalous.
    pub precision: Option<f64>,
    /// Harmonic mean of precision and recall; `None` when either is undefined.
    pub f1: Option<f64>,
}

impl OperatingPoint {
    /// From confusion counts.
    pub fn from_counts(threshold: f32, tp: u64, fp: u64, tn: u64, fn_: u64) -> Self {
        let ratio = |a: u64, b: u64| (b > 0).then(|| a as f64 / b as f64);
        let recall = ratio(tp, tp + fn_);
        let precision = ratio(tp, tp + fp);
        let f1 = match (precision, recall) {
            (Some(p), Some(r)) if p + r > 0.0 => Some(2.0 * p * r / (p + r)),
            (Some(_), Some(_)) => Some(0.0),
            _ => None,
        };
        Self {
            threshold,
            tp,
            fp,
            tn,
            fn_,
            false_alarm_rate: ratio(fp, fp + tn),
            recall,
            precision,
            f1,
        }
    }

    /// Add another point's counts (same threshold), e.g. pixels of more images.
    pub fn merge(&self, o: &OperatingPoint) -> Self {
        Self::from_counts(
            self.threshold,
            self.tp + o.tp,
            self.fp + o.fp,
            self.tn + o.tn,
            self.fn_ + o.fn_,
        )
    }
}

/// The operating point of `scores` with ground truth `labels` (true = anomalous) at
/// `threshold`.
pub fn operating_point(scores: &[f32], labels: &[bool], threshold: f32) -> OperatingPoint {
    assert_eq!(
        scores.len(),
        labels.len(),
        "scores and labels differ in length"
    );
    let (mut tp, mut fp, mut tn, mut fn_) = (0, 0, 0, 0);
    for (&s, &l) in scores.iter().zip(labels) {
        match (s > threshold, l) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, false) => tn += 1,
            (false, true) => fn_ += 1,
        }
    }
    OperatingPoint::from_counts(threshold, tp, fp, tn, fn_)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conformal_rank_and_small_sets() {
        // n = 19, α = 0.05: rank ⌈20 · 0.95⌉ = 19, the maximum; guaranteed 1/20.
        let s: Vec<f32> = (0..19).map(|i| i as f32).collect();
        let c = conformal_threshold(&s, 0.05);
        assert_eq!((c.rank, c.threshold, c.target_met), (19, 18.0, true));
        assert!((c.guaranteed_fpr - 0.05).abs() < 1e-12);
        // n = 10 is too small for 5 %: the max, and the rate it can guarantee, 1/11.
        let c = conformal_threshold(&s[..10], 0.05);
        assert!(!c.target_met);
        assert_eq!(c.threshold, 9.0);
        assert!((c.guaranteed_fpr - 1.0 / 11.0).abs() < 1e-12);
        // Unsorted input, ties.
        let c = conformal_threshold(&[3.0, 1.0, 2.0, 2.0, 5.0], 0.5);
        assert_eq!((c.rank, c.threshold), (3, 2.0));
    }

    #[test]
    fn the_guarantee_holds_empirically() {
        // Exchangeable normals: over many draws the miss rate stays at or under α.
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let (alpha, n, trials) = (0.1, 30, 4000);
        let mut false_alarms = 0;
        for _ in 0..trials {
            let cal: Vec<f32> = (0..n).map(|_| rng.random::<f32>()).collect();
            let t = conformal_threshold(&cal, alpha).threshold;
            false_alarms += (rng.random::<f32>() > t) as usize;
        }
        let rate = false_alarms as f64 / trials as f64;
        // 1 − ⌈31·0.9⌉/31 = 1 − 28/31 = 0.097; allow 3 σ of sampling noise.
        assert!(
            rate < 0.097 + 3.0 * (0.1f64 * 0.9 / trials as f64).sqrt(),
            "{rate}"
        );
    }

    #[test]
    fn p_values_and_normalisation() {
        let cal = [1.0f32, 2.0, 3.0, 4.0];
        assert_eq!(p_value(&cal, 0.0), 1.0);
        assert_eq!(p_value(&cal, 3.0), 3.0 / 5.0);
        assert_eq!(p_value(&cal, 9.0), 1.0 / 5.0);
        let n = Normalizer {
            threshold: 3.0,
            min: 1.0,
            max: 5.0,
        };
        assert_eq!(n.normalize(3.0), 0.5);
        assert_eq!(n.normalize(5.0), 1.0);
        assert_eq!(n.normalize(1.0), 0.0);
        assert_eq!(n.range(), (1.0, 5.0));
    }

    #[test]
    fn operating_points() {
        let p = operating_point(&[0.1, 0.6, 0.4, 0.9], &[false, false, true, true], 0.5);
        assert_eq!((p.tp, p.fp, p.tn, p.fn_), (1, 1, 1, 1));
        assert_eq!(p.false_alarm_rate, Some(0.5));
        assert_eq!(p.recall, Some(0.5));
        assert_eq!(p.f1, Some(0.5));
        // A score equal to the threshold is normal.
        let q = operating_point(&[0.5], &[true], 0.5);
        assert_eq!(q.fn_, 1);
        assert_eq!(q.precision, None);
        let m = p.merge(&q);
        assert_eq!((m.tp, m.fn_), (1, 2));
    }
}

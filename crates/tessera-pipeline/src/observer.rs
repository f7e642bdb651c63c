//! Progress without a terminal: the library reports what it is doing through an [`Observer`];
//! the binary draws bars (indicatif) and lines from it, a server logs it, a test ignores it.

/// Stage names reported by the pipeline.
pub mod stage {
    /// Backbone features of the training images.
    pub const FEATURES: &str = "features";
    /// PatchCore's greedy coreset.
    pub const CORESET: &str = "coreset";
    /// CFA's descriptor training.
    pub const TRAIN: &str = "train";
    /// SBM's jigsaw fine-tuning.
    pub const SBM: &str = "sbm";
    /// PFAM learning to segment synthetic defects (`--pfam-train synth`).
    pub const PFAM: &str = "pfam";
    /// Scoring the calibration images.
    pub const CALIBRATE: &str = "calibrate";
    /// Scoring a test split.
    pub const TEST: &str = "test";
    /// Scoring images with `predict`.
    pub const PREDICT: &str = "predict";
    /// Rendering heatmap panels.
    pub const HEATMAPS: &str = "heatmaps";
    /// Writing synthetic defects.
    pub const SYNTH: &str = "synth";
}

/// What a long run reports as it goes. Every method has an empty default, so an observer
/// implements only what it shows. Calls may come from worker threads.
pub trait Observer: Sync {
    /// A stage with `total` steps starts.
    fn start(&self, _stage: &str, _total: u64) {}
    /// `done` of the stage's steps are finished; `message` is a short status (a loss, an
    /// accuracy).
    fn progress(&self, _stage: &str, _done: u64, _message: Option<&str>) {}
    /// The stage ended.
    fn finish(&self, _stage: &str) {}
    /// An informational line.
    fn note(&self, _msg: &str) {}
    /// Something the user must see even when progress is silenced (a safeguard that fired,
    /// a result that was not used).
    fn warn(&self, _msg: &str) {}
}

/// An observer that shows nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Silent;

impl Observer for Silent {}

/// Counts steps of one stage for an observer from any thread.
pub(crate) struct Counter<'a> {
    obs: &'a dyn Observer,
    stage: &'static str,
    done: std::sync::atomic::AtomicU64,
}

impl<'a> Counter<'a> {
    pub(crate) fn start(obs: &'a dyn Observer, stage: &'static str, total: u64) -> Self {
        obs.start(stage, total);
        Self {
            obs,
            stage,
            done: Default::default(),
        }
    }
    pub(crate) fn add(&self, n: u64) {
        let d = self.done.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
        self.obs.progress(self.stage, d, None);
    }
}

impl Drop for Counter<'_> {
    fn drop(&mut self) {
        self.obs.finish(self.stage);
    }
}

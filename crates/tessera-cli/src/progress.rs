//! The pipeline's progress as indicatif bars and lines on stderr, or nothing when quiet.

use indicatif::{ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::sync::Mutex;
use tessera_pipeline::Observer;

/// An [`Observer`] drawing one bar per running stage; notes are printed unless quiet,
/// warnings always.
#[derive(Default)]
pub struct Bars {
    quiet: bool,
    bars: Mutex<HashMap<String, ProgressBar>>,
}

impl Bars {
    pub fn new(quiet: bool) -> Self {
        Self {
            quiet,
            bars: Mutex::default(),
        }
    }

    fn with_bars<R>(&self, f: impl FnOnce(&mut HashMap<String, ProgressBar>) -> R) -> R {
        let mut g = self.bars.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// Print a line above the bars.
    fn line(&self, s: &str) {
        self.with_bars(|bars| match bars.values().next() {
            Some(b) => b.suspend(|| eprintln!("{s}")),
            None => eprintln!("{s}"),
        })
    }

    /// A line on stderr unless quiet (the human summary of a command).
    pub fn say(&self, s: &str) {
        if !self.quiet {
            self.line(s);
        }
    }
}

impl Observer for Bars {
    fn start(&self, stage: &str, total: u64) {
        if self.quiet {
            return;
        }
        let pb = ProgressBar::new(total);
        pb.set_style(
            ProgressStyle::with_template(
                "{prefix:>10} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        pb.set_prefix(stage.to_string());
        self.with_bars(|b| {
            if let Some(old) = b.insert(stage.to_string(), pb) {
                old.finish_and_clear();
            }
        });
    }

    fn progress(&self, stage: &str, done: u64, message: Option<&str>) {
        self.with_bars(|b| {
            if let Some(pb) = b.get(stage) {
                pb.set_position(done);
                if let Some(m) = message {
                    pb.set_message(m.to_string());
                }
            }
        });
    }

    fn finish(&self, stage: &str) {
        self.with_bars(|b| {
            if let Some(pb) = b.remove(stage) {
                pb.finish_and_clear();
            }
        });
    }

    fn note(&self, msg: &str) {
        if !self.quiet {
            self.line(msg);
        }
    }

    fn warn(&self, msg: &str) {
        // Loud even with --quiet.
        self.line(&format!("WARNING: {msg}"));
    }
}

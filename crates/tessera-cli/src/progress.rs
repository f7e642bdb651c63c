//! Progress bars that can be silenced.

use indicatif::{ProgressBar, ProgressStyle};

/// A progress reporter: an indicatif bar on stderr, or nothing when quiet.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    /// Show nothing.
    pub quiet: bool,
}

impl Progress {
    /// A bar over `len` items with a message.
    pub fn bar(&self, len: u64, msg: &str) -> ProgressBar {
        if self.quiet {
            return ProgressBar::hidden();
        }
        let pb = ProgressBar::new(len);
        pb.set_style(
            ProgressStyle::with_template("{msg:>14} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        pb.set_message(msg.to_string());
        pb
    }
    /// Print a line on stderr unless quiet.
    pub fn note(&self, msg: impl AsRef<str>) {
        if !self.quiet {
            eprintln!("{}", msg.as_ref());
        }
    }
}

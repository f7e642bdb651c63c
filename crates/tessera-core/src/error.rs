//! Errors that say which file is wrong and how.

use std::path::{Path, PathBuf};

/// Result alias used across Tessera.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in Tessera's libraries. Variants carry the offending path where
/// there is one, so a user can go straight to the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be read or written. The message is the I/O error's, once
    /// (the error is not also chained as a source, so `{:#}` does not print it twice).
    #[error("{path}: {}", describe_io(error))]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// Input data (an image, a mask, a dataset folder) is not what it must be.
    #[error("{path}: {msg}")]
    BadInput { path: PathBuf, msg: String },
    /// A model or weights file is malformed or does not fit the architecture.
    #[error("{path}: {msg}")]
    BadModel { path: PathBuf, msg: String },
    /// A configuration value is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The requested device or feature is not available in this build or on this machine.
    #[error("{0}")]
    Unavailable(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            error: source,
        }
    }
    /// Bad input data at `path`.
    pub fn bad_input(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::BadInput {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }
    /// This error, said about `path`: errors that already name a file are kept as they are,
    /// others become a [`Error::BadModel`] naming `path` (e.g. a shape check inside a scorer
    /// that does not know which file it reads).
    pub fn in_file(self, path: impl AsRef<Path>) -> Self {
        match self {
            e @ (Error::Io { .. } | Error::BadInput { .. } | Error::BadModel { .. }) => e,
            Error::Config(m) | Error::Unavailable(m) => Error::bad_model(path, m),
            Error::Candle(e) => Error::bad_model(path, e.to_string()),
        }
    }
    /// A bad model or weights file at `path`.
    pub fn bad_model(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::BadModel {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }
}

/// An I/O error in words a user can act on, without the "(os error N)" suffix.
pub fn describe_io(e: &std::io::Error) -> String {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::NotFound => "no such file or folder".into(),
        K::PermissionDenied => "permission denied".into(),
        K::AlreadyExists => "already exists".into(),
        K::IsADirectory => "is a folder, not a file".into(),
        K::NotADirectory => "a part of this path is a file, not a folder".into(),
        K::StorageFull => "no space left on the device".into(),
        K::ReadOnlyFilesystem => "the file system is read-only".into(),
        K::UnexpectedEof => "the file ends early (truncated)".into(),
        _ => {
            let s = e.to_string();
            match s.rfind(" (os error ") {
                Some(i) if s.ends_with(')') => s[..i].to_string(),
                _ => s,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_say_it_once() {
        let e = Error::io("/x/y", std::io::Error::from(std::io::ErrorKind::NotFound));
        let shown = format!("{:#}", anyhow_like(&e));
        assert_eq!(shown, "/x/y: no such file or folder");
        let raw = std::io::Error::from_raw_os_error(28);
        assert_eq!(describe_io(&raw), "no space left on the device");
        let other = std::io::Error::from_raw_os_error(5);
        assert!(
            !describe_io(&other).contains("os error"),
            "{}",
            describe_io(&other)
        );
    }

    /// What anyhow's `{:#}` prints: the error and every source, joined by ": ".
    fn anyhow_like(e: &(dyn std::error::Error + 'static)) -> String {
        let mut s = e.to_string();
        let mut src = e.source();
        while let Some(x) = src {
            s.push_str(": ");
            s.push_str(&x.to_string());
            src = x.source();
        }
        s
    }
}

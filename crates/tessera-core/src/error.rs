//! Errors that say which file is wrong and how.

use std::path::{Path, PathBuf};

/// Result alias used across Tessera.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in Tessera's libraries. Variants carry the offending path where
/// there is one, so a user can go straight to the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
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
            source,
        }
    }
    /// Bad input data at `path`.
    pub fn bad_input(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::BadInput {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
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

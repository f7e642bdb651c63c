//! Device selection: `cpu`, `cuda` or `cuda:N`.

use crate::{Error, Result};
use std::fmt;
use std::str::FromStr;

/// A device as the user names it on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The CPU (default; candle's CPU backend).
    #[default]
    Cpu,
    /// CUDA device with the given ordinal.
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => n.parse().map(DeviceSpec::Cuda).map_err(|_| {
                    Error::Config(format!("device '{s}': expected cuda:N with N a number"))
                }),
                None => Err(Error::Config(format!(
                    "unknown device '{s}': expected cpu, cuda or cuda:N"
                ))),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// Open the device. A CUDA request fails with a clear message when this binary was built
    /// without the `cuda` feature or no GPU is present.
    pub fn open(&self) -> Result<candle_core::Device> {
        match *self {
            DeviceSpec::Cpu => Ok(candle_core::Device::Cpu),
            DeviceSpec::Cuda(n) => {
                if !candle_core::utils::cuda_is_available() {
                    return Err(Error::Unavailable(format!(
                        "device cuda:{n} requested, but this binary was built without CUDA \
                         support (rebuild with `--features cuda`, see `cargo xtask cuda-build`)"
                    )));
                }
                candle_core::Device::new_cuda(n).map_err(|e| {
                    Error::Unavailable(format!(
                        "cannot open CUDA device {n} (is a GPU with its driver present?): {e}"
                    ))
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda:1".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(1));
        assert_eq!("CUDA".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert!("tpu".parse::<DeviceSpec>().is_err());
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
    }

    #[test]
    fn cuda_without_feature_is_a_clear_error() {
        if candle_core::utils::cuda_is_available() {
            return;
        }
        let e = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert!(e.contains("without CUDA"), "{e}");
    }
}

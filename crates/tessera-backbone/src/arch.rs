//! Architectures.

use std::fmt;
use std::str::FromStr;
use tessera_core::{Error, Result};

/// Residual block type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// Two 3×3 convs (ResNet-18/34).
    Basic,
    /// 1×1 → 3×3 → 1×1 with expansion 4 (ResNet-50, Wide-ResNet-50-2).
    Bottleneck,
}

/// The shape of a ResNet up to layer3.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchSpec {
    pub block: BlockKind,
    /// Blocks in layer1..layer3.
    pub blocks: [usize; 3],
    /// Stem and layer1 base width (64 in torchvision).
    pub base: usize,
    /// torchvision's `width_per_group`: bottleneck inner width is `planes · wpg / 64`
    /// (64 for ResNet-50, 128 for Wide-ResNet-50-2; unused by basic blocks).
    pub width_per_group: usize,
}

impl ArchSpec {
    /// Output channels of layer1..layer3.
    pub fn channels(&self) -> [usize; 3] {
        let e = match self.block {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        };
        [self.base * e, self.base * 2 * e, self.base * 4 * e]
    }
}

/// The supported backbones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Arch {
    #[default]
    ResNet18,
    ResNet34,
    ResNet50,
    WideResNet50_2,
}

impl Arch {
    /// All supported names.
    pub const NAMES: &'static [&'static str] =
        &["resnet18", "resnet34", "resnet50", "wide_resnet50_2"];

    /// The architecture's shape.
    pub fn spec(self) -> ArchSpec {
        use BlockKind::*;
        match self {
            Arch::ResNet18 => ArchSpec {
                block: Basic,
                blocks: [2, 2, 2],
                base: 64,
                width_per_group: 64,
            },
            Arch::ResNet34 => ArchSpec {
                block: Basic,
                blocks: [3, 4, 6],
                base: 64,
                width_per_group: 64,
            },
            Arch::ResNet50 => ArchSpec {
                block: Bottleneck,
                blocks: [3, 4, 6],
                base: 64,
                width_per_group: 64,
            },
            Arch::WideResNet50_2 => ArchSpec {
                block: Bottleneck,
                blocks: [3, 4, 6],
                base: 64,
                width_per_group: 128,
            },
        }
    }

    /// The name used on the command line and in model files.
    pub fn name(self) -> &'static str {
        match self {
            Arch::ResNet18 => "resnet18",
            Arch::ResNet34 => "resnet34",
            Arch::ResNet50 => "resnet50",
            Arch::WideResNet50_2 => "wide_resnet50_2",
        }
    }

    /// The Hugging Face repository with torchvision's ImageNet-1k weights in timm's naming.
    pub fn default_hub_repo(self) -> &'static str {
        match self {
            Arch::ResNet18 => "timm/resnet18.tv_in1k",
            Arch::ResNet34 => "timm/resnet34.tv_in1k",
            Arch::ResNet50 => "timm/resnet50.tv_in1k",
            Arch::WideResNet50_2 => "timm/wide_resnet50_2.tv_in1k",
        }
    }
}

impl FromStr for Arch {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "resnet18" | "r18" => Ok(Arch::ResNet18),
            "resnet34" | "r34" => Ok(Arch::ResNet34),
            "resnet50" | "r50" => Ok(Arch::ResNet50),
            "wide_resnet50_2" | "wide_resnet50" | "wrn50" | "wrn50_2" => Ok(Arch::WideResNet50_2),
            _ => Err(Error::Config(format!(
                "unknown backbone '{s}': expected one of {}",
                Arch::NAMES.join(", ")
            ))),
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl serde::Serialize for Arch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for Arch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

//! Enums with one name each: the name used on the command line, in model files and in JSON.

/// An enum whose variants have fixed names: `NAMES`, `name()`, `FromStr` (case-insensitive,
/// `-` read as `_`), `Display` and serde under those names.
macro_rules! named_enum {
    ($(#[$m:meta])* $vis:vis enum $name:ident { $($(#[$vm:meta])* $v:ident => $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        $vis enum $name {
            $($(#[$vm])* #[serde(rename = $s)] $v),+
        }
        impl $name {
            /// Every variant's name.
            pub const NAMES: &'static [&'static str] = &[$($s),+];
            /// This variant's name.
            pub fn name(self) -> &'static str {
                match self { $(Self::$v => $s),+ }
            }
        }
        impl std::str::FromStr for $name {
            type Err = tessera_core::Error;
            fn from_str(s: &str) -> tessera_core::Result<Self> {
                let k = s.trim().to_ascii_lowercase().replace('-', "_");
                match k.as_str() {
                    $($s => Ok(Self::$v),)+
                    _ => Err(tessera_core::Error::Config(format!(
                        "'{s}' is not a {}: expected one of {}",
                        stringify!($name),
                        Self::NAMES.join(", ")
                    ))),
                }
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

pub(crate) use named_enum;

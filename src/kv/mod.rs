//! The pluggable KV cache: a cache type per layer and per K/V, storage sized up front,
//! attention computed directly on the stored rows.

pub mod attention;
pub mod calibration;
pub mod codec;
#[cfg(feature = "cuda")]
pub mod device;
pub mod policy;
mod softmax;
pub mod store;

use std::fmt;
use std::str::FromStr;

use anyhow::{Result, bail};

pub use attention::{append, attend, attention};
pub use codec::KvCodec;
pub use policy::KvPolicy;
pub use store::{KvCache, LayerCache};

/// Declares the cache types: variant, the name `-ctk` / `-ctv` take, the codec that stores it.
/// Adding a codec is its file under `codec/` plus one line here.
macro_rules! cache_types {
    ($($variant:ident => $name:literal, $codec:expr;)+) => {
        /// A KV cache storage type, as `-ctk` / `-ctv` spell it.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum CacheType {
            $($variant,)+
        }

        impl CacheType {
            pub const ALL: &'static [CacheType] = &[$(CacheType::$variant,)+];

            pub fn name(self) -> &'static str {
                match self {
                    $(CacheType::$variant => $name,)+
                }
            }

            /// The codec that stores rows of this type.
            pub fn codec(self) -> Box<dyn KvCodec> {
                match self {
                    $(CacheType::$variant => Box::new($codec),)+
                }
            }
        }
    };
}

cache_types! {
    F32 => "f32", codec::f32::F32Codec;
    F16 => "f16", codec::f16::F16Codec;
    Bf16 => "bf16", codec::f16::Bf16Codec;
    Q8_0 => "q8_0", codec::q8_0::Q8_0Codec;
    Q4_0 => "q4_0", codec::q4_0::Q4_0Codec;
    Turbo4 => "turbo4", codec::turbo4::Turbo4Codec::default();
    Turbo3 => "turbo3", codec::turbo3::Turbo3Codec::default();
    Turbo2 => "turbo2", codec::turbo2::Turbo2Codec::default();
    Planar4 => "planar4", codec::planar::Planar4Codec::default();
    Planar3 => "planar3", codec::planar::Planar3Codec::default();
    Iso4 => "iso4", codec::iso::Iso4Codec::default();
    Iso3 => "iso3", codec::iso::Iso3Codec::default();
    Rotor4 => "rotor4", codec::rotor::Rotor4Codec::default();
    Rotor3 => "rotor3", codec::rotor::Rotor3Codec::default();
    Spectral4 => "spectral4", codec::spectral::Spectral4Codec::default();
    Spectral3 => "spectral3", codec::spectral::Spectral3Codec::default();
}

impl CacheType {
    /// The TurboQuant family, which the fork's layer-adaptive modes key on.
    pub fn is_turbo(self) -> bool {
        matches!(self, Self::Turbo2 | Self::Turbo3 | Self::Turbo4)
    }

    /// The codec a store of this type quantizes with: where rows are `centered`, the codec's
    /// variant for centered rows if it has one ([`KvCodec::for_centered_rows`]).
    pub fn codec_for(self, centered: bool) -> Box<dyn KvCodec> {
        let codec = self.codec();
        match centered.then(|| codec.for_centered_rows()).flatten() {
            Some(c) => c,
            None => codec,
        }
    }
}

/// Serialized as `-ctk` spells it.
impl serde::Serialize for CacheType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl fmt::Display for CacheType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CacheType {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.to_ascii_lowercase();
        match CacheType::ALL.iter().find(|t| t.name() == lower) {
            Some(t) => Ok(*t),
            None => {
                let names: Vec<&str> = CacheType::ALL.iter().map(|t| t.name()).collect();
                bail!("unknown cache type `{s}` (supported: {})", names.join(", "))
            }
        }
    }
}

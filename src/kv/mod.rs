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

/// Which GPU kernels read a cache type's rows (src/kv/registry.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernels {
    /// Its own, with this codec id.
    Own(usize),
    /// Another type's, whose bytes it shares.
    Like(CacheType),
    /// None: host memory only.
    Host,
}

macro_rules! kernels {
    ([kernels $id:literal]) => {
        Kernels::Own($id)
    };
    ([like $t:ident]) => {
        Kernels::Like(CacheType::$t)
    };
    ([host]) => {
        Kernels::Host
    };
}

/// Builds [`CacheType`] from the registry's lines: variant, name, codec, GPU kernels.
macro_rules! cache_types {
    ($($variant:ident => $name:literal, $codec:expr, $gpu:tt;)+) => {
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

            fn kernels(self) -> Kernels {
                match self {
                    $(CacheType::$variant => kernels!($gpu),)+
                }
            }
        }
    };
}

include!("registry.rs");

impl CacheType {
    /// The type whose GPU kernels read rows of this one: itself where it has its own; for the
    /// RotorQuant family the turbo type of its bit width (its bytes under its own block
    /// rotation), for spectral3 spectral4 (per-head tables read any width); `None` for types
    /// kept in host memory.
    pub fn kernel_type(self) -> Option<CacheType> {
        match self.kernels() {
            Kernels::Own(_) => Some(self),
            Kernels::Like(t) => Some(t),
            Kernels::Host => None,
        }
    }

    /// The kernels' codec id (`C_*` in the generated codec_ids.cuh) of [`Self::kernel_type`].
    pub fn kernel_id(self) -> Option<usize> {
        match self.kernel_type()?.kernels() {
            Kernels::Own(id) => Some(id),
            _ => None,
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotorquant_runs_on_turbo_kernels_and_spectral3_on_spectral4s() {
        use CacheType::*;
        for (ty, kernels) in [
            (Rotor4, Some(Turbo4)),
            (Iso4, Some(Turbo4)),
            (Planar4, Some(Turbo4)),
            (Rotor3, Some(Turbo3)),
            (Iso3, Some(Turbo3)),
            (Planar3, Some(Turbo3)),
            (Turbo2, Some(Turbo2)),
            (Q8_0, Some(Q8_0)),
            (Spectral3, Some(Spectral4)),
            (F32, None),
        ] {
            assert_eq!(ty.kernel_type(), kernels, "{ty}");
            // The kernels read the rows as the turbo type's bytes.
            if let Some(k) = kernels.filter(|_| ty.codec().block_rotation().is_some()) {
                assert_eq!(ty.codec().bytes_per_row(128), k.codec().bytes_per_row(128));
            }
        }
    }

    /// What build.rs also checks of the registry: kernel ids 0..n, each once, and every
    /// borrowed kernel a type's own.
    #[test]
    fn kernel_ids_are_dense_and_borrowed_kernels_exist() {
        let mut ids: Vec<usize> = CacheType::ALL
            .iter()
            .filter(|t| t.kernel_type() == Some(**t))
            .filter_map(|t| t.kernel_id())
            .collect();
        ids.sort();
        assert_eq!(ids, (0..ids.len()).collect::<Vec<_>>());
        for &t in CacheType::ALL {
            assert_eq!(t.kernel_type().is_some(), t.kernel_id().is_some(), "{t}");
        }
    }
}

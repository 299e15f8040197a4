//! Which SIMD level the cache codecs run on this CPU, chosen once per process. `DH_CPU_ISA`
//! (`avx512`, `avx2` or `scalar`) caps it, so the AVX2 path can be measured on an AVX-512 host
//! and the portable one anywhere; `dh-server bench` prints the level that ran. Stored bytes do
//! not depend on it (the quantizers' SIMD paths are bit-equal to the portable loops); scores and
//! V sums agree to float rounding.

use std::sync::OnceLock;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Scalar,
    /// AVX2 with FMA and F16C (x86-64-v3).
    Avx2,
    /// AVX-512F on top of [`Isa::Avx2`].
    Avx512,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" | "none" => Some(Isa::Scalar),
            "avx2" => Some(Isa::Avx2),
            "avx512" | "avx512f" => Some(Isa::Avx512),
            _ => None,
        }
    }

    fn detected() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let v3 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            if v3 && is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if v3 {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }
}

/// The level the codecs run: what the CPU has, capped by `DH_CPU_ISA`.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let have = Isa::detected();
        match std::env::var("DH_CPU_ISA") {
            Ok(s) => match Isa::parse(&s) {
                Some(cap) => cap.min(have),
                None => {
                    tracing::warn!("DH_CPU_ISA={s} is not one of avx512, avx2, scalar: ignored");
                    have
                }
            },
            Err(_) => have,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_levels_order() {
        for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512] {
            assert_eq!(Isa::parse(isa.name()), Some(isa));
        }
        assert!(Isa::Scalar < Isa::Avx2 && Isa::Avx2 < Isa::Avx512);
        assert_eq!(Isa::parse("sse9"), None);
        assert!(isa() <= Isa::detected());
    }
}

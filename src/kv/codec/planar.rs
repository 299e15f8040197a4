//! planar3 / planar4 (RotorQuant's planar variant): each pair of a group turned by its own
//! fixed Givens rotation instead of the WHT, then turbo3 / turbo4's codebooks and packing.
//! 64 pairs' angles are drawn once from a fixed stream; a 64-wide group uses the first 32.

use std::sync::OnceLock;

use super::turbo::{Rotation, SplitMix, Turbo};
use super::turbo3::Turbo3;
use super::turbo4::Turbo4;

pub struct Givens;
pub type Planar3Codec = Turbo<Turbo3, Givens>;
pub type Planar4Codec = Turbo<Turbo4, Givens>;

/// (cos θ, sin θ) for each of the 64 pairs.
fn angles() -> &'static [(f32, f32); 64] {
    static T: OnceLock<[(f32, f32); 64]> = OnceLock::new();
    T.get_or_init(|| {
        let mut rng = SplitMix(0x504C_414E_4152); // "PLANAR"
        std::array::from_fn(|_| {
            let t = rng.next_f64() * std::f64::consts::TAU;
            (t.cos() as f32, t.sin() as f32)
        })
    })
}

fn turn(x: &mut [f32], sign: f32) {
    for (p, &(c, s)) in x.chunks_exact_mut(2).zip(angles()) {
        let (a, b) = (p[0], p[1]);
        p[0] = c * a - sign * s * b;
        p[1] = sign * s * a + c * b;
    }
}

impl Rotation for Givens {
    const BLOCK: usize = 2;
    fn forward(x: &mut [f32]) {
        turn(x, 1.0)
    }
    fn inverse(x: &mut [f32]) {
        turn(x, -1.0)
    }
    /// Each pair's (cos θ, sin θ).
    fn params() -> Vec<f32> {
        angles().iter().flat_map(|&(c, s)| [c, s]).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::codec::turbo::tests::{check_codec, check_rotation};

    #[test]
    fn planar_codecs() {
        check_rotation::<Givens>();
        check_codec(&Planar4Codec::default(), 0.05);
        check_codec(&Planar3Codec::default(), 0.15);
    }
}

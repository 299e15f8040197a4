//! iso3 / iso4 (IsoQuant): each 4-block of a group is a quaternion `v`, rotated as
//! `q_L · v · q_R` by two fixed unit quaternions of its own (a general rotation of R⁴), then
//! turbo3 / turbo4's codebooks and packing.

use std::sync::OnceLock;

use super::turbo::{Rotation, SplitMix, Turbo};
use super::turbo3::Turbo3;
use super::turbo4::Turbo4;

pub struct Quaternions;
pub type Iso3Codec = Turbo<Turbo3, Quaternions>;
pub type Iso4Codec = Turbo<Turbo4, Quaternions>;

/// (q_L, q_R) for each of the 32 blocks of a 128-wide group.
fn pairs() -> &'static [([f32; 4], [f32; 4]); 32] {
    static T: OnceLock<[([f32; 4], [f32; 4]); 32]> = OnceLock::new();
    T.get_or_init(|| {
        let mut rng = SplitMix(0x0049_534F_5155_4154); // "ISOQUAT"
        std::array::from_fn(|_| (rng.unit_quaternion(), rng.unit_quaternion()))
    })
}

/// Hamilton product `a · b` of quaternions (w, x, y, z).
fn mul(a: [f32; 4], b: [f32; 4]) -> [f32; 4] {
    [
        a[0] * b[0] - a[1] * b[1] - a[2] * b[2] - a[3] * b[3],
        a[0] * b[1] + a[1] * b[0] + a[2] * b[3] - a[3] * b[2],
        a[0] * b[2] - a[1] * b[3] + a[2] * b[0] + a[3] * b[1],
        a[0] * b[3] + a[1] * b[2] - a[2] * b[1] + a[3] * b[0],
    ]
}

fn conj(q: [f32; 4]) -> [f32; 4] {
    [q[0], -q[1], -q[2], -q[3]]
}

impl Rotation for Quaternions {
    const BLOCK: usize = 4;
    fn forward(x: &mut [f32]) {
        for (v, &(l, r)) in x.chunks_exact_mut(4).zip(pairs()) {
            let y = mul(mul(l, [v[0], v[1], v[2], v[3]]), r);
            v.copy_from_slice(&y);
        }
    }
    fn inverse(x: &mut [f32]) {
        for (v, &(l, r)) in x.chunks_exact_mut(4).zip(pairs()) {
            let y = mul(mul(conj(l), [v[0], v[1], v[2], v[3]]), conj(r));
            v.copy_from_slice(&y);
        }
    }
    /// Each block's q_L then q_R, (w, x, y, z).
    fn params() -> Vec<f32> {
        pairs()
            .iter()
            .flat_map(|(l, r)| l.iter().chain(r))
            .copied()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::codec::turbo::tests::{check_codec, check_rotation};

    #[test]
    fn iso_codecs() {
        check_rotation::<Quaternions>();
        check_codec(&Iso4Codec::default(), 0.05);
        check_codec(&Iso3Codec::default(), 0.15);
    }
}

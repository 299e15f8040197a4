//! rotor3 / rotor4 (RotorQuant): each 3-block of a group is a vector of Cl(3,0) turned by the
//! rotor sandwich `R v R̃` of a fixed rotor of its own, then turbo3 / turbo4's codebooks and
//! packing. A unit rotor `s + b₁₂e₁₂ + b₁₃e₁₃ + b₂₃e₂₃` acts on vectors as the rotation of the
//! unit quaternion (s, −b₂₃, b₁₃, −b₁₂); we apply it as that 3×3 matrix. 64 = 21·3 + 1 and
//! 128 = 42·3 + 2: the trailing one or two values of a group are left as they are.

use std::sync::OnceLock;

use super::turbo::{Rotation, SplitMix, Turbo};
use super::turbo3::Turbo3;
use super::turbo4::Turbo4;

pub struct Rotors;
pub type Rotor3Codec = Turbo<Turbo3, Rotors>;
pub type Rotor4Codec = Turbo<Turbo4, Rotors>;

/// The rotation matrix of each of the 42 rotors of a 128-wide group.
fn matrices() -> &'static [[[f32; 3]; 3]; 42] {
    static T: OnceLock<[[[f32; 3]; 3]; 42]> = OnceLock::new();
    T.get_or_init(|| {
        let mut rng = SplitMix(0x0052_4F54_4F52); // "ROTOR"
        std::array::from_fn(|_| {
            let [w, x, y, z] = rng.unit_quaternion();
            [
                [
                    1.0 - 2.0 * (y * y + z * z),
                    2.0 * (x * y - w * z),
                    2.0 * (x * z + w * y),
                ],
                [
                    2.0 * (x * y + w * z),
                    1.0 - 2.0 * (x * x + z * z),
                    2.0 * (y * z - w * x),
                ],
                [
                    2.0 * (x * z - w * y),
                    2.0 * (y * z + w * x),
                    1.0 - 2.0 * (x * x + y * y),
                ],
            ]
        })
    })
}

fn apply(x: &mut [f32], transpose: bool) {
    for (v, m) in x.chunks_exact_mut(3).zip(matrices()) {
        let a = [v[0], v[1], v[2]];
        for (i, o) in v.iter_mut().enumerate() {
            *o = (0..3)
                .map(|j| if transpose { m[j][i] } else { m[i][j] } * a[j])
                .sum();
        }
    }
}

impl Rotation for Rotors {
    const BLOCK: usize = 3;
    fn forward(x: &mut [f32]) {
        apply(x, false)
    }
    fn inverse(x: &mut [f32]) {
        apply(x, true)
    }
    /// Each rotor's matrix, row-major.
    fn params() -> Vec<f32> {
        matrices().iter().flatten().flatten().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::codec::turbo::tests::{check_codec, check_rotation};

    #[test]
    fn rotor_codecs() {
        check_rotation::<Rotors>();
        check_codec(&Rotor4Codec::default(), 0.05);
        check_codec(&Rotor3Codec::default(), 0.15);
    }
}

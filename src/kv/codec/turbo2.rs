//! turbo2: 4-entry codebook, indices packed four per byte — the fork's `block_turbo2_0`
//! (norm, qs): 34 bytes per 128 values, 18 per 64.

use half::f16;

use super::turbo::{Turbo, TurboLayout, UNPACK2, read_norm};

pub struct Turbo2;
pub type Turbo2Codec = Turbo<Turbo2>;

impl TurboLayout for Turbo2 {
    const BITS: u32 = 2;

    fn group_bytes(g: usize) -> usize {
        2 + g / 4
    }

    fn pack(norm: f16, codes: &[u8], dst: &mut [u8]) {
        dst[..2].copy_from_slice(&norm.to_le_bytes());
        for (d, c) in dst[2..].iter_mut().zip(codes.chunks_exact(4)) {
            *d = c[0] | c[1] << 2 | c[2] << 4 | c[3] << 6;
        }
    }

    fn unpack(src: &[u8], codes: &mut [u8]) -> f32 {
        for (c, &b) in codes.chunks_exact_mut(4).zip(&src[2..]) {
            c.copy_from_slice(&UNPACK2[b as usize]);
        }
        read_norm(src)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turbo2_codec() {
        super::super::turbo::tests::check::<Turbo2>(0.15);
        assert_eq!(Turbo2::group_bytes(128), 34);
        super::super::turbo::tests::fork_vectors::<Turbo2>("turbo2");
        assert_eq!(Turbo2::group_bytes(64), 18);
    }
}

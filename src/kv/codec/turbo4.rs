//! turbo4: 16-entry codebook, two indices per byte (low nibble first). A 128-wide group is the
//! fork's `block_turbo4_0`: norm, a reserved `rnorm` (written 0), 64 index bytes — 68 bytes.
//! A 64-wide group drops the reserved field: norm + 32 bytes, so head_dim 64 keeps 4.25 bits.

use half::f16;

use super::turbo::{Turbo, TurboLayout, read_norm};

pub struct Turbo4;
pub type Turbo4Codec = Turbo<Turbo4>;

fn header(g: usize) -> usize {
    if g == 128 { 4 } else { 2 }
}

impl TurboLayout for Turbo4 {
    const BITS: u32 = 4;

    fn group_bytes(g: usize) -> usize {
        header(g) + g / 2
    }

    fn pack(norm: f16, codes: &[u8], dst: &mut [u8]) {
        let h = header(codes.len());
        dst[..2].copy_from_slice(&norm.to_le_bytes());
        dst[2..h].fill(0);
        for (d, c) in dst[h..].iter_mut().zip(codes.chunks_exact(2)) {
            *d = c[0] | (c[1] << 4);
        }
    }

    fn unpack(src: &[u8], codes: &mut [u8]) -> f32 {
        let h = header(codes.len());
        for (c, &b) in codes.chunks_exact_mut(2).zip(&src[h..]) {
            c[0] = b & 0x0F;
            c[1] = b >> 4;
        }
        read_norm(src)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turbo4_codec() {
        super::super::turbo::tests::check::<Turbo4>(0.011);
        assert_eq!(Turbo4::group_bytes(128), 68);
        super::super::turbo::tests::fork_vectors::<Turbo4>("turbo4");
        assert_eq!(Turbo4::group_bytes(64), 34);
    }
}

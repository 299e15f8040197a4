//! turbo3: 8-entry codebook; the low two bits of each index packed four per byte, the high bit
//! eight per byte after them — the fork's `block_turbo3_0` (norm, qs, signs): 50 bytes per
//! 128 values, 26 per 64.

use half::f16;

use super::turbo::{Turbo, TurboLayout, UNPACK2, read_norm};

/// Bit k of a signs byte becomes 4 in byte k: the third index bit of eight values at once.
const HIGH_BIT: [u64; 256] = {
    let mut t = [0u64; 256];
    let mut b = 0;
    while b < 256 {
        let mut k = 0;
        while k < 8 {
            if b >> k & 1 == 1 {
                t[b] |= 4 << (8 * k);
            }
            k += 1;
        }
        b += 1;
    }
    t
};

pub struct Turbo3;
pub type Turbo3Codec = Turbo<Turbo3>;

impl TurboLayout for Turbo3 {
    const BITS: u32 = 3;

    fn group_bytes(g: usize) -> usize {
        2 + g / 4 + g / 8
    }

    fn pack(norm: f16, codes: &[u8], dst: &mut [u8]) {
        let g = codes.len();
        dst[..2].copy_from_slice(&norm.to_le_bytes());
        let (qs, signs) = dst[2..].split_at_mut(g / 4);
        for (d, c) in qs.iter_mut().zip(codes.chunks_exact(4)) {
            *d = (c[0] & 3) | (c[1] & 3) << 2 | (c[2] & 3) << 4 | (c[3] & 3) << 6;
        }
        for (d, c) in signs.iter_mut().zip(codes.chunks_exact(8)) {
            *d = c
                .iter()
                .enumerate()
                .fold(0, |b, (k, &x)| b | ((x >> 2) << k));
        }
    }

    fn unpack(src: &[u8], codes: &mut [u8]) -> f32 {
        let g = codes.len();
        let (qs, signs) = src[2..].split_at(g / 4);
        for (c, &b) in codes.chunks_exact_mut(4).zip(qs) {
            c.copy_from_slice(&UNPACK2[b as usize]);
        }
        for (c, &s) in codes.chunks_exact_mut(8).zip(signs) {
            let low = u64::from_le_bytes(c.try_into().expect("8 codes"));
            c.copy_from_slice(&(low | HIGH_BIT[s as usize]).to_le_bytes());
        }
        read_norm(src)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turbo3_codec() {
        super::super::turbo::tests::check::<Turbo3>(0.05);
        assert_eq!(Turbo3::group_bytes(128), 50);
        super::super::turbo::tests::fork_vectors::<Turbo3>("turbo3");
        assert_eq!(Turbo3::group_bytes(64), 26);
    }
}

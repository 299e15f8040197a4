//! turbo4: 16-entry codebook, two indices per byte (low nibble first). A 128-wide group is the
//! fork's `block_turbo4_0`: norm, a reserved `rnorm` (written 0), 64 index bytes — 68 bytes.
//! A 64-wide group drops the reserved field: norm + 32 bytes, so head_dim 64 keeps 4.25 bits.

use half::f16;

use super::isa::{Isa, isa};
use super::turbo::{Turbo, TurboLayout, read_norm};

pub struct Turbo4;
pub type Turbo4Codec = Turbo<Turbo4>;

fn header(g: usize) -> usize {
    if g == 128 { 4 } else { 2 }
}

/// The rows' geometry where the in-place AVX2 reader serves `queries` queries (or V
/// accumulators) of head dim `hd`; `None` where the tile path should run. AVX-512 hosts keep the
/// tile path: one 16-lane permute per 16 values decodes faster than two 8-lane ones and a blend,
/// and it is the path measured there. So do prefill blocks of many queries, for which one
/// decoded tile serves them all.
#[cfg(target_arch = "x86_64")]
fn in_place(hd: usize, queries: usize) -> Option<super::turbo4_avx2::Rows> {
    if isa() != Isa::Avx2 || queries > super::turbo4_avx2::MAX_QUERIES {
        return None;
    }
    let g = super::turbo::group_width(hd);
    Some(super::turbo4_avx2::Rows {
        hd,
        g,
        header: header(g),
    })
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

    fn decode(src: &[u8], table: &[f32; 16], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if isa() >= Isa::Avx512 {
            let h = header(out.len());
            // SAFETY: AVX-512F is present; the group holds out.len() / 2 index bytes after its
            // header, and groups are 64 or 128 values (whole steps of 16).
            unsafe { nibbles::decode16(&src[h..], table, read_norm(src), out) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if isa() >= Isa::Avx2 {
            let h = header(out.len());
            // SAFETY: AVX2 is present; the group holds out.len() / 2 index bytes after its header.
            unsafe { nibbles::decode(&src[h..], table, read_norm(src), out) };
            return;
        }
        let mut codes = [0u8; 128];
        let g = out.len();
        let norm = Self::unpack(src, &mut codes[..g]);
        super::turbo::simd::lookup(&codes[..g], table, norm, true, out);
    }

    #[cfg(target_arch = "x86_64")]
    fn dot_rows_in_place(
        hd: usize,
        table: &[f32; 16],
        qs: &[f32],
        rows: &[u8],
        scores: &mut [f32],
    ) -> bool {
        let Some(geom) = in_place(hd, qs.len() / hd) else {
            return false;
        };
        // SAFETY: AVX2 and FMA are present (`in_place` checked the level); rows are whole
        // turbo4 rows.
        unsafe { super::turbo4_avx2::dot_rows(geom, table, qs, rows, scores) };
        true
    }

    #[cfg(target_arch = "x86_64")]
    fn axpy_rows_in_place(
        hd: usize,
        table: &[f32; 16],
        w: &[f32],
        rows: &[u8],
        acc: &mut [f32],
    ) -> bool {
        let Some(geom) = in_place(hd, acc.len() / hd) else {
            return false;
        };
        // SAFETY: as in dot_rows_in_place.
        unsafe { super::turbo4_avx2::axpy_rows(geom, table, w, rows, acc) };
        true
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

/// Straight from packed nibbles to values: four bytes become eight indices in one register
/// (AVX2: the 16-entry table split in two 8-lane permutes and a blend), or eight bytes sixteen
/// indices (AVX-512: one 16-lane permute).
#[cfg(target_arch = "x86_64")]
mod nibbles {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn decode16(qs: &[u8], table: &[f32; 16], norm: f32, out: &mut [f32]) {
        let n = out.len().min(2 * qs.len());
        // SAFETY: each step reads 8 index bytes and writes 16 values below n.
        unsafe {
            let t = _mm512_mul_ps(_mm512_loadu_ps(table.as_ptr()), _mm512_set1_ps(norm));
            let mask = _mm_set1_epi8(0x0F);
            let mut i = 0;
            while i + 16 <= n {
                let b = _mm_loadl_epi64(qs.as_ptr().add(i / 2) as *const __m128i);
                // low nibble, high nibble of each byte, in value order
                let lo = _mm_and_si128(b, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
                let idx = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi));
                _mm512_storeu_ps(out.as_mut_ptr().add(i), _mm512_permutexvar_ps(idx, t));
                i += 16;
            }
        }
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn decode(qs: &[u8], table: &[f32; 16], norm: f32, out: &mut [f32]) {
        let n = out.len().min(2 * qs.len());
        // SAFETY: each step reads 4 index bytes and writes 8 values below n.
        unsafe {
            let lo = _mm256_mul_ps(_mm256_loadu_ps(table.as_ptr()), _mm256_set1_ps(norm));
            let hi = _mm256_mul_ps(_mm256_loadu_ps(table.as_ptr().add(8)), _mm256_set1_ps(norm));
            let shifts = _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4);
            let mask = _mm256_set1_epi32(0xF);
            let seven = _mm256_set1_epi32(7);
            let mut i = 0;
            while i + 8 <= n {
                let b = _mm_cvtsi32_si128(i32::from_le_bytes([
                    qs[i / 2],
                    qs[i / 2 + 1],
                    qs[i / 2 + 2],
                    qs[i / 2 + 3],
                ]));
                // [b0 b0 b1 b1 b2 b2 b3 b3] → low nibble, high nibble of each byte
                let dup = _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(b, b));
                let idx = _mm256_and_si256(_mm256_srlv_epi32(dup, shifts), mask);
                let upper = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, seven));
                let v = _mm256_blendv_ps(
                    _mm256_permutevar8x32_ps(lo, idx),
                    _mm256_permutevar8x32_ps(hi, idx),
                    upper,
                );
                _mm256_storeu_ps(out.as_mut_ptr().add(i), v);
                i += 8;
            }
        }
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

    /// Every decoder this CPU has gives the scalar unpack-and-lookup's values exactly.
    #[test]
    fn nibble_decoders_agree() {
        let table: [f32; 16] = std::array::from_fn(|i| i as f32 * 0.25 - 1.875);
        for g in [64, 128] {
            let src: Vec<u8> = (0..Turbo4::group_bytes(g))
                .map(|i| (i * 37 + 11) as u8)
                .collect();
            let mut codes = vec![0u8; g];
            let norm = Turbo4::unpack(&src, &mut codes);
            let want: Vec<f32> = codes.iter().map(|&c| table[c as usize] * norm).collect();
            let h = header(g);
            #[cfg(target_arch = "x86_64")]
            {
                let mut got = vec![0f32; g];
                if is_x86_feature_detected!("avx2") {
                    // SAFETY: AVX2 is present; src holds g / 2 index bytes after the header.
                    unsafe { nibbles::decode(&src[h..], &table, norm, &mut got) };
                    assert_eq!(got, want, "AVX2, group {g}");
                }
                if is_x86_feature_detected!("avx512f") {
                    // SAFETY: as above, AVX-512F.
                    unsafe { nibbles::decode16(&src[h..], &table, norm, &mut got) };
                    assert_eq!(got, want, "AVX-512, group {g}");
                }
            }
            let mut got = vec![0f32; g];
            Turbo4::decode(&src, &table, &mut got);
            assert_eq!(got, want, "dispatch, group {g}");
        }
    }
}

//! `out[i] = norm · table[codes[i]]` and the scale search's sums: AVX2 where the CPU has it.

use super::{Codebook, SCALES};

/// For each scale `sc` of [`SCALES`]: `Σ c·u` and `Σ c²` over the unit group `u`, `c` the
/// centroid of `u[j]·sc`, summed in index order with a rounding after every product and
/// every sum (the GPU's order; the AVX2 path keeps it lane by lane, no fused multiply-adds).
pub fn scale_sums(cb: &Codebook, u: &[f32]) -> ([f32; 16], [f32; 16]) {
    #[cfg(target_arch = "x86_64")]
    {
        use super::super::isa::{Isa, isa};
        if isa() >= Isa::Avx512 {
            // SAFETY: AVX-512F is present (the level says so).
            return unsafe { x86::scale_sums_512(&cb.centroids, &cb.mids, u) };
        }
        if isa() >= Isa::Avx2 {
            // SAFETY: AVX2 is present (the level says so).
            return unsafe { x86::scale_sums(&cb.centroids, &cb.mids, u) };
        }
    }
    scale_sums_portable(cb, u)
}

pub(super) fn scale_sums_portable(cb: &Codebook, u: &[f32]) -> ([f32; 16], [f32; 16]) {
    let (mut dots, mut ccs) = ([0f32; 16], [0f32; 16]);
    for (i, k) in SCALES.enumerate() {
        let sc = k as f32 / 16.0;
        for &v in u {
            let y = cb.centroids[cb.index(v * sc) as usize];
            dots[i] += y * v;
            ccs[i] += y * y;
        }
    }
    (dots, ccs)
}

pub fn lookup(codes: &[u8], table: &[f32; 16], norm: f32, wide: bool, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::super::isa::isa() >= super::super::isa::Isa::Avx2 && codes.len().is_multiple_of(8) {
        // SAFETY: AVX2 is present (the level says so); lengths are equal multiples of 8.
        return unsafe { x86::lookup(codes, table, norm, wide, out) };
    }
    let _ = wide;
    for (o, &c) in out.iter_mut().zip(codes) {
        *o = norm * table[c as usize];
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    /// [`super::scale_sums`] with the 16 scales in one register, as the AVX2 path.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn scale_sums_512(
        centroids: &[f32],
        mids: &[f32],
        u: &[f32],
    ) -> ([f32; 16], [f32; 16]) {
        let scales = scales();
        let (mut dots, mut ccs) = ([0f32; 16], [0f32; 16]);
        // SAFETY: loads and stores cover the 16-element arrays above.
        unsafe {
            let sc = _mm512_loadu_ps(scales.as_ptr());
            let (mut dot, mut cc) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            let c0 = _mm512_set1_ps(centroids[0]);
            for &v in u {
                let vv = _mm512_set1_ps(v);
                let x = _mm512_mul_ps(vv, sc);
                let mut y = c0;
                for (m, c) in mids.iter().zip(&centroids[1..]) {
                    let le = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(_mm512_set1_ps(*m), x);
                    y = _mm512_mask_blend_ps(le, y, _mm512_set1_ps(*c));
                }
                dot = _mm512_add_ps(dot, _mm512_mul_ps(y, vv));
                cc = _mm512_add_ps(cc, _mm512_mul_ps(y, y));
            }
            _mm512_storeu_ps(dots.as_mut_ptr(), dot);
            _mm512_storeu_ps(ccs.as_mut_ptr(), cc);
        }
        (dots, ccs)
    }

    fn scales() -> [f32; 16] {
        std::array::from_fn(|i| (*super::super::SCALES.start() + i as u32) as f32 / 16.0)
    }

    /// [`super::scale_sums`] with the 16 scales in two registers: each value's centroid at
    /// every scale by a blend per decision point (the points ascend, so the last one at or
    /// below the value picks it, as `Codebook::index` counts them).
    #[target_feature(enable = "avx2")]
    pub unsafe fn scale_sums(centroids: &[f32], mids: &[f32], u: &[f32]) -> ([f32; 16], [f32; 16]) {
        let scales = scales();
        let (mut dots, mut ccs) = ([0f32; 16], [0f32; 16]);
        // SAFETY: loads and stores cover the 16-element arrays above.
        unsafe {
            let sc = [
                _mm256_loadu_ps(scales.as_ptr()),
                _mm256_loadu_ps(scales.as_ptr().add(8)),
            ];
            let mut dot = [_mm256_setzero_ps(); 2];
            let mut cc = [_mm256_setzero_ps(); 2];
            // Every decision point and centroid broadcast once, so that each compare and
            // blend below reads its operand from memory in one instruction (broadcasting
            // them per value doubled the search's instructions on AVX2).
            let n = mids.len().min(15);
            let mut mb = [_mm256_setzero_ps(); 15];
            let mut cb = [_mm256_setzero_ps(); 15];
            for t in 0..n {
                mb[t] = _mm256_set1_ps(mids[t]);
                cb[t] = _mm256_set1_ps(centroids[t + 1]);
            }
            let c0 = _mm256_set1_ps(centroids[0]);
            for &v in u {
                let vv = _mm256_set1_ps(v);
                for h in 0..2 {
                    let x = _mm256_mul_ps(vv, sc[h]);
                    let mut y = c0;
                    for (m, c) in mb[..n].iter().zip(&cb[..n]) {
                        // m ≤ x, written x ≥ m so the memory operand folds
                        let le = _mm256_cmp_ps::<_CMP_GE_OQ>(x, *m);
                        y = _mm256_blendv_ps(y, *c, le);
                    }
                    dot[h] = _mm256_add_ps(dot[h], _mm256_mul_ps(y, vv));
                    cc[h] = _mm256_add_ps(cc[h], _mm256_mul_ps(y, y));
                }
            }
            for h in 0..2 {
                _mm256_storeu_ps(dots.as_mut_ptr().add(8 * h), dot[h]);
                _mm256_storeu_ps(ccs.as_mut_ptr().add(8 * h), cc[h]);
            }
        }
        (dots, ccs)
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn lookup(codes: &[u8], table: &[f32; 16], norm: f32, wide: bool, out: &mut [f32]) {
        let n = codes.len().min(out.len());
        // SAFETY: every load and store covers 8 elements below n.
        unsafe {
            let lo = _mm256_mul_ps(_mm256_loadu_ps(table.as_ptr()), _mm256_set1_ps(norm));
            let hi = _mm256_mul_ps(_mm256_loadu_ps(table.as_ptr().add(8)), _mm256_set1_ps(norm));
            let seven = _mm256_set1_epi32(7);
            let mut i = 0;
            while i + 8 <= n {
                let idx =
                    _mm256_cvtepu8_epi32(_mm_loadl_epi64(codes.as_ptr().add(i) as *const __m128i));
                let mut v = _mm256_permutevar8x32_ps(lo, idx);
                if wide {
                    let upper = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, seven));
                    v = _mm256_blendv_ps(v, _mm256_permutevar8x32_ps(hi, idx), upper);
                }
                _mm256_storeu_ps(out.as_mut_ptr().add(i), v);
                i += 8;
            }
        }
    }
}

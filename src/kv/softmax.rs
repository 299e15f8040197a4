//! The softmax's exponentials over attention scores: `x ← e^(x − max)` for a row of scores, with
//! their sum. At depth this is one `expf` per score per query: at 4096 positions a decode step of
//! SmolLM2 takes 1.1 M of them, a fifth of the step through libm's scalar `expf`, so on AVX2 they
//! run 8 at a time (Cephes' `expf` polynomial, within 2 ulp of libm's).

use super::codec::isa::{Isa, isa};

/// `x ← e^(x − max)` for every score of `xs` (−∞ gives 0); returns their sum.
pub fn exp_sum(xs: &mut [f32], max: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if isa() >= Isa::Avx2 {
        // SAFETY: AVX2 and FMA are present (the level says so).
        return unsafe { avx2::exp_sum(xs, max) };
    }
    exp_sum_portable(xs, max)
}

fn exp_sum_portable(xs: &mut [f32], max: f32) -> f32 {
    let mut sum = 0f32;
    for x in xs.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Below this e^x is under f32's smallest normal: 0 (libm would give a subnormal, which no
    /// softmax weight beside the max's 1 can tell from 0).
    const LOW: f32 = -87.33655;

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_sum(xs: &mut [f32], max: f32) -> f32 {
        let n = xs.len();
        let p = xs.as_mut_ptr();
        let mut i = 0;
        // SAFETY: every load and store covers 8 values below n.
        let mut sum = unsafe {
            let m = _mm256_set1_ps(max);
            let mut acc = _mm256_setzero_ps();
            while i + 8 <= n {
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), m));
                _mm256_storeu_ps(p.add(i), e);
                acc = _mm256_add_ps(acc, e);
                i += 8;
            }
            crate::kv::codec::simd::hsum(acc)
        };
        for x in &mut xs[i..] {
            *x = (*x - max).exp();
            sum += *x;
        }
        sum
    }

    /// e^x, lane by lane: x = n·ln2 + r with |r| ≤ ln2/2, e^r by Cephes' degree-6 polynomial,
    /// times 2^n through the exponent bits.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp8(x: __m256) -> __m256 {
        let keep = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(LOW));
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(LOW)),
            _mm256_set1_ps(88.37626),
        );
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        // ln2 in two parts, so that n·ln2 is subtracted without rounding away r
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut y = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_65,
            0.5,
        ] {
            y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
        }
        let y = _mm256_fmadd_ps(
            y,
            _mm256_mul_ps(r, r),
            _mm256_add_ps(r, _mm256_set1_ps(1.0)),
        );
        let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(pow2)), keep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every value the softmax sees (0 down to far below the smallest weight, −∞ for masked
    /// keys) against libm, and the sum.
    #[test]
    fn exponentials_match_libm() {
        let mut xs: Vec<f32> = (0..20_000).map(|i| -(i as f32) * 0.0051).collect();
        xs.extend([f32::NEG_INFINITY, -1e30, -87.0, -88.0, -0.0, 0.0]);
        let want: Vec<f32> = xs.iter().map(|x| (x - 0.25).exp()).collect();
        let mut got = xs.clone();
        let sum = exp_sum(&mut got, 0.25);
        for ((x, w), g) in xs.iter().zip(&want).zip(&got) {
            let tol = 2.5 * f32::EPSILON * w.abs();
            assert!(
                (w - g).abs() <= tol || (*w < f32::MIN_POSITIVE && *g == 0.0),
                "e^({x} − 0.25): {g} vs {w}"
            );
        }
        let want_sum: f64 = want.iter().map(|&w| w as f64).sum();
        assert!((sum as f64 - want_sum).abs() < 1e-5 * want_sum);
        let mut masked = [f32::NEG_INFINITY; 11];
        assert_eq!(exp_sum(&mut masked, 0.0), 0.0);
        assert!(masked.iter().all(|&x| x == 0.0));
    }
}

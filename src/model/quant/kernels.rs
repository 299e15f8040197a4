//! Dot products of one weight row (ggml blocks) with one 8-bit activation row.
//! ggml layouts: `block_q4_1` = f16 d, f16 m, 16 nibble bytes (value d·q + m);
//! `block_q5_0` = f16 d, 4 bytes of high bits, 16 nibble bytes (value d·(q − 16)).
//! Element j < 16 lives in the low nibble of byte j, element j + 16 in its high nibble.

use half::f16;

use super::{Q8Block, QK};

pub const Q4_1_BYTES: usize = 20;
pub const Q5_0_BYTES: usize = 22;

/// Dot of one weight row with one activation row.
pub type DotFn = fn(&[u8], &[Q8Block]) -> f32;

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A weight block unpacked for reuse across many activation rows (prefill): value = d·q + m with
/// q unsigned in 0..32. Q4_1 stores d and m; Q5_0's value d·(q − 16) has m = −16·d.
#[derive(Clone, Copy)]
pub struct Unpacked {
    d: f32,
    m: f32,
    qs: [u8; QK],
}

impl Default for Unpacked {
    fn default() -> Self {
        Self {
            d: 0.0,
            m: 0.0,
            qs: [0; QK],
        }
    }
}

pub fn unpack_q4_1(w: &[u8], out: &mut [Unpacked]) {
    for (b, u) in w.chunks_exact(Q4_1_BYTES).zip(out) {
        (u.d, u.m) = block_scales(b);
        for (j, &q) in b[4..].iter().enumerate() {
            u.qs[j] = q & 0x0F;
            u.qs[j + QK / 2] = q >> 4;
        }
    }
}

pub fn unpack_q5_0(w: &[u8], out: &mut [Unpacked]) {
    for (b, u) in w.chunks_exact(Q5_0_BYTES).zip(out) {
        let (d, qh) = q5_0_parts(b);
        (u.d, u.m) = (d, -16.0 * d);
        for (j, &q) in b[6..].iter().enumerate() {
            u.qs[j] = (q & 0x0F) | ((((qh >> j) & 1) << 4) as u8);
            u.qs[j + QK / 2] = (q >> 4) | ((((qh >> (j + 16)) & 1) << 4) as u8);
        }
    }
}

/// Dot of one unpacked weight row with one activation row.
pub type UnpackedDotFn = fn(&[Unpacked], &[Q8Block]) -> f32;

pub fn unpacked() -> UnpackedDotFn {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: handed out only after AVX2 and FMA were detected.
        return |w, x| unsafe { unpacked_avx2(w, x) };
    }
    unpacked_scalar
}

fn unpacked_scalar(w: &[Unpacked], x: &[Q8Block]) -> f32 {
    let mut sum = 0f32;
    for (u, y) in w.iter().zip(x) {
        let acc: i32 =
            u.qs.iter()
                .zip(&y.qs)
                .map(|(&a, &b)| a as i32 * b as i32)
                .sum();
        sum += u.d * y.d * acc as f32 + u.m * y.s;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn unpacked_avx2(w: &[Unpacked], x: &[Q8Block]) -> f32 {
    use std::arch::x86_64::*;
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    let mut mins = 0f32;
    for (u, y) in w.iter().zip(x) {
        // SAFETY: both arrays are 32 bytes.
        let (qx, qy) = unsafe {
            (
                _mm256_loadu_si256(u.qs.as_ptr() as *const __m256i),
                _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i),
            )
        };
        let prod = _mm256_madd_epi16(_mm256_maddubs_epi16(qx, qy), ones);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(u.d * y.d), _mm256_cvtepi32_ps(prod), acc);
        mins += u.m * y.s;
    }
    hsum(acc) + mins
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// The Q4_1 kernel for this CPU, chosen once per matmul rather than per row.
pub fn q4_1() -> DotFn {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: handed out only after AVX2 and FMA were detected.
        return |w, x| unsafe { q4_1_avx2(w, x) };
    }
    q4_1_scalar
}

/// The Q5_0 kernel for this CPU.
pub fn q5_0() -> DotFn {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: handed out only after AVX2 and FMA were detected.
        return |w, x| unsafe { q5_0_avx2(w, x) };
    }
    q5_0_scalar
}

fn block_scales(b: &[u8]) -> (f32, f32) {
    (
        f16::from_le_bytes([b[0], b[1]]).to_f32(),
        f16::from_le_bytes([b[2], b[3]]).to_f32(),
    )
}

fn q4_1_scalar(w: &[u8], x: &[Q8Block]) -> f32 {
    let mut sum = 0f32;
    for (b, y) in w.chunks_exact(Q4_1_BYTES).zip(x) {
        let (d, m) = block_scales(b);
        let qs = &b[4..];
        let mut acc = 0i32;
        for (j, &q) in qs.iter().enumerate().take(QK / 2) {
            acc += (q & 0x0F) as i32 * y.qs[j] as i32;
            acc += (q >> 4) as i32 * y.qs[j + QK / 2] as i32;
        }
        sum += d * y.d * acc as f32 + m * y.s;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn q4_1_avx2(w: &[u8], x: &[Q8Block]) -> f32 {
    use std::arch::x86_64::*;
    let mask = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    let mut mins = 0f32;
    for (b, y) in w.chunks_exact(Q4_1_BYTES).zip(x) {
        let (d, m) = block_scales(b);
        // SAFETY: each block holds 16 nibble bytes after its two f16 scales; y.qs is 32 bytes.
        let (packed, qy) = unsafe {
            (
                _mm_loadu_si128(b.as_ptr().add(4) as *const __m128i),
                _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i),
            )
        };
        // Low nibbles are elements 0..16, high nibbles 16..32.
        let both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
        let qx = _mm256_and_si256(both, mask);
        let prod = _mm256_madd_epi16(_mm256_maddubs_epi16(qx, qy), ones);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d * y.d), _mm256_cvtepi32_ps(prod), acc);
        mins += m * y.s;
    }
    hsum(acc) + mins
}

fn q5_0_parts(b: &[u8]) -> (f32, u32) {
    (
        f16::from_le_bytes([b[0], b[1]]).to_f32(),
        u32::from_le_bytes([b[2], b[3], b[4], b[5]]),
    )
}

fn q5_0_scalar(w: &[u8], x: &[Q8Block]) -> f32 {
    let mut sum = 0f32;
    for (b, y) in w.chunks_exact(Q5_0_BYTES).zip(x) {
        let (d, qh) = q5_0_parts(b);
        let mut acc = 0i32;
        for (j, &q) in b[6..].iter().enumerate() {
            let lo = (q & 0x0F) as i32 | ((((qh >> j) & 1) << 4) as i32);
            let hi = (q >> 4) as i32 | ((((qh >> (j + 16)) & 1) << 4) as i32);
            acc += (lo - 16) * y.qs[j] as i32 + (hi - 16) * y.qs[j + QK / 2] as i32;
        }
        sum += d * y.d * acc as f32;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn q5_0_avx2(w: &[u8], x: &[Q8Block]) -> f32 {
    use std::arch::x86_64::*;
    let mask = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    // Byte i of the high-bit word sits in bytes 8i..8i+8; byte k of each 8-byte lane tests bit k.
    let spread = _mm256_set_epi64x(
        0x0303030303030303,
        0x0202020202020202,
        0x0101010101010101,
        0,
    );
    let bit = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
    let sixteen = _mm256_set1_epi8(0x10);
    let mut acc = _mm256_setzero_ps();
    let mut offs = 0f32;
    for (b, y) in w.chunks_exact(Q5_0_BYTES).zip(x) {
        let (d, qh) = q5_0_parts(b);
        // SAFETY: 16 nibble bytes follow the scale and high bits; y.qs is 32 bytes.
        let (packed, qy) = unsafe {
            (
                _mm_loadu_si128(b.as_ptr().add(6) as *const __m128i),
                _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i),
            )
        };
        let nib = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), mask);
        let hb = _mm256_shuffle_epi8(_mm256_set1_epi32(qh as i32), spread);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(hb, bit), bit);
        let qx = _mm256_or_si256(nib, _mm256_and_si256(set, sixteen));
        let prod = _mm256_madd_epi16(_mm256_maddubs_epi16(qx, qy), ones);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d * y.d), _mm256_cvtepi32_ps(prod), acc);
        // Σ(q − 16)·y = Σq·y − 16·Σy
        offs -= 16.0 * d * y.s;
    }
    hsum(acc) + offs
}

#[cfg(test)]
mod tests {
    use super::super::quantize_block;
    use super::*;

    fn activations() -> (Vec<f32>, Vec<Q8Block>) {
        let xf: Vec<f32> = (0..64).map(|i| ((i as f32) * 0.37).sin()).collect();
        let qx = xf.chunks_exact(QK).map(quantize_block).collect();
        (xf, qx)
    }

    fn check(simd: f32, scalar: f32, exact: f32) {
        assert!(
            (simd - scalar).abs() < 1e-4,
            "simd {simd} vs scalar {scalar}"
        );
        assert!(
            (scalar - exact).abs() < 0.02 * exact.abs().max(1.0),
            "{scalar} vs {exact}"
        );
    }

    #[test]
    fn q4_1_matches_dequantized_dot() {
        let (xf, qx) = activations();
        let (mut w, mut wf) = (Vec::new(), Vec::new());
        for blk in 0..2u8 {
            let (d, m) = (0.05 + blk as f32 * 0.01, -0.3);
            w.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            w.extend_from_slice(&f16::from_f32(m).to_le_bytes());
            let qs: Vec<u8> = (0..16u8)
                .map(|j| j.wrapping_mul(7).wrapping_add(blk))
                .collect();
            w.extend_from_slice(&qs);
            let (d, m) = (f16::from_f32(d).to_f32(), f16::from_f32(m).to_f32());
            wf.extend(qs.iter().map(|q| d * (q & 0x0F) as f32 + m));
            wf.extend(qs.iter().map(|q| d * (q >> 4) as f32 + m));
        }
        let exact: f32 = wf.iter().zip(&xf).map(|(a, b)| a * b).sum();
        check(q4_1()(&w, &qx), q4_1_scalar(&w, &qx), exact);
        let mut u = vec![Unpacked::default(); 2];
        unpack_q4_1(&w, &mut u);
        check(unpacked()(&u, &qx), unpacked_scalar(&u, &qx), exact);
    }

    #[test]
    fn q5_0_matches_dequantized_dot() {
        let (xf, qx) = activations();
        let (mut w, mut wf) = (Vec::new(), Vec::new());
        for blk in 0..2u32 {
            let d = f16::from_f32(0.04 + blk as f32 * 0.01);
            let qh: u32 = 0xA5C3_0F96 ^ (blk * 0x1111_1111);
            w.extend_from_slice(&d.to_le_bytes());
            w.extend_from_slice(&qh.to_le_bytes());
            let qs: Vec<u8> = (0..16u32).map(|j| (j * 11 + blk * 3) as u8).collect();
            w.extend_from_slice(&qs);
            let d = d.to_f32();
            let val = |q: u8, bit: u32| d * (((q as u32) | (((qh >> bit) & 1) << 4)) as f32 - 16.0);
            wf.extend(qs.iter().enumerate().map(|(j, q)| val(q & 0x0F, j as u32)));
            wf.extend(
                qs.iter()
                    .enumerate()
                    .map(|(j, q)| val(q >> 4, j as u32 + 16)),
            );
        }
        let exact: f32 = wf.iter().zip(&xf).map(|(a, b)| a * b).sum();
        check(q5_0()(&w, &qx), q5_0_scalar(&w, &qx), exact);
        let mut u = vec![Unpacked::default(); 2];
        unpack_q5_0(&w, &mut u);
        check(unpacked()(&u, &qx), unpacked_scalar(&u, &qx), exact);
    }
}

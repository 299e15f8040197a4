//! 16-bit float rows: f16 (llama.cpp's default cache) and bf16.

use half::{bf16, f16};

use super::KvCodec;

pub struct F16Codec;
pub struct Bf16Codec;

macro_rules! half_codec {
    ($codec:ty, $t:ty $(, $batched:ident)?) => {
        impl KvCodec for $codec {
            $(
            fn dot_rows(&self, q: &[f32], rows: &[u8], out: &mut [f32]) {
                if !<$batched>::dot_rows_simd(q, rows, out) {
                    for (o, row) in out.iter_mut().zip(rows.chunks_exact(2 * q.len())) {
                        *o = self.dot(q, row);
                    }
                }
            }
            fn axpy_rows(&self, w: &[f32], rows: &[u8], acc: &mut [f32]) {
                if !<$batched>::axpy_rows_simd(w, rows, acc) {
                    for (&wi, row) in w.iter().zip(rows.chunks_exact(2 * acc.len())) {
                        self.axpy(wi, row, acc);
                    }
                }
            }
            )?
            fn bytes_per_row(&self, head_dim: usize) -> usize {
                2 * head_dim
            }
            fn quantize_row(&self, src: &[f32], dst: &mut [u8]) {
                let dst: &mut [$t] = bytemuck::cast_slice_mut(dst);
                for (d, s) in dst.iter_mut().zip(src) {
                    *d = <$t>::from_f32(*s);
                }
            }
            fn dequantize_row(&self, src: &[u8], dst: &mut [f32]) {
                let src: &[$t] = bytemuck::cast_slice(src);
                for (d, s) in dst.iter_mut().zip(src) {
                    *d = s.to_f32();
                }
            }
            fn dot(&self, q: &[f32], row: &[u8]) -> f32 {
                let row: &[$t] = bytemuck::cast_slice(row);
                let mut acc = [0f32; 8];
                let n = q.len() / 8 * 8;
                for c in (0..n).step_by(8) {
                    for i in 0..8 {
                        acc[i] += q[c + i] * row[c + i].to_f32();
                    }
                }
                let mut s: f32 = acc.iter().sum();
                for i in n..q.len() {
                    s += q[i] * row[i].to_f32();
                }
                s
            }
            fn axpy(&self, w: f32, row: &[u8], acc: &mut [f32]) {
                let row: &[$t] = bytemuck::cast_slice(row);
                for (a, r) in acc.iter_mut().zip(row) {
                    *a += w * r.to_f32();
                }
            }
        }
    };
}

half_codec!(F16Codec, f16, F16Codec);
half_codec!(Bf16Codec, bf16);

impl F16Codec {
    fn has_f16c() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// The batched decode kernels: F16C converts 8 halves per instruction.
    pub fn dot_rows_simd(q: &[f32], rows: &[u8], out: &mut [f32]) -> bool {
        #[cfg(target_arch = "x86_64")]
        if Self::has_f16c() && q.len().is_multiple_of(8) {
            // SAFETY: features detected above; rows hold out.len() rows of q.len() halves.
            unsafe { simd::dot_rows(q, bytemuck::cast_slice(rows), out) };
            return true;
        }
        false
    }

    pub fn axpy_rows_simd(w: &[f32], rows: &[u8], acc: &mut [f32]) -> bool {
        #[cfg(target_arch = "x86_64")]
        if Self::has_f16c() && acc.len().is_multiple_of(8) {
            // SAFETY: as above.
            unsafe { simd::axpy_rows(w, bytemuck::cast_slice(rows), acc) };
            return true;
        }
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use half::f16;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_rows(q: &[f32], rows: &[f16], out: &mut [f32]) {
        let d = q.len();
        for (o, row) in out.iter_mut().zip(rows.chunks_exact(d)) {
            let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut i = 0;
            // SAFETY: i + 8 <= d for every load; d is a multiple of 8.
            unsafe {
                while i + 16 <= d {
                    let k0 =
                        _mm256_cvtph_ps(_mm_loadu_si128(row.as_ptr().add(i) as *const __m128i));
                    let k1 =
                        _mm256_cvtph_ps(_mm_loadu_si128(row.as_ptr().add(i + 8) as *const __m128i));
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(i)), k0, a0);
                    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(i + 8)), k1, a1);
                    i += 16;
                }
                if i < d {
                    let k0 =
                        _mm256_cvtph_ps(_mm_loadu_si128(row.as_ptr().add(i) as *const __m128i));
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(i)), k0, a0);
                }
            }
            *o = hsum(_mm256_add_ps(a0, a1));
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn axpy_rows(w: &[f32], rows: &[f16], acc: &mut [f32]) {
        let d = acc.len();
        // Accumulate 8 lanes at a time across all rows, so acc stays in registers per lane block.
        for c in (0..d).step_by(8) {
            // SAFETY: c + 8 <= d; row r spans r*d..(r+1)*d of rows.
            unsafe {
                let mut a = _mm256_loadu_ps(acc.as_ptr().add(c));
                for (r, &wi) in w.iter().enumerate() {
                    let v = _mm256_cvtph_ps(_mm_loadu_si128(
                        rows.as_ptr().add(r * d + c) as *const __m128i
                    ));
                    a = _mm256_fmadd_ps(_mm256_set1_ps(wi), v, a);
                }
                _mm256_storeu_ps(acc.as_mut_ptr().add(c), a);
            }
        }
    }

    #[target_feature(enable = "avx2")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_round_trip_within_half_precision() {
        let x: Vec<f32> = (0..128).map(|i| (i as f32 * 0.11).cos() * 3.0).collect();
        let c = F16Codec;
        let mut row = vec![0u8; c.bytes_per_row(128)];
        c.quantize_row(&x, &mut row);
        let mut y = vec![0f32; 128];
        c.dequantize_row(&row, &mut y);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() <= a.abs() * 1e-3 + 1e-6, "{a} vs {b}");
        }
        let mut acc = vec![0f32; 128];
        c.axpy(2.0, &row, &mut acc);
        assert!((acc[5] - 2.0 * y[5]).abs() < 1e-6);
    }

    #[test]
    fn batched_rows_match_row_by_row() {
        let c = F16Codec;
        for d in [64, 128, 256] {
            let n = 5;
            let rows_f: Vec<f32> = (0..n * d)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1)
                .collect();
            let mut rows = vec![0u8; n * c.bytes_per_row(d)];
            for (src, dst) in rows_f.chunks(d).zip(rows.chunks_mut(c.bytes_per_row(d))) {
                c.quantize_row(src, dst);
            }
            let q: Vec<f32> = (0..d).map(|i| (i as f32 * 0.3).sin()).collect();
            let mut got = vec![0f32; n];
            c.dot_rows(&q, &rows, &mut got);
            let w = [0.1, -0.2, 0.3, 0.05, 1.0];
            let (mut acc, mut want_acc) = (vec![0.5f32; d], vec![0.5f32; d]);
            c.axpy_rows(&w, &rows, &mut acc);
            for (i, row) in rows.chunks(c.bytes_per_row(d)).enumerate() {
                assert!((got[i] - c.dot(&q, row)).abs() < 1e-4);
                c.axpy(w[i], row, &mut want_acc);
            }
            for (a, b) in acc.iter().zip(&want_acc) {
                assert!((a - b).abs() < 1e-5);
            }
        }
    }
}

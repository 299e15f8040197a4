//! 16-bit float rows: f16 (llama.cpp's default cache) and bf16. f16 rows decode with F16C
//! (8 halves per instruction) where the CPU has it.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use super::KvCodec;

pub struct F16Codec;
pub struct Bf16Codec;

macro_rules! half_codec {
    ($codec:ty, $t:ty, $decode:path) => {
        impl KvCodec for $codec {
            fn bytes_per_row(&self, head_dim: usize) -> usize {
                2 * head_dim
            }
            fn quantize_row(&self, src: &[f32], dst: &mut [u8]) {
                let dst: &mut [$t] = bytemuck::cast_slice_mut(dst);
                dst.convert_from_f32_slice(src);
            }
            fn dequantize_row(&self, src: &[u8], dst: &mut [f32]) {
                let src: &[$t] = bytemuck::cast_slice(src);
                src.convert_to_f32_slice(dst);
            }
            fn decode_rows(&self, _head_dim: usize, rows: &[u8], out: &mut [f32]) {
                $decode(bytemuck::cast_slice(rows), out);
            }
        }
    };
}

half_codec!(F16Codec, f16, decode_f16);
half_codec!(Bf16Codec, bf16, decode_bf16);

fn decode_f16(src: &[f16], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::isa::isa() >= super::isa::Isa::Avx2 {
        // SAFETY: F16C and AVX are present (the AVX2 level includes them).
        unsafe { f16c::decode(src, out) };
        return;
    }
    src.convert_to_f32_slice(out);
}

fn decode_bf16(src: &[bf16], out: &mut [f32]) {
    // bf16 is the top half of an f32: a shift, which LLVM vectorizes.
    let bits: &[u16] = bytemuck::cast_slice(src);
    for (o, &b) in out.iter_mut().zip(bits) {
        *o = f32::from_bits((b as u32) << 16);
    }
}

#[cfg(target_arch = "x86_64")]
mod f16c {
    use half::f16;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx,f16c")]
    pub unsafe fn decode(src: &[f16], out: &mut [f32]) {
        let n = src.len().min(out.len());
        let mut i = 0;
        // SAFETY: every load and store covers 8 elements below n.
        unsafe {
            while i + 8 <= n {
                let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
                _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
                i += 8;
            }
        }
        for j in i..n {
            out[j] = src[j].to_f32();
        }
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

    /// The fused multi-query paths agree with one query and one row at a time, across tiles.
    #[test]
    fn fused_rows_match_row_by_row() {
        let c = F16Codec;
        for d in [64, 128, 256] {
            let (n, m) = (70, 5);
            let rb = c.bytes_per_row(d);
            let rows_f: Vec<f32> = (0..n * d)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1)
                .collect();
            let mut rows = vec![0u8; n * rb];
            for (src, dst) in rows_f.chunks(d).zip(rows.chunks_mut(rb)) {
                c.quantize_row(src, dst);
            }
            let qs: Vec<f32> = (0..m * d).map(|i| (i as f32 * 0.3).sin()).collect();
            let mut scores = vec![0f32; m * n];
            c.dot_rows(d, &qs, &rows, &mut scores);
            let w: Vec<f32> = (0..m * n).map(|i| (i as f32 * 0.05).cos()).collect();
            let mut acc = vec![0.5f32; m * d];
            c.axpy_rows(d, &w, &rows, &mut acc);
            for i in 0..m {
                let q = &qs[i * d..(i + 1) * d];
                let mut want = vec![0.5f32; d];
                for (j, row) in rows.chunks(rb).enumerate() {
                    assert!((scores[i * n + j] - c.dot(q, row)).abs() < 1e-4);
                    c.axpy(w[i * n + j], row, &mut want);
                }
                for (a, b) in acc[i * d..(i + 1) * d].iter().zip(&want) {
                    assert!((a - b).abs() < 1e-4);
                }
            }
        }
    }
}

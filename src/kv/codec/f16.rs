//! 16-bit float rows: f16 (llama.cpp's default cache) and bf16. Decoding uses `half`'s slice
//! conversion, which runs F16C on x86 CPUs that have it.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use super::KvCodec;

pub struct F16Codec;
pub struct Bf16Codec;

macro_rules! half_codec {
    ($codec:ty, $t:ty) => {
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
                let rows: &[$t] = bytemuck::cast_slice(rows);
                rows.convert_to_f32_slice(out);
            }
        }
    };
}

half_codec!(F16Codec, f16);
half_codec!(Bf16Codec, bf16);

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

//! 16-bit float rows: f16 (llama.cpp's default cache) and bf16.

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
}

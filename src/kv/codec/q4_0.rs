//! q4_0 rows: ggml's `block_q4_0` (f16 scale + 16 nibble bytes per 32 values), byte for byte.
//! Value j < 16 is the low nibble of byte j, value j + 16 its high nibble; both offset by 8.

use half::f16;

use super::KvCodec;

const QK: usize = 32;
const BLOCK: usize = 18;

pub struct Q4_0Codec;

fn scale(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// The 32 signed values of one block.
fn values(b: &[u8]) -> [f32; QK] {
    let mut v = [0f32; QK];
    for (j, &q) in b[2..].iter().enumerate() {
        v[j] = (q & 0x0F) as f32 - 8.0;
        v[j + QK / 2] = (q >> 4) as f32 - 8.0;
    }
    v
}

impl KvCodec for Q4_0Codec {
    fn block_size(&self) -> usize {
        QK
    }

    fn bytes_per_row(&self, head_dim: usize) -> usize {
        head_dim / QK * BLOCK
    }

    fn quantize_row(&self, src: &[f32], dst: &mut [u8]) {
        for (x, b) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(BLOCK)) {
            // ggml scales by the signed value of largest magnitude, so it maps to -8 exactly.
            let max = x
                .iter()
                .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
            let d = max / -8.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            b[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
            let q = |v: f32| ((v * id + 8.5) as i8).clamp(0, 15) as u8;
            for j in 0..QK / 2 {
                b[2 + j] = q(x[j]) | (q(x[j + QK / 2]) << 4);
            }
        }
    }

    fn dequantize_row(&self, src: &[u8], dst: &mut [f32]) {
        for (b, y) in src.chunks_exact(BLOCK).zip(dst.chunks_exact_mut(QK)) {
            let d = scale(b);
            for (o, v) in y.iter_mut().zip(values(b)) {
                *o = d * v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_vectors::{ggml_test_row, hex};
    use super::*;

    #[test]
    fn blocks_equal_ggml() {
        // gguf-py's reference quantizer (quants.quantize, Q4_0) on the same 64 values.
        let want = "c2b6f8c37121152a5eafdcf7c37121052a6e91b61a5ebeecf7b26031062b6eaefbf7c360";
        let x = ggml_test_row();
        let mut row = vec![0u8; Q4_0Codec.bytes_per_row(64)];
        Q4_0Codec.quantize_row(&x, &mut row);
        assert_eq!(hex(&row), want);
        let mut y = vec![0f32; 64];
        Q4_0Codec.dequantize_row(&row, &mut y);
        let dot: f32 = x.iter().zip(&y).map(|(a, b)| a * b).sum();
        assert!((Q4_0Codec.dot(&x, &row) - dot).abs() < 1e-3);
    }
}

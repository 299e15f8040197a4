//! q8_0 rows: ggml's `block_q8_0` (f16 scale + 32 signed bytes per 32 values), byte for byte.

use half::f16;

use super::KvCodec;

const QK: usize = 32;
const BLOCK: usize = 34;

pub struct Q8_0Codec;

fn scale(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

impl KvCodec for Q8_0Codec {
    fn block_size(&self) -> usize {
        QK
    }

    fn bytes_per_row(&self, head_dim: usize) -> usize {
        head_dim / QK * BLOCK
    }

    fn quantize_row(&self, src: &[f32], dst: &mut [u8]) {
        for (x, b) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(BLOCK)) {
            let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            b[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
            for (q, v) in b[2..].iter_mut().zip(x) {
                *q = (v * id).round() as i8 as u8;
            }
        }
    }

    fn dequantize_row(&self, src: &[u8], dst: &mut [f32]) {
        for (b, y) in src.chunks_exact(BLOCK).zip(dst.chunks_exact_mut(QK)) {
            let d = scale(b);
            for (o, &q) in y.iter_mut().zip(&b[2..]) {
                *o = d * q as i8 as f32;
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
        // gguf-py's reference quantizer (quants.quantize, Q8_0) on the same 64 values.
        let want = "cf26004c776d35d8a199c4114a73682fe69d95c20f5b70632ae0ab92c00d587f5e249f26daa49fbb0c587f6f1fd49f9bcc0a567b6a2dce9a98ca1b53786527dc9695c819";
        let x = ggml_test_row();
        let mut row = vec![0u8; Q8_0Codec.bytes_per_row(64)];
        Q8_0Codec.quantize_row(&x, &mut row);
        assert_eq!(hex(&row), want);
        let mut y = vec![0f32; 64];
        Q8_0Codec.dequantize_row(&row, &mut y);
        let dot: f32 = x.iter().zip(&y).map(|(a, b)| a * b).sum();
        assert!((Q8_0Codec.dot(&x, &row) - dot).abs() < 1e-3);
    }
}

//! f32 rows: exact storage, the reference the other codecs are measured against.

use super::KvCodec;

pub struct F32Codec;

impl KvCodec for F32Codec {
    fn bytes_per_row(&self, head_dim: usize) -> usize {
        4 * head_dim
    }
    fn quantize_row(&self, src: &[f32], dst: &mut [u8]) {
        dst.copy_from_slice(bytemuck::cast_slice(src));
    }
    fn dequantize_row(&self, src: &[u8], dst: &mut [f32]) {
        dst.copy_from_slice(bytemuck::cast_slice(src));
    }
    fn decode_rows(&self, _head_dim: usize, rows: &[u8], out: &mut [f32]) {
        out.copy_from_slice(bytemuck::cast_slice(rows));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_is_exact() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
        let c = F32Codec;
        let mut row = vec![0u8; c.bytes_per_row(64)];
        c.quantize_row(&x, &mut row);
        let mut y = vec![0f32; 64];
        c.dequantize_row(&row, &mut y);
        assert_eq!(x, y);
        let d: f32 = x.iter().map(|v| v * v).sum();
        assert!((c.dot(&x, &row) - d).abs() < 1e-4);
    }
}

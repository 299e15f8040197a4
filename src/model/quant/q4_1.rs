//! Q4_1 weights (SmolLM2's type) times f32 activations. candle's Q4_1 dot is scalar; this one
//! quantizes the activations to 8 bits once per row (as ggml does, Q8_1) and uses AVX2 integer
//! dot products, reading the weights straight from the memory map.

use std::sync::Arc;

use anyhow::{Result, bail};
use candle_core::{Device, Tensor};
use half::f16;
use rayon::prelude::*;

use crate::model::gguf::GgufFile;

const QK: usize = 32;
/// Bytes of one ggml `block_q4_1`: f16 scale, f16 min, 16 bytes of nibbles.
const BLOCK_BYTES: usize = 20;
/// Weight rows per parallel task: enough work per task, few enough tasks to balance.
const ROWS_PER_TASK: usize = 16;

/// One activation block: scale, scale × Σq (for the weights' min term), 32 signed bytes.
#[derive(Clone, Copy)]
struct Q8Block {
    d: f32,
    s: f32,
    qs: [i8; QK],
}

pub struct Q4_1Matrix {
    file: Arc<GgufFile>,
    offset: usize,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
}

impl Q4_1Matrix {
    pub fn new(file: Arc<GgufFile>, offset: usize, rows: usize, cols: usize) -> Result<Self> {
        if !cols.is_multiple_of(QK) {
            bail!("Q4_1 matrix with {cols} columns (not a multiple of {QK})");
        }
        Ok(Self {
            file,
            offset,
            rows,
            cols,
        })
    }

    fn row(&self, r: usize) -> &[u8] {
        let rb = self.cols / QK * BLOCK_BYTES;
        let start = self.offset + r * rb;
        &self.file.mmap[start..start + rb]
    }

    /// `x` [m, cols] → [m, rows]
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (m, k) = x.dims2()?;
        if k != self.cols {
            bail!(
                "Q4_1 matmul: input has {k} features, weights expect {}",
                self.cols
            );
        }
        let xs = x.to_vec2::<f32>()?;
        let nb = k / QK;
        let qx: Vec<Q8Block> = xs.iter().flat_map(|row| quantize_row(row)).collect();
        let n = self.rows;
        let tiles: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(ROWS_PER_TASK))
            .into_par_iter()
            .map(|tile| {
                let r0 = tile * ROWS_PER_TASK;
                let r1 = (r0 + ROWS_PER_TASK).min(n);
                let mut out = vec![0f32; (r1 - r0) * m];
                for r in r0..r1 {
                    let w = self.row(r);
                    for i in 0..m {
                        out[(r - r0) * m + i] = dot(w, &qx[i * nb..(i + 1) * nb]);
                    }
                }
                (r0, out)
            })
            .collect();
        let mut y = vec![0f32; m * n];
        for (r0, tile) in tiles {
            let rows = tile.len() / m;
            for rr in 0..rows {
                for i in 0..m {
                    y[i * n + r0 + rr] = tile[rr * m + i];
                }
            }
        }
        Ok(Tensor::from_vec(y, (m, n), &Device::Cpu)?)
    }
}

fn quantize_row(x: &[f32]) -> Vec<Q8Block> {
    x.chunks_exact(QK)
        .map(|b| {
            let amax = b.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut qs = [0i8; QK];
            let mut sum = 0i32;
            for (q, v) in qs.iter_mut().zip(b) {
                *q = (v * id).round() as i8;
                sum += *q as i32;
            }
            Q8Block {
                d,
                s: d * sum as f32,
                qs,
            }
        })
        .collect()
}

fn dot(w: &[u8], x: &[Q8Block]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            return unsafe { dot_avx2(w, x) };
        }
    }
    dot_scalar(w, x)
}

fn block_scales(b: &[u8]) -> (f32, f32) {
    (
        f16::from_le_bytes([b[0], b[1]]).to_f32(),
        f16::from_le_bytes([b[2], b[3]]).to_f32(),
    )
}

fn dot_scalar(w: &[u8], x: &[Q8Block]) -> f32 {
    let mut sum = 0f32;
    for (b, y) in w.chunks_exact(BLOCK_BYTES).zip(x) {
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
unsafe fn dot_avx2(w: &[u8], x: &[Q8Block]) -> f32 {
    use std::arch::x86_64::*;
    let mask = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    let mut mins = 0f32;
    for (b, y) in w.chunks_exact(BLOCK_BYTES).zip(x) {
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
    let hi = _mm256_extractf128_ps(acc, 1);
    let s = _mm_add_ps(_mm256_castps256_ps128(acc), hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s) + mins
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_and_scalar_agree_and_match_dequantized_dot() {
        // Two blocks of Q4_1 with known scales and nibbles.
        let mut w = Vec::new();
        for blk in 0..2u8 {
            w.extend_from_slice(&f16::from_f32(0.05 + blk as f32 * 0.01).to_le_bytes());
            w.extend_from_slice(&f16::from_f32(-0.3).to_le_bytes());
            w.extend((0..16u8).map(|j| j.wrapping_mul(7).wrapping_add(blk)));
        }
        let xf: Vec<f32> = (0..64).map(|i| ((i as f32) * 0.37).sin()).collect();
        let qx = quantize_row(&xf);
        let mut wf = vec![0f32; 64];
        for (bi, b) in w.chunks_exact(BLOCK_BYTES).enumerate() {
            let (d, m) = block_scales(b);
            for j in 0..16 {
                wf[bi * 32 + j] = d * (b[4 + j] & 0x0F) as f32 + m;
                wf[bi * 32 + j + 16] = d * (b[4 + j] >> 4) as f32 + m;
            }
        }
        let exact: f32 = wf.iter().zip(&xf).map(|(a, b)| a * b).sum();
        let s = dot_scalar(&w, &qx);
        let v = dot(&w, &qx);
        assert!((s - v).abs() < 1e-4, "scalar {s} vs simd {v}");
        assert!(
            (s - exact).abs() < 0.02 * exact.abs().max(1.0),
            "{s} vs {exact}"
        );
    }
}

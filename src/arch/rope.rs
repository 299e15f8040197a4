//! Rotary position embeddings as a layer applies them: per-pair frequencies and the pairing
//! style. Read by the model's layers, the KV calibration (RoPE-phase moments) and the GPU
//! kernels' callers.

use super::{ModelArchitecture, RopeStyle};

/// `x` rounded to bf16 and back (models whose reference keeps buffers in bf16).
pub fn round_bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}
/// Rotary embedding tables for one base frequency.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
    style: RopeStyle,
}

impl Rope {
    /// Frequencies `theta^(-2i/head_dim)` for the first `partial` of the pairs, zero (no
    /// rotation) for the rest.
    pub fn new(
        theta: f32,
        head_dim: usize,
        partial: f32,
        style: RopeStyle,
        bf16_freqs: bool,
    ) -> Self {
        let rotated = (partial * head_dim as f32) as usize / 2;
        let inv_freq = (0..head_dim / 2)
            .map(|i| {
                if i < rotated {
                    1.0 / theta.powf(2.0 * i as f32 / head_dim as f32)
                } else {
                    0.0
                }
            })
            .map(|f| if bf16_freqs { round_bf16(f) } else { f })
            .collect();
        Self { inv_freq, style }
    }

    /// The rotation frequencies, `head_dim / 2` of them (zero past the rotated share).
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// Layer `il`'s rotation as the model applies it.
    pub fn for_layer(arch: &ModelArchitecture, il: usize) -> Self {
        let g = &arch.layers[il];
        Self::new(
            g.rope_theta,
            g.head_dim,
            g.rope_partial,
            arch.rope_style,
            arch.bf16_buffers,
        )
    }

    /// Whether pairs are the two halves of a head (NeoX) rather than adjacent values.
    pub fn neox(&self) -> bool {
        matches!(self.style, RopeStyle::Neox)
    }

    /// The two channels pair `i` of a head rotates together.
    pub fn pair(&self, i: usize) -> (usize, usize) {
        match self.style {
            RopeStyle::Interleaved => (2 * i, 2 * i + 1),
            RopeStyle::Neox => (i, i + self.inv_freq.len()),
        }
    }

    /// Rotates `x` [t, n_head, head_dim] in place for positions `pos..pos+t`.
    pub fn apply(&self, x: &mut [f32], pos: usize, n_head: usize) {
        let half = self.inv_freq.len();
        let hd = 2 * half;
        let t = x.len() / (n_head * hd);
        let mut cs = vec![(0f32, 0f32); half];
        for ti in 0..t {
            let p = (pos + ti) as f32;
            for (c, f) in cs.iter_mut().zip(&self.inv_freq) {
                *c = (p * f).sin_cos();
            }
            for h in 0..n_head {
                let v = &mut x[(ti * n_head + h) * hd..][..hd];
                for (i, &(sin, cos)) in cs.iter().enumerate() {
                    let (a, b) = self.pair(i);
                    let (x0, x1) = (v[a], v[b]);
                    v[a] = x0 * cos - x1 * sin;
                    v[b] = x0 * sin + x1 * cos;
                }
            }
        }
    }
}

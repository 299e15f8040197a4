//! gemma3n (text): four AltUp streams around each layer (predict, run the layer on the active
//! stream, correct), a LAuReL low-rank residual beside attention, activation sparsity on the
//! first layers' MLPs, per-layer embeddings added to the non-active streams, and Gemma 4's
//! shared-KV tail (wired in `Model::forward`).

use anyhow::Result;
use candle_core::quantized::QMatMul;
use candle_core::{Device, Tensor};

use super::attn::{KvAccess, SelfAttention};
use super::layers::{Activation, GatedMlp, Linear, RmsNorm, Source, Weight};
use crate::arch::ModelArchitecture;
use crate::arch::rope::round_bf16;

/// Alternating updates: `n` streams; the layer runs on stream 0 and the others follow it
/// through learned coefficients chosen per token by a small router.
struct AltUp {
    n: usize,
    router: Linear,
    router_norm: RmsNorm,
    /// `1/hidden`, kept in the checkpoint's dtype.
    router_scale: f64,
    predict: Linear,
    correct: Linear,
    /// Scales the corrected active stream before the per-layer input.
    output_scale: Tensor,
}

impl AltUp {
    /// `tanh(router(norm(x) / hidden))` → [t, n]
    fn modalities(&self, x: &Tensor) -> Result<Tensor> {
        let r = (self.router_norm.forward(x)? * self.router_scale)?;
        Ok(self.router.forward(&r)?.tanh()?)
    }

    /// `pred_c = s_c + Σ_k coef[c·n + k] · s_k`, coefficients from stream 0.
    fn predict(&self, streams: &[Tensor]) -> Result<Vec<Tensor>> {
        let coefs = self.predict.forward(&self.modalities(&streams[0])?)?; // [t, n·n]
        (0..self.n)
            .map(|c| {
                let mut acc = streams[c].clone();
                for (k, s) in streams.iter().enumerate() {
                    let w = coefs.narrow(1, c * self.n + k, 1)?;
                    acc = (acc + s.broadcast_mul(&w)?)?;
                }
                Ok(acc)
            })
            .collect()
    }

    /// `corr_c = pred_c + (out - pred_0) · (coef_c + 1)`, coefficients from the layer output.
    fn correct(&self, pred: &[Tensor], out: &Tensor) -> Result<Vec<Tensor>> {
        let coefs = (self.correct.forward(&self.modalities(out)?)? + 1.0)?; // [t, n]
        let innovation = (out - &pred[0])?;
        (0..self.n)
            .map(|c| {
                let w = coefs.narrow(1, c, 1)?;
                Ok((&pred[c] + innovation.broadcast_mul(&w)?)?)
            })
            .collect()
    }
}

struct Laurel {
    left: Linear,
    right: Linear,
    post_norm: RmsNorm,
}

pub struct Gemma3nBlock {
    altup: AltUp,
    attn_norm: RmsNorm,
    laurel: Laurel,
    attn: SelfAttention,
    post_attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    mlp: GatedMlp,
    post_ffn_norm: RmsNorm,
    ple_gate: Linear,
    ple_proj: Linear,
    ple_norm: RmsNorm,
}

impl Gemma3nBlock {
    pub fn load(
        src: &Source,
        arch: &ModelArchitecture,
        il: usize,
        device: &Device,
    ) -> Result<Self> {
        let p = format!("blk.{il}");
        let norm = |n: &str| RmsNorm::load(src, &format!("{p}.{n}"), arch.rms_eps, device);
        let lin = |n: &str| src.linear(&format!("{p}.{n}"), device);
        let x = &arch.extras;
        let scale = 1.0 / arch.hidden as f32;
        Ok(Self {
            altup: AltUp {
                n: x.altup_streams,
                router: lin("altup_router")?,
                router_norm: norm("altup_router_norm")?,
                router_scale: if arch.bf16_buffers {
                    round_bf16(scale)
                } else {
                    scale
                } as f64,
                predict: lin("altup_predict_coef")?,
                correct: lin("altup_correct_coef")?,
                output_scale: src.vector(&format!("{p}.altup_correct_scale.weight"), device)?,
            },
            attn_norm: norm("attn_norm")?,
            laurel: Laurel {
                left: lin("laurel_l")?,
                right: lin("laurel_r")?,
                post_norm: norm("laurel_post_norm")?,
            },
            attn: SelfAttention::load(src, arch, il, device)?,
            post_attn_norm: norm("post_attention_norm")?,
            ffn_norm: norm("ffn_norm")?,
            mlp: GatedMlp::load(src, il, Activation::GeluTanh, device)?
                .with_sparsity(x.activation_sparsity.get(il).copied().unwrap_or(0.0)),
            post_ffn_norm: norm("post_ffw_norm")?,
            ple_gate: lin("inp_gate")?,
            ple_proj: lin("proj")?,
            ple_norm: norm("post_norm")?,
        })
    }

    /// `streams` (n × [t, hidden]) and this layer's per-layer input [t, ple_dim] → new streams.
    pub fn forward(
        &self,
        streams: &[Tensor],
        ple: &Tensor,
        kv: KvAccess,
        pos: usize,
    ) -> Result<Vec<Tensor>> {
        let pred = self.altup.predict(streams)?;
        let active = &pred[0];
        let normed = self.attn_norm.forward(active)?;
        let l = &self.laurel;
        let laurel = (&normed
            + l.post_norm
                .forward(&l.right.forward(&l.left.forward(&normed)?)?)?)?;
        let attn = self.attn.forward_kv(&normed, kv, pos)?;
        let x = (active + self.post_attn_norm.forward(&attn)?)?;
        let x = ((x + laurel)? * std::f64::consts::FRAC_1_SQRT_2)?;
        let ffw = self.mlp.forward(&self.ffn_norm.forward(&x)?)?;
        let out = (&x + self.post_ffn_norm.forward(&ffw)?)?;
        let mut corrected = self.altup.correct(&pred, &out)?;
        let first = corrected[0].broadcast_mul(&self.altup.output_scale)?;
        let g = (self.ple_gate.forward(&first)?.gelu()? * ple)?;
        let add = self.ple_norm.forward(&self.ple_proj.forward(&g)?)?;
        for s in corrected.iter_mut().skip(1) {
            *s = (&*s + &add)?;
        }
        Ok(corrected)
    }
}

/// Projections between the token embedding and the AltUp streams, at both ends of the stack.
pub struct AltUpEnds {
    up: Vec<Linear>,
    down: Vec<Linear>,
}

/// `y` rescaled to the RMS magnitude `target` [t, 1].
fn match_magnitude(y: Tensor, target: &Tensor) -> Result<Tensor> {
    let mag = y.sqr()?.mean_keepdim(1)?.maximum(1e-5)?.sqrt()?;
    Ok(y.broadcast_mul(target)?.broadcast_div(&mag)?)
}

fn rms(x: &Tensor) -> Result<Tensor> {
    Ok(x.sqr()?.mean_keepdim(1)?.sqrt()?)
}

impl AltUpEnds {
    pub fn load(src: &Source, arch: &ModelArchitecture, device: &Device) -> Result<Self> {
        let n = arch.extras.altup_streams;
        let lins = |name: &str| -> Result<Vec<Linear>> {
            // GGUF (llama.cpp) stacks the n-1 matrices in one [n-1, hidden, hidden] tensor.
            let stacked = format!("{name}.weight");
            if src.has(&stacked) {
                let all = src.vector(&stacked, device)?;
                return (0..n - 1)
                    .map(|i| {
                        Ok(Linear {
                            w: Weight::Candle(QMatMul::Tensor(all.get(i)?)),
                            b: None,
                        })
                    })
                    .collect();
            }
            (0..n - 1)
                .map(|i| src.linear(&format!("{name}.{i}"), device))
                .collect()
        };
        Ok(Self {
            up: lins("altup_proj")?,
            down: lins("altup_unembd_proj")?,
        })
    }

    /// The embedding and its projections, each at the embedding's magnitude.
    pub fn spread(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let target = rms(x)?;
        let mut streams = vec![x.clone()];
        for p in &self.up {
            streams.push(match_magnitude(p.forward(x)?, &target)?);
        }
        Ok(streams)
    }

    /// The streams projected back and averaged, each at stream 0's magnitude.
    pub fn merge(&self, streams: &[Tensor]) -> Result<Tensor> {
        let target = rms(&streams[0])?;
        let mut sum = streams[0].clone();
        for (p, s) in self.down.iter().zip(&streams[1..]) {
            sum = (sum + match_magnitude(p.forward(s)?, &target)?)?;
        }
        Ok((sum / streams.len() as f64)?)
    }
}

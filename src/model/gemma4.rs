//! gemma4 (text): gemma3's sandwich-normed block with v-norm and unscaled scores, plus a
//! per-layer embedding input after the MLP and a learned output scale per layer. The shared-KV
//! tail and the per-layer inputs are wired in `Model::forward`.

use anyhow::Result;
use candle_core::{Device, Tensor};

use super::attn::{KvAccess, SelfAttention};
use super::layers::{Activation, GatedMlp, Linear, RmsNorm, Source};
use crate::arch::ModelArchitecture;

/// A layer's use of its per-layer input: `h + norm(proj(gelu(gate(h)) * ple_i))`.
struct PleInput {
    gate: Linear,
    proj: Linear,
    post_norm: RmsNorm,
}

pub struct Gemma4Block {
    attn_norm: RmsNorm,
    attn: SelfAttention,
    post_attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    mlp: GatedMlp,
    post_ffn_norm: RmsNorm,
    ple: Option<PleInput>,
    output_scale: f64,
}

impl Gemma4Block {
    pub fn load(
        src: &Source,
        arch: &ModelArchitecture,
        il: usize,
        device: &Device,
    ) -> Result<Self> {
        let p = format!("blk.{il}");
        let norm = |n: &str| RmsNorm::load(src, &format!("{p}.{n}"), arch.rms_eps, device);
        let ple = match arch.extras.ple {
            Some(_) => Some(PleInput {
                gate: src.linear(&format!("{p}.inp_gate"), device)?,
                proj: src.linear(&format!("{p}.proj"), device)?,
                post_norm: norm("post_norm")?,
            }),
            None => None,
        };
        let scale_name = format!("{p}.layer_output_scale.weight");
        let output_scale = if src.has(&scale_name) {
            src.vector(&scale_name, device)?
                .flatten_all()?
                .to_vec1::<f32>()?[0] as f64
        } else {
            1.0
        };
        Ok(Self {
            attn_norm: norm("attn_norm")?,
            attn: SelfAttention::load(src, arch, il, device)?,
            post_attn_norm: norm("post_attention_norm")?,
            ffn_norm: norm("ffn_norm")?,
            mlp: GatedMlp::load(src, il, Activation::GeluTanh, device)?,
            post_ffn_norm: norm("post_ffw_norm")?,
            ple,
            output_scale,
        })
    }

    /// `x` [t, hidden], this layer's per-layer input `ple` [t, ple_dim] → [t, hidden]
    pub fn forward(
        &self,
        x: &Tensor,
        ple: Option<&Tensor>,
        kv: KvAccess,
        pos: usize,
    ) -> Result<Tensor> {
        let h = self.attn.forward_kv(&self.attn_norm.forward(x)?, kv, pos)?;
        let x = (x + self.post_attn_norm.forward(&h)?)?;
        let h = self.mlp.forward(&self.ffn_norm.forward(&x)?)?;
        let mut x = (x + self.post_ffn_norm.forward(&h)?)?;
        if let (Some(p), Some(input)) = (&self.ple, ple) {
            let g = (p.gate.forward(&x)?.gelu()? * input)?;
            x = (&x + p.post_norm.forward(&p.proj.forward(&g)?)?)?;
        }
        Ok((x * self.output_scale)?)
    }
}

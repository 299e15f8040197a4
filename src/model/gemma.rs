//! gemma3: pre- and post-norms around attention and MLP, qk-norm, GELU(tanh) MLP,
//! sliding/global layers with their own RoPE bases.

use anyhow::Result;
use candle_core::{Device, Tensor};

use super::attn::SelfAttention;
use super::layers::{Activation, GatedMlp, RmsNorm, Source};
use crate::arch::ModelArchitecture;
use crate::kv::LayerCache;

pub struct GemmaBlock {
    attn_norm: RmsNorm,
    attn: SelfAttention,
    post_attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    mlp: GatedMlp,
    post_ffn_norm: RmsNorm,
}

impl GemmaBlock {
    pub fn load(
        src: &Source,
        arch: &ModelArchitecture,
        il: usize,
        device: &Device,
    ) -> Result<Self> {
        let norm = |n: &str| RmsNorm::load(src, &format!("blk.{il}.{n}"), arch.rms_eps, device);
        Ok(Self {
            attn_norm: norm("attn_norm")?,
            attn: SelfAttention::load(src, arch, il, device)?,
            post_attn_norm: norm("post_attention_norm")?,
            ffn_norm: norm("ffn_norm")?,
            mlp: GatedMlp::load(src, il, Activation::GeluTanh, device)?,
            post_ffn_norm: norm("post_ffw_norm")?,
        })
    }

    /// `x` [t, hidden] → [t, hidden]
    pub fn forward(&self, x: &Tensor, cache: &mut LayerCache, pos: usize) -> Result<Tensor> {
        let h = self.attn.forward(&self.attn_norm.forward(x)?, cache, pos)?;
        let (x, n) = self
            .ffn_norm
            .add_forward(x, &self.post_attn_norm.forward(&h)?)?;
        let h = self.mlp.forward(&n)?;
        Ok((x + self.post_ffn_norm.forward(&h)?)?)
    }
}

//! gemma3: pre- and post-norms around attention and MLP, qk-norm, GELU(tanh) MLP,
//! sliding/global layers with their own RoPE bases.

use anyhow::Result;
use candle_core::{Device, Tensor};

use super::arch::ModelArchitecture;
use super::attn::SelfAttention;
use super::layers::{Linear, RmsNorm, Source};
use crate::kv::LayerCache;

pub struct GemmaBlock {
    attn_norm: RmsNorm,
    attn: SelfAttention,
    post_attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
    post_ffn_norm: RmsNorm,
}

impl GemmaBlock {
    pub fn load(
        src: &Source,
        arch: &ModelArchitecture,
        il: usize,
        device: &Device,
    ) -> Result<Self> {
        let p = format!("blk.{il}");
        let norm = |n: &str| RmsNorm::load(src, &format!("{p}.{n}"), arch.rms_eps, device);
        Ok(Self {
            attn_norm: norm("attn_norm")?,
            attn: SelfAttention::load(src, arch, il, device)?,
            post_attn_norm: norm("post_attention_norm")?,
            ffn_norm: norm("ffn_norm")?,
            gate: src.linear(&format!("{p}.ffn_gate"), device)?,
            up: src.linear(&format!("{p}.ffn_up"), device)?,
            down: src.linear(&format!("{p}.ffn_down"), device)?,
            post_ffn_norm: norm("post_ffw_norm")?,
        })
    }

    /// `x` [t, hidden] → [t, hidden]
    pub fn forward(&self, x: &Tensor, cache: &mut LayerCache, pos: usize) -> Result<Tensor> {
        let h = self.attn.forward(&self.attn_norm.forward(x)?, cache, pos)?;
        let x = (x + self.post_attn_norm.forward(&h)?)?;
        let n = self.ffn_norm.forward(&x)?;
        let act = (self.gate.forward(&n)?.gelu()? * self.up.forward(&n)?)?;
        let h = self.post_ffn_norm.forward(&self.down.forward(&act)?)?;
        Ok((x + h)?)
    }
}

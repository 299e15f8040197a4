//! The llama family: llama, mistral, qwen2 (qkv bias), qwen3 (qk-norm), SmolLM2.

use anyhow::Result;
use candle_core::{Device, Tensor};

use super::arch::ModelArchitecture;
use super::attn::SelfAttention;
use super::layers::{Linear, RmsNorm, Source};
use crate::kv::LayerCache;

pub struct LlamaBlock {
    attn_norm: RmsNorm,
    attn: SelfAttention,
    ffn_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl LlamaBlock {
    pub fn load(
        src: &Source,
        arch: &ModelArchitecture,
        il: usize,
        device: &Device,
    ) -> Result<Self> {
        let p = format!("blk.{il}");
        Ok(Self {
            attn_norm: RmsNorm::load(src, &format!("{p}.attn_norm"), arch.rms_eps, device)?,
            attn: SelfAttention::load(src, arch, il, device)?,
            ffn_norm: RmsNorm::load(src, &format!("{p}.ffn_norm"), arch.rms_eps, device)?,
            gate: src.linear(&format!("{p}.ffn_gate"), device)?,
            up: src.linear(&format!("{p}.ffn_up"), device)?,
            down: src.linear(&format!("{p}.ffn_down"), device)?,
        })
    }

    /// `x` [t, hidden] → [t, hidden]
    pub fn forward(&self, x: &Tensor, cache: &mut LayerCache, pos: usize) -> Result<Tensor> {
        let h = self.attn.forward(&self.attn_norm.forward(x)?, cache, pos)?;
        let x = (x + h)?;
        let n = self.ffn_norm.forward(&x)?;
        let act = (candle_nn::ops::silu(&self.gate.forward(&n)?)? * self.up.forward(&n)?)?;
        Ok((x + self.down.forward(&act)?)?)
    }
}

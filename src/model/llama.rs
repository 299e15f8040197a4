//! The llama family: llama, mistral, qwen2 (qkv bias), qwen3 (qk-norm), SmolLM2.

use anyhow::Result;
use candle_core::{Device, Tensor};

use super::attn::SelfAttention;
use super::layers::{Activation, GatedMlp, RmsNorm, Source};
use crate::arch::ModelArchitecture;
use crate::kv::LayerCache;

pub struct LlamaBlock {
    attn_norm: RmsNorm,
    attn: SelfAttention,
    ffn_norm: RmsNorm,
    mlp: GatedMlp,
}

impl LlamaBlock {
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
            ffn_norm: norm("ffn_norm")?,
            mlp: GatedMlp::load(src, il, Activation::Silu, device)?,
        })
    }

    /// `x` [t, hidden] → [t, hidden]
    pub fn forward(&self, x: &Tensor, cache: &mut LayerCache, pos: usize) -> Result<Tensor> {
        let h = self.attn.forward(&self.attn_norm.forward(x)?, cache, pos)?;
        let (x, n) = self.ffn_norm.add_forward(x, &h)?;
        Ok((x + self.mlp.forward(&n)?)?)
    }
}

//! `ModelArchitecture`: the geometry every other part reads (KV sizing, forward passes, planning).

use anyhow::{Context, Result, bail};
use serde::Serialize;

/// Which forward pass a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ArchKind {
    /// llama, mistral, qwen2 (qkv bias), qwen3 (qk-norm), SmolLM2, granite-like.
    Llama,
    /// gemma3: pre/post norms, qk-norm, sliding/global layers, scaled embeddings, GELU.
    Gemma3,
}

/// How the rotary embedding pairs dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum RopeStyle {
    /// Adjacent pairs (x0,x1),(x2,x3)...: llama.cpp's LLAMA rope on GGUF llama weights (q/k permuted by the converter).
    Interleaved,
    /// Halves (x_i, x_{i+d/2}): HF layout, llama.cpp's NEOX rope.
    Neox,
}

/// Per-layer attention geometry.
#[derive(Debug, Clone, Serialize)]
pub struct LayerGeometry {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    /// `Some(w)`: the layer attends to the last `w` positions (itself included) and caches only those.
    pub sliding_window: Option<usize>,
    pub rope_theta: f32,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelArchitecture {
    /// Architecture name as the source spells it (`llama`, `qwen2`, `gemma3`, ...).
    pub name: String,
    pub kind: ArchKind,
    pub n_layer: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub rms_eps: f64,
    pub rope_style: RopeStyle,
    pub max_context: usize,
    /// Scale applied to q·k (1/sqrt(head_dim) unless the model says otherwise).
    pub attn_scale: f32,
    pub qkv_bias: bool,
    pub qk_norm: bool,
    pub tied_embeddings: bool,
    pub final_logit_softcap: Option<f32>,
    /// transformers keeps non-persistent buffers (RoPE inverse frequencies, gemma's embedding
    /// scale) in the checkpoint dtype; a bf16 HF checkpoint therefore runs with them rounded to bf16.
    pub bf16_buffers: bool,
    pub layers: Vec<LayerGeometry>,
}

impl ModelArchitecture {
    /// Bytes of K plus V one token adds to layer `il` at `bytes_per_value` (f16: 2).
    pub fn kv_values_per_token(&self, il: usize) -> usize {
        let l = &self.layers[il];
        2 * l.n_kv_head * l.head_dim
    }

    /// Rows the cache of layer `il` holds for a context of `n_ctx` tokens.
    pub fn kv_rows(&self, il: usize, n_ctx: usize) -> usize {
        match self.layers[il].sliding_window {
            Some(w) => w.min(n_ctx),
            None => n_ctx,
        }
    }

    pub fn head_dim_max(&self) -> usize {
        self.layers.iter().map(|l| l.head_dim).max().unwrap_or(0)
    }

    /// Marks layers sliding by gemma's pattern: every `period`-th layer (1-based) is global.
    pub fn sliding_pattern(n_layer: usize, period: usize, window: usize) -> Vec<Option<usize>> {
        (0..n_layer)
            .map(|il| {
                if period == 0 || il % period < period - 1 {
                    Some(window)
                } else {
                    None
                }
            })
            .collect()
    }

    pub fn validate(&self) -> Result<()> {
        if self.n_layer == 0 || self.hidden == 0 || self.vocab == 0 {
            bail!(
                "model geometry is empty (layers {}, hidden {}, vocab {})",
                self.n_layer,
                self.hidden,
                self.vocab
            );
        }
        for (il, l) in self.layers.iter().enumerate() {
            if l.n_kv_head == 0 || l.n_head % l.n_kv_head != 0 || l.head_dim == 0 {
                bail!(
                    "layer {il}: {} heads cannot share {} KV heads of dim {}",
                    l.n_head,
                    l.n_kv_head,
                    l.head_dim
                );
            }
        }
        Ok(())
    }
}

/// Reads `key` from an HF config.json, with a clear error when it is missing.
pub(crate) fn cfg_usize(cfg: &serde_json::Value, key: &str) -> Result<usize> {
    cfg.get(key)
        .and_then(|v| v.as_u64())
        .map(|v| v as usize)
        .with_context(|| format!("config.json: missing integer `{key}`"))
}

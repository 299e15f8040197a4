//! `ModelArchitecture`: the geometry every other part reads (KV sizing, forward passes, planning),
//! and the rotary embedding each layer applies. Below `model` and `kv`, which both read it.

use anyhow::{Context, Result, bail};
use serde::Serialize;

pub mod rope;

pub use rope::Rope;

/// Which forward pass a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ArchKind {
    /// llama, mistral, qwen2 (qkv bias), qwen3 (qk-norm), SmolLM2, granite-like.
    Llama,
    /// gemma3: pre/post norms, qk-norm, sliding/global layers, scaled embeddings, GELU.
    Gemma3,
    /// gemma4 text: gemma3's block plus per-layer embeddings, v-norm, unscaled scores, a
    /// shared-KV tail, per-layer head dims and partial RoPE on global layers.
    Gemma4,
    /// gemma3n text: AltUp streams, LAuReL, activation sparsity, per-layer embeddings, shared KV.
    Gemma3n,
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
    /// Share of the head's dimension pairs that rotate (Gemma 4's proportional RoPE rotates the
    /// first quarter of the pairs of its global layers and leaves the rest); 1.0 elsewhere.
    pub rope_partial: f32,
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
    /// What only some families have: shared KV, PLE, experts, SSM layers, encoders.
    pub extras: ArchExtras,
}

/// Geometry beyond a plain decoder, used by memory planning (and the forward passes that
/// support it).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ArchExtras {
    /// Layers from this index on compute no K/V of their own and read an earlier layer's
    /// (Gemma 3n / 4 shared-KV tail): they store nothing.
    pub kv_shared_from: Option<usize>,
    /// Per-layer embeddings: a `vocab × (n_layer · dim)` table read per token.
    pub ple: Option<PleDims>,
    pub moe: Option<MoeDims>,
    pub ssm: Option<SsmDims>,
    /// The KV-shared layers' MLP is twice as wide (Gemma 4).
    pub double_wide_mlp: bool,
    /// Vision and audio encoder parameters (multimodal checkpoints).
    pub vision_params: u64,
    pub audio_params: u64,
    /// Gemma 3n AltUp streams (0: none).
    pub altup_streams: usize,
    /// Gemma 3n: target sparsity of each layer's MLP gate (0: dense).
    pub activation_sparsity: Vec<f32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PleDims {
    pub dim: usize,
    pub vocab: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct MoeDims {
    pub experts: usize,
    pub experts_used: usize,
    pub expert_intermediate: usize,
    /// Experts every token goes through besides the routed ones.
    pub shared_experts: usize,
}

/// Mamba-2 style layers: no KV cache but a recurrent state per sequence, kept in f32.
#[derive(Debug, Clone, Serialize)]
pub struct SsmDims {
    /// Which layers are SSM layers (they have no attention).
    pub layers: Vec<usize>,
    pub d_inner: usize,
    pub d_state: usize,
    pub d_conv: usize,
    pub n_heads: usize,
    pub n_groups: usize,
}

/// Parameters by where they live in memory.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ParamCounts {
    /// Everything the decoder reads per token: embeddings, attention, MLP or all experts, norms.
    pub decoder: u64,
    /// Of `decoder`, the routed experts a token does not use (resident, not read).
    pub inactive_experts: u64,
    pub ple: u64,
    pub vision: u64,
    pub audio: u64,
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

    /// The layer whose cache a shared-KV layer reads: the last layer of the same kind
    /// (sliding or global) before the shared tail.
    pub fn kv_source(&self, il: usize) -> Option<usize> {
        let from = self.extras.kv_shared_from.filter(|&f| il >= f)?;
        let sliding = self.layers[il].sliding_window.is_some();
        (0..from)
            .rev()
            .find(|&j| self.layers[j].sliding_window.is_some() == sliding)
    }

    /// Whether layer `il` keeps a KV cache (attention layers outside a shared-KV tail).
    pub fn stores_kv(&self, il: usize) -> bool {
        let shared = self.extras.kv_shared_from.is_some_and(|from| il >= from);
        let ssm = self
            .extras
            .ssm
            .as_ref()
            .is_some_and(|s| s.layers.contains(&il));
        !shared && !ssm
    }

    /// Bytes of recurrent state one sequence needs (SSM layers, f32, not quantizable).
    pub fn ssm_state_bytes(&self) -> u64 {
        self.extras.ssm.as_ref().map_or(0, |s| {
            let conv = (s.d_conv - 1) * (s.d_inner + 2 * s.n_groups * s.d_state);
            let state = s.d_inner * s.d_state;
            (s.layers.len() * (conv + state) * 4) as u64
        })
    }

    /// Parameters counted from the geometry (gated MLPs, untied heads, all experts resident).
    pub fn param_counts(&self) -> ParamCounts {
        let h = self.hidden as u64;
        let x = &self.extras;
        let mut decoder = self.vocab as u64 * h * if self.tied_embeddings { 1 } else { 2 } + h;
        let mut inactive = 0;
        for (il, l) in self.layers.iter().enumerate() {
            let q = (l.n_head * l.head_dim) as u64;
            let kv = (l.n_kv_head * l.head_dim) as u64;
            let is_ssm = x.ssm.as_ref().is_some_and(|s| s.layers.contains(&il));
            decoder += 2 * h; // norms
            if let (true, Some(s)) = (is_ssm, x.ssm.as_ref()) {
                let (di, ds, g) = (s.d_inner as u64, s.d_state as u64, s.n_groups as u64);
                let conv_dim = di + 2 * g * ds;
                decoder += h * (2 * di + 2 * g * ds + s.n_heads as u64)
                    + conv_dim * s.d_conv as u64
                    + di * h
                    + 3 * s.n_heads as u64
                    + di;
            } else {
                let own_kv = if self.stores_kv(il) { 2 * h * kv } else { 0 };
                decoder += h * q + own_kv + q * h;
                if self.qkv_bias {
                    decoder += q + 2 * kv;
                }
            }
            if let Some(m) = &x.moe {
                let expert = 3 * h * m.expert_intermediate as u64;
                decoder += h * m.experts as u64 + expert * (m.experts + m.shared_experts) as u64;
                inactive += expert * (m.experts - m.experts_used) as u64;
            } else if !is_ssm {
                let wide = x.double_wide_mlp && !self.stores_kv(il);
                decoder += 3 * h * self.intermediate as u64 * if wide { 2 } else { 1 };
            }
            if let Some(p) = &x.ple {
                // Per-layer input gate and projection.
                decoder += 2 * h * p.dim as u64;
            }
        }
        let ple = x.ple.as_ref().map_or(0, |p| {
            (p.vocab * self.n_layer * p.dim) as u64 + h * (self.n_layer * p.dim) as u64
        });
        ParamCounts {
            decoder,
            inactive_experts: inactive,
            ple,
            vision: x.vision_params,
            audio: x.audio_params,
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

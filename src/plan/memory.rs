//! Memory a model needs at a context length: weights, PLE table, KV cache (per-layer types,
//! GQA, sliding windows, shared-KV layers), encoders, activations, runtime overhead.

use anyhow::Result;
use serde::Serialize;

use super::profile::PlanModel;
use crate::kv::store::{basis_bytes, store_bytes};
use crate::kv::{CacheType, KvPolicy};

/// What `plan` is asked.
#[derive(Debug, Clone)]
pub struct PlanRequest {
    pub context_tokens: usize,
    /// Bits per weight; `None` keeps the profile's or the file's.
    pub quant_bits: Option<f64>,
    pub cache_k: CacheType,
    pub cache_v: CacheType,
    pub kv_layer_policy: Option<String>,
    /// Rotation codecs store centered rows and 4 f16 sink rows (the engine's default, on the
    /// host and on a GPU alike).
    pub kv_centering: bool,
    pub strip_audio: bool,
    /// Tokens per prefill pass (activation peak).
    pub ubatch: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Breakdown {
    pub model: String,
    pub context_tokens: usize,
    pub weight_bits: f64,
    pub type_k: String,
    pub type_v: String,
    pub decoder_bytes: u64,
    pub ple_bytes: u64,
    pub kv_bytes: u64,
    /// SpectralQuant's fitted per-head bases, beside the rows.
    pub kv_basis_bytes: u64,
    pub ssm_state_bytes: u64,
    pub vision_bytes: u64,
    pub audio_bytes: u64,
    pub activation_bytes: u64,
    pub runtime_overhead_bytes: u64,
    /// Everything, PLE table held in RAM.
    pub total_ple_resident: u64,
    /// Everything but the PLE table, which stays in the mapped file.
    pub total_ple_mmap: u64,
    pub ple_to_decoder: f64,
    /// PLE bytes one token reads (one row per layer).
    pub ple_bytes_per_token: u64,
}

const MIB: f64 = 1024.0 * 1024.0;

pub fn breakdown(m: &PlanModel, req: &PlanRequest) -> Result<Breakdown> {
    let a = &m.arch;
    let bits = req.quant_bits.unwrap_or(m.weight_bits);
    let params = a.param_counts();
    let at_bits = |n: u64| (n as f64 * bits / 8.0).round() as u64;
    let decoder_bytes = match (m.file_bytes, req.quant_bits) {
        (Some(b), None) => b - at_bits(params.ple).min(b),
        _ => at_bits(params.decoder),
    };
    let mut policy = KvPolicy::resolve(
        a.n_layer,
        req.cache_k,
        req.cache_v,
        req.kv_layer_policy.as_deref(),
    )?;
    let spec = req.kv_layer_policy.as_deref();
    if KvPolicy::promotes_k(spec, req.cache_k, a.n_layer, req.kv_centering) {
        // The engine ranks equal-sized layers by measured noise; the bytes are these.
        policy.promote_k(a, req.context_tokens, &[]);
    }
    let (mut kv_bytes, mut kv_basis_bytes) = (0u64, 0u64);
    for (il, l) in a.layers.iter().enumerate() {
        if !a.stores_kv(il) {
            continue;
        }
        let rows = a.kv_rows(il, req.context_tokens);
        let (tk, tv) = policy.layers[il];
        for ty in [tk, tv] {
            kv_bytes += store_bytes(ty, l.n_kv_head, l.head_dim, rows, req.kv_centering) as u64;
            kv_basis_bytes += basis_bytes(ty, l.n_kv_head, l.head_dim) as u64;
        }
    }
    let ub = req.ubatch.min(req.context_tokens).max(1) as u64;
    let n_head = a.layers.iter().map(|l| l.n_head).max().unwrap_or(0) as u64;
    let inter = a.extras.moe.as_ref().map_or(a.intermediate, |m| {
        m.expert_intermediate * m.experts_used.max(1)
    }) as u64;
    // f32 working set of one prefill pass: residual + attention and MLP buffers for `ub`
    // tokens, one ub×ub score block per head, one row of logits.
    let activation_bytes =
        4 * (ub * (4 * a.hidden as u64 + 3 * inter) + n_head * ub * ub + a.vocab as u64);
    let ple_bytes = at_bits(params.ple);
    let vision_bytes = at_bits(params.vision);
    let audio_bytes = if req.strip_audio {
        0
    } else {
        at_bits(params.audio)
    };
    let runtime_overhead_bytes = (m.runtime_overhead_mb * MIB) as u64;
    let ssm_state_bytes = a.ssm_state_bytes();
    let total_ple_mmap = decoder_bytes
        + kv_bytes
        + kv_basis_bytes
        + ssm_state_bytes
        + vision_bytes
        + audio_bytes
        + activation_bytes
        + runtime_overhead_bytes;
    let ple_bytes_per_token = a.extras.ple.as_ref().map_or(0, |p| {
        (a.n_layer as f64 * p.dim as f64 * bits / 8.0).ceil() as u64
    });
    Ok(Breakdown {
        model: m.name.clone(),
        context_tokens: req.context_tokens,
        weight_bits: bits,
        type_k: KvPolicy::summary(policy.layers.iter().map(|l| l.0)),
        type_v: KvPolicy::summary(policy.layers.iter().map(|l| l.1)),
        decoder_bytes,
        ple_bytes,
        kv_bytes,
        kv_basis_bytes,
        ssm_state_bytes,
        vision_bytes,
        audio_bytes,
        activation_bytes,
        runtime_overhead_bytes,
        total_ple_resident: total_ple_mmap + ple_bytes,
        total_ple_mmap,
        ple_to_decoder: ple_bytes as f64 / decoder_bytes.max(1) as f64,
        ple_bytes_per_token,
    })
}

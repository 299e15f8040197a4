//! `cuda-check`: the engine on the GPU against the CPU (`-m`), or one layer's decode timed.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use dhurandhar::bench::gpu_parity;
use dhurandhar::kv::CacheType;

#[derive(Args)]
pub struct CudaCheckArgs {
    /// Head dims of the timed layer; with --model, of the reshaped layer checks.
    #[arg(long, default_value = "128", value_delimiter = ',')]
    pub head_dim: Vec<usize>,
    /// Queries per KV head (the GQA group).
    #[arg(long, default_value_t = 4)]
    pub queries: usize,
    /// KV heads of the timed layer.
    #[arg(long, default_value_t = 8)]
    pub kv_heads: usize,
    #[arg(long, default_value_t = 50)]
    pub reps: usize,
    /// Instead of timing: run these models (comma list) on the CPU and on the GPU with the
    /// same tokens and compare logits and one layer's steps, per --cache-types.
    #[arg(short = 'm', long, value_delimiter = ',')]
    pub model: Vec<PathBuf>,
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "f16,turbo4,turbo3,turbo2,q8_0,q4_0"
    )]
    pub cache_types: Vec<CacheType>,
    /// With --model: V's type beside each K type of --cache-types (asymmetric pairs; the
    /// one-layer check stays symmetric).
    #[arg(long)]
    pub cache_type_v: Option<CacheType>,
    /// With --model: stores centered (calibrated means, K channel weights, sink rows; the
    /// layer checks on a random calibration) instead of plain.
    #[arg(long)]
    pub centered: bool,
    /// Prompt tokens (fed in two chunks) and greedy decode steps for --model.
    #[arg(long, default_value_t = 48)]
    pub prompt: usize,
    #[arg(long, default_value_t = 24)]
    pub steps: usize,
    /// Time one layer's decode attention (--kv-heads, --queries, each --head-dim) over these
    /// context lengths, per --cache-types.
    #[arg(long, value_delimiter = ',', default_value = "4096,32768,131072")]
    pub decode_context: Vec<usize>,
}

pub fn main(a: &CudaCheckArgs) -> Result<()> {
    if a.model.is_empty() {
        time_decode(a)
    } else {
        check_models(a)
    }
}

/// Each model and cache type on the CPU and the GPU, then the first model's layer 0 again in
/// the --head-dim / --kv-heads / --queries shapes; a JSON line per check.
fn check_models(a: &CudaCheckArgs) -> Result<()> {
    for m in &a.model {
        for &ty in &a.cache_types {
            let r = gpu_parity::check_layer(m, ty, None, a.centered)?;
            println!("{}", serde_json::to_string(&r)?);
            let types = (ty, a.cache_type_v.unwrap_or(ty));
            let r = gpu_parity::check(m, types, a.centered, a.prompt, a.steps)?;
            println!("{}", serde_json::to_string(&r)?);
        }
    }
    for &ty in &a.cache_types {
        for &d in &a.head_dim {
            let shape = Some((a.kv_heads, a.queries, d));
            let r = gpu_parity::check_layer(&a.model[0], ty, shape, a.centered)?;
            println!("{}", serde_json::to_string(&r)?);
        }
    }
    Ok(())
}

/// One layer's decode attention timed per type, context and head dim; a JSON line each.
fn time_decode(a: &CudaCheckArgs) -> Result<()> {
    for &ty in &a.cache_types {
        for &ctx in &a.decode_context {
            for &d in &a.head_dim {
                let shape = (a.kv_heads, a.queries, d);
                let r = gpu_parity::time_decode(ty, shape, ctx, a.reps)?;
                println!("{}", serde_json::to_string(&r)?);
            }
        }
    }
    Ok(())
}

//! `select` / `-ctk auto`: the best-quality KV cache types whose model + KV + overhead fit the
//! memory there is, with headroom; the most compressed, with a warning, when nothing fits.

use anyhow::Result;
use serde::Serialize;

use super::memory::{PlanRequest, breakdown};
use super::profile::PlanModel;
use crate::kv::CacheType;

/// Candidates, best quality first (docs/QUALITY.md: turbo4 costs SmolLM2 +2.7% perplexity at
/// 0.27x f16; K is more sensitive than V, so V steps down first).
pub const LADDER: [(CacheType, CacheType); 5] = [
    (CacheType::Turbo4, CacheType::Turbo4),
    (CacheType::Turbo4, CacheType::Turbo3),
    (CacheType::Turbo3, CacheType::Turbo3),
    (CacheType::Turbo3, CacheType::Turbo2),
    (CacheType::Turbo2, CacheType::Turbo2),
];

#[derive(Debug, Clone, Serialize)]
pub struct Selection {
    pub type_k: CacheType,
    pub type_v: CacheType,
    pub fits: bool,
    pub memory_mb: f64,
    pub needed_mb: f64,
    pub kv_mb: f64,
    pub reasoning: Vec<String>,
    pub warnings: Vec<String>,
    pub flags: String,
}

const MIB: f64 = 1024.0 * 1024.0;

/// Share of memory `select` leaves free for the OS and everything else.
pub const DEFAULT_HEADROOM: f64 = 0.15;

/// Picks cache types for `model` at `n_ctx` tokens in `memory_mb`, keeping `headroom` (a
/// fraction of the memory) free. `on_gpu`: the memory is a GPU's and the whole model runs
/// there, so only rungs whose types have GPU kernels count (a turbo2 cache would stay in host
/// memory and attend on the CPU), and the KV bytes are the GPU stores' (plain rows).
pub fn select(
    model: &PlanModel,
    n_ctx: usize,
    memory_mb: f64,
    headroom: f64,
    on_gpu: bool,
) -> Result<Selection> {
    let budget = memory_mb * (1.0 - headroom);
    let mut reasoning = vec![format!(
        "memory {memory_mb:.0} MiB{}, keeping {:.0}% free: budget {budget:.0} MiB for {} at {n_ctx} tokens",
        if on_gpu { " (GPU)" } else { "" },
        headroom * 100.0,
        model.name
    )];
    let ladder: Vec<_> = LADDER
        .into_iter()
        .filter(|(k, v)| !on_gpu || (k.kernel_type().is_some() && v.kernel_type().is_some()))
        .collect();
    let last = ladder.len() - 1;
    for (i, &(k, v)) in ladder.iter().enumerate() {
        let b = breakdown(
            model,
            &PlanRequest {
                context_tokens: n_ctx,
                quant_bits: None,
                cache_k: k,
                cache_v: v,
                kv_layer_policy: None,
                kv_centering: true,
                strip_audio: false,
                ubatch: crate::engine::UBATCH,
            },
        )?;
        let need = b.total_ple_mmap as f64 / MIB;
        let kv = b.kv_bytes as f64 / MIB;
        let fits = need <= budget;
        reasoning.push(format!(
            "K {k} / V {v}: KV {kv:.1} MiB, total {need:.1} MiB: {}",
            if fits { "fits" } else { "too big" }
        ));
        let pick = Selection {
            type_k: k,
            type_v: v,
            fits,
            memory_mb,
            needed_mb: need,
            kv_mb: kv,
            reasoning: Vec::new(),
            warnings: Vec::new(),
            flags: format!(
                "-c {n_ctx} -ctk {k} -ctv {v}{}",
                if on_gpu { " -ngl 99" } else { "" }
            ),
        };
        if fits || i == last {
            let mut pick = pick;
            if !fits {
                pick.warnings.push(format!(
                    "nothing fits: even K {k} / V {v} needs {need:.0} MiB of a {budget:.0} MiB budget; lower -c or use a smaller model"
                ));
            }
            pick.reasoning = reasoning;
            return Ok(pick);
        }
    }
    unreachable!("the last rung of the ladder always returns")
}

/// What `-ctk auto` / `-ctv auto` resolve to for the model at `model` (a path or profile name)
/// at `n_ctx` tokens (0: the model's own context): [`select`] against this machine's free
/// memory, or the GPU's where the model runs there (`on_gpu`).
pub fn auto(model: &str, n_ctx: usize, on_gpu: bool) -> Result<Selection> {
    use anyhow::Context;
    let model = super::profile::resolve(model)?;
    let n_ctx = if n_ctx == 0 {
        model.arch.max_context
    } else {
        n_ctx
    };
    let memory = if on_gpu {
        super::devices::cuda()
            .context("-ctk auto with the GPU: no CUDA device found")?
            .app_budget_mb
    } else {
        super::devices::host()?.app_budget_mb
    };
    select(&model, n_ctx, memory, DEFAULT_HEADROOM, on_gpu)
}

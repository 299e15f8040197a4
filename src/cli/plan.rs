//! Offline questions about memory: `plan` (will it fit?), `select` (what `-ctk auto` picks),
//! `mmap-profile` (how fast per-layer embeddings come out of a mapped file).

use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use clap::Args;

use dhurandhar::engine::device::check_gpu_layers;
use dhurandhar::plan::memory::{PlanRequest, breakdown};
use dhurandhar::plan::mmap_profile::{PleShape, profile as mmap_run, table};
use dhurandhar::plan::{PlanReport, devices, profile, render, select};

use super::args::{KvType, resolve_kv_types};

#[derive(Args)]
pub struct PlanArgs {
    /// A built-in profile (gemma4-e2b, smollm2-135m, ...), a YAML profile, a GGUF file or an HF dir.
    #[arg(long, short = 'm')]
    pub model: String,
    #[arg(long, short = 'c', default_value_t = 4096)]
    pub context_tokens: usize,
    /// Bits per weight (default: the profile's, or the file's own).
    #[arg(long)]
    pub quant_bits: Option<f64>,
    /// K cache type, or `auto` (what `select` picks for this machine's memory).
    #[arg(long = "cache-type-k", default_value = "f16")]
    pub cache_type_k: KvType,
    /// V cache type, or `auto`.
    #[arg(long = "cache-type-v", default_value = "f16")]
    pub cache_type_v: KvType,
    /// See `run --help`.
    #[arg(long)]
    pub kv_layer_policy: Option<String>,
    /// Plan for plain TurboQuant rows (no f16 sink rows).
    #[arg(long)]
    pub no_kv_centering: bool,
    /// Accepted as a GPU run's command line has it (checked against the layer count); GPU
    /// stores take the bytes host stores do.
    #[arg(long = "n-gpu-layers")]
    pub n_gpu_layers: Option<usize>,
    /// Leave the audio encoder out.
    #[arg(long)]
    pub strip_audio: bool,
    /// Only this device (a name from configs/devices.yaml, or `host`).
    #[arg(long)]
    pub device: Option<String>,
    /// Also write the report as JSON.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
}

pub fn plan_main(a: &PlanArgs) -> Result<()> {
    let model = profile::resolve(&a.model)?;
    check_gpu_layers(a.n_gpu_layers, model.arch.n_layer)?;
    let (cache_k, cache_v) = resolve_kv_types(
        (a.cache_type_k, a.cache_type_v),
        &a.model,
        a.context_tokens,
        a.n_gpu_layers.is_some_and(|n| n > 0),
    )?;
    let b = breakdown(
        &model,
        &PlanRequest {
            context_tokens: a.context_tokens,
            quant_bits: a.quant_bits,
            cache_k,
            cache_v,
            kv_layer_policy: a.kv_layer_policy.clone(),
            kv_centering: !a.no_kv_centering,
            strip_audio: a.strip_audio,
            ubatch: dhurandhar::engine::UBATCH,
        },
    )?;
    let mut all = devices::builtin()?;
    all.push(devices::host()?);
    all.extend(devices::cuda());
    if let Some(d) = &a.device {
        all.retain(|x| &x.name == d);
        ensure!(
            !all.is_empty(),
            "unknown device `{d}` (see configs/devices.yaml, or `host`)"
        );
    }
    let report = PlanReport {
        devices: all.iter().map(|d| devices::verdict(d, &b)).collect(),
        breakdown: b,
    };
    print!("{}", render(&report));
    if let Some(p) = &a.json_out {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

#[derive(Args)]
pub struct SelectArgs {
    /// Model: GGUF file, HF dir, YAML profile or built-in slug.
    #[arg(short = 'm', long)]
    pub model: String,
    #[arg(short = 'c', long = "ctx-size", default_value_t = 4096)]
    pub ctx_size: usize,
    /// Memory to plan for in MiB instead of what this machine has available.
    #[arg(long)]
    pub memory_mb: Option<f64>,
    /// Share of memory to leave free.
    #[arg(long, default_value_t = select::DEFAULT_HEADROOM)]
    pub headroom: f64,
    /// JSON on stdout instead of text.
    #[arg(long)]
    pub json: bool,
    /// Size for a GPU run (`-ngl 99`): only cache types with GPU kernels, GPU store bytes.
    #[arg(long = "n-gpu-layers")]
    pub n_gpu_layers: Option<usize>,
}

pub fn select_main(a: &SelectArgs) -> Result<()> {
    let model = profile::resolve(&a.model)?;
    check_gpu_layers(a.n_gpu_layers, model.arch.n_layer)?;
    let ngl = a.n_gpu_layers.is_some_and(|n| n > 0);
    let (memory, source, on_gpu) = match a.memory_mb {
        Some(m) => (m, "--memory-mb".to_string(), ngl),
        None => {
            let d = devices::detected()?;
            let source = format!(
                "detected {}: {:.0} MiB free of {:.0} MiB",
                d.name, d.app_budget_mb, d.ram_mb
            );
            (d.app_budget_mb, source, d.name.starts_with("cuda"))
        }
    };
    let mut s = select::select(&model, a.ctx_size, memory, a.headroom, on_gpu)?;
    s.reasoning.insert(0, source);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        for line in &s.reasoning {
            println!("  {line}");
        }
        for w in &s.warnings {
            println!("warning: {w}");
        }
        println!("choice: K {} / V {}", s.type_k, s.type_v);
        println!("flags: {}", s.flags);
    }
    Ok(())
}

#[derive(Args)]
pub struct MmapProfileArgs {
    /// Model whose PLE table shape to use (a profile with per-layer embeddings).
    #[arg(long, default_value = "gemma4-e2b")]
    pub model: String,
    /// Fraction of the full table's rows to write.
    #[arg(long, default_value_t = 0.1)]
    pub scale: f64,
    /// Tokens per pass.
    #[arg(long, default_value_t = 1000)]
    pub num_tokens: usize,
    /// Decode speed to judge each pass against.
    #[arg(long, default_value_t = 15.0)]
    pub target_tps: f64,
    /// Folder for the table file (on the storage to measure; removed afterwards).
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
    #[arg(long)]
    pub json_out: Option<PathBuf>,
}

pub fn mmap_profile_main(a: &MmapProfileArgs) -> Result<()> {
    let model = profile::resolve(&a.model)?;
    let ple = model
        .arch
        .extras
        .ple
        .as_ref()
        .with_context(|| format!("{} has no per-layer embeddings", model.name))?;
    ensure!(a.scale > 0.0 && a.scale <= 1.0, "--scale must be in (0, 1]");
    let shape = PleShape {
        vocab: ((ple.vocab as f64 * a.scale) as usize).max(1),
        n_layer: model.arch.n_layer,
        dim: ple.dim,
        bits: model.weight_bits,
    };
    let results = mmap_run(&a.dir, shape, a.num_tokens.max(1), a.target_tps)?;
    print!("{}", table(&results, a.target_tps));
    if let Some(p) = &a.json_out {
        std::fs::write(p, serde_json::to_string_pretty(&results)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

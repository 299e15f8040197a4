//! Flags more than one subcommand takes: the model and how to load it, sampling, `-ctk/-ctv`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use dhurandhar::engine::sampling::SamplingParams;
use dhurandhar::engine::{DeviceChoice, Engine, EngineConfig};
use dhurandhar::kv::CacheType;
use dhurandhar::plan::select;

/// A `-ctk/-ctv` value: a cache type, or `auto` (what `select` picks for the memory there is).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvType {
    Auto,
    Fixed(CacheType),
}

impl std::str::FromStr for KvType {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        if s.eq_ignore_ascii_case("auto") {
            Ok(Self::Auto)
        } else {
            s.parse().map(Self::Fixed)
        }
    }
}

impl std::fmt::Display for KvType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Fixed(t) => t.fmt(f),
        }
    }
}

/// The K and V types for `k`/`v`: as given, or where either is `auto`, `select`'s choice for
/// `model` at `n_ctx` tokens in this machine's (or, `on_gpu`, the GPU's) free memory, with its
/// reasoning on stderr.
pub fn resolve_kv_types(
    (k, v): (KvType, KvType),
    model: &str,
    n_ctx: usize,
    on_gpu: bool,
) -> Result<(CacheType, CacheType)> {
    if let (KvType::Fixed(k), KvType::Fixed(v)) = (k, v) {
        return Ok((k, v));
    }
    let s = select::auto(model, n_ctx, on_gpu)?;
    for line in s.reasoning.iter().chain(&s.warnings) {
        tracing::info!("auto kv: {line}");
    }
    let pick = |t: KvType, chosen: CacheType| match t {
        KvType::Auto => chosen,
        KvType::Fixed(t) => t,
    };
    Ok((pick(k, s.type_k), pick(v, s.type_v)))
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PleMode {
    Mmap,
    Resident,
}

/// Sizes the compute pools: `threads`, or every core.
pub fn set_threads(threads: Option<usize>) -> usize {
    // candle and rayon size their pools from this variable; it must be set before either starts.
    let threads =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // SAFETY: set once, first thing, before any other thread exists.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    threads
}

#[derive(Args)]
pub struct ModelArgs {
    /// GGUF file or Hugging Face directory (config.json + *.safetensors).
    #[arg(short = 'm', long)]
    pub model: PathBuf,
    /// Context size in tokens (0: the model's own).
    #[arg(short = 'c', long = "ctx-size", default_value_t = 4096)]
    pub ctx_size: usize,
    /// KV cache type for K, or `auto` (what `select` picks for this machine).
    #[arg(long = "cache-type-k", default_value = "f16")]
    pub cache_type_k: KvType,
    /// KV cache type for V, or `auto`.
    #[arg(long = "cache-type-v", default_value = "f16")]
    pub cache_type_v: KvType,
    /// Per-layer cache types: a TurboQuant fork mode (0,1,2,5,6,7), a preset (uniform,
    /// q8-boundary, q8-last8, boundary-v-turbo4, v-last8, boundary-v) or LAYERS:K/V,...
    /// Defaults to env TURBO_LAYER_ADAPTIVE.
    #[arg(long, env = "TURBO_LAYER_ADAPTIVE")]
    pub kv_layer_policy: Option<String>,
    /// Plain TurboQuant as the fork stores it: no centering on calibrated K/V means and no
    /// exact sink rows.
    #[arg(long)]
    pub no_kv_centering: bool,
    /// KV calibration file (K/V means and moments; SpectralQuant's per-head bases): read if it
    /// was written for these weights, else measured and written there. Default: beside the
    /// model for SpectralQuant; none for the other types, which measure at each load. The same
    /// file read on CPU and GPU makes both store the same centred rows.
    #[arg(long, value_name = "FILE")]
    pub kv_calibration: Option<PathBuf>,
    /// Per-layer embeddings (Gemma 4): read rows from the mapped file, or copy the table into memory.
    #[arg(long, value_enum, default_value = "mmap")]
    pub ple: PleMode,
    /// Threads (default: all cores).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Run on this device: cpu, cuda or cuda:N (CUDA needs a `--features cuda` build).
    #[arg(long)]
    pub device: Option<DeviceChoice>,
    /// llama.cpp's layer offload: any N ≥ the layer count (e.g. 99) runs the model on cuda:0;
    /// 0 on the CPU. Partial offload is refused.
    #[arg(long = "n-gpu-layers")]
    pub n_gpu_layers: Option<usize>,
    /// Jinja chat template overriding the model's own (a string, or @file).
    #[arg(long)]
    pub chat_template: Option<String>,
    /// Accepted for llama.cpp compatibility: templates are always rendered with Jinja.
    #[arg(long)]
    pub jinja: bool,
}

impl ModelArgs {
    /// A model run on the CPU with f32 caches at `ctx_size` tokens (`codecs --from-model`).
    pub fn f32_capture(model: PathBuf, ctx_size: usize, threads: Option<usize>) -> Self {
        Self {
            model,
            ctx_size,
            cache_type_k: KvType::Fixed(CacheType::F32),
            cache_type_v: KvType::Fixed(CacheType::F32),
            kv_layer_policy: None,
            no_kv_centering: true,
            kv_calibration: None,
            ple: PleMode::Mmap,
            threads,
            device: None,
            n_gpu_layers: None,
            chat_template: None,
            jinja: false,
        }
    }

    pub fn device(&self) -> DeviceChoice {
        DeviceChoice::resolve(self.device, self.n_gpu_layers)
    }

    pub fn engine(&self) -> Result<Engine> {
        set_threads(self.threads);
        let chat_template = match &self.chat_template {
            Some(t) if t.starts_with('@') => Some(
                std::fs::read_to_string(&t[1..])
                    .with_context(|| format!("reading chat template {}", &t[1..]))?,
            ),
            other => other.clone(),
        };
        let device = self.device();
        let (cache_k, cache_v) = resolve_kv_types(
            (self.cache_type_k, self.cache_type_v),
            &self.model.to_string_lossy(),
            self.ctx_size,
            matches!(device, DeviceChoice::Cuda(_)),
        )?;
        Engine::load(&EngineConfig {
            model: self.model.clone(),
            n_ctx: self.ctx_size,
            cache_k,
            cache_v,
            chat_template,
            kv_layer_policy: self.kv_layer_policy.clone(),
            kv_centering: !self.no_kv_centering,
            ple_resident: self.ple == PleMode::Resident,
            kv_calibration: self.kv_calibration.clone(),
            device,
            n_gpu_layers: self.n_gpu_layers,
        })
    }
}

#[derive(Args)]
pub struct SamplingArgs {
    /// Temperature; 0 is greedy.
    #[arg(long = "temp", default_value_t = 0.8)]
    pub temperature: f32,
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    #[arg(short = 's', long, default_value_t = 0xD4A1)]
    pub seed: u64,
    /// Do not stop at end-of-generation tokens.
    #[arg(long)]
    pub ignore_eos: bool,
}

impl SamplingArgs {
    pub fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            penalty_last_n: self.repeat_last_n,
            seed: self.seed,
            ignore_eos: self.ignore_eos,
        }
    }
}

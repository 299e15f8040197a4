//! `bench` (llama-bench's tests and output) and `codecs` (every cache type's error and speed).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use dhurandhar::bench::codecs::{from_model, measure, synthetic, table};
use dhurandhar::bench::speed::{self, BenchConfig, Format};
use dhurandhar::engine::DeviceChoice;
use dhurandhar::kv::CacheType;

use super::args::{KvType, ModelArgs, PleMode, resolve_kv_types, set_threads};

#[derive(Args)]
pub struct BenchArgs {
    /// Models (comma list or repeated).
    #[arg(short = 'm', long, value_delimiter = ',', required = true)]
    pub model: Vec<PathBuf>,
    /// Prompt lengths to time (0 skips).
    #[arg(
        short = 'p',
        long = "n-prompt",
        value_delimiter = ',',
        default_value = "512"
    )]
    pub n_prompt: Vec<usize>,
    /// Generation lengths to time (0 skips).
    #[arg(
        short = 'n',
        long = "n-gen",
        value_delimiter = ',',
        default_value = "128"
    )]
    pub n_gen: Vec<usize>,
    /// Prompt then generation, timed together: PP,TG (repeatable).
    #[arg(long = "prompt-gen")]
    pub prompt_gen: Vec<String>,
    /// Context already in the cache before each test.
    #[arg(
        short = 'd',
        long = "n-depth",
        value_delimiter = ',',
        default_value = "0"
    )]
    pub n_depth: Vec<usize>,
    /// K cache types (comma list); `auto`: what `select` picks for each model at the deepest
    /// test's context.
    #[arg(long = "cache-type-k", value_delimiter = ',', default_value = "f16")]
    pub cache_type_k: Vec<KvType>,
    /// V cache types (comma list), `auto` as for K.
    #[arg(long = "cache-type-v", value_delimiter = ',', default_value = "f16")]
    pub cache_type_v: Vec<KvType>,
    /// See `run --help`.
    #[arg(long, env = "TURBO_LAYER_ADAPTIVE")]
    pub kv_layer_policy: Option<String>,
    /// See `run --help`.
    #[arg(long)]
    pub no_kv_centering: bool,
    /// See `run --help`.
    #[arg(long, value_enum, default_value = "mmap")]
    pub ple: PleMode,
    /// Threads (one value: the thread pool is sized once per process).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Accepted for llama-bench compatibility: attention always runs fused here (fa = 1).
    #[arg(long = "flash-attn")]
    pub flash_attn: Option<String>,
    /// Run on this device: cpu, cuda or cuda:N.
    #[arg(long)]
    pub device: Option<DeviceChoice>,
    /// llama-bench's layer offload (≥ the layer count: the GPU; 0: the CPU).
    #[arg(long = "n-gpu-layers")]
    pub n_gpu_layers: Option<usize>,
    /// Repetitions per test.
    #[arg(short = 'r', long, default_value_t = 5)]
    pub repetitions: usize,
    #[arg(short = 'o', long, value_enum, default_value = "md")]
    pub output: Format,
}

pub fn bench_main(a: &BenchArgs) -> Result<()> {
    let threads = set_threads(a.threads);
    let prompt_gen = a
        .prompt_gen
        .iter()
        .map(|s| {
            let (p, g) = s
                .split_once(',')
                .with_context(|| format!("--prompt-gen {s}: expected PP,TG"))?;
            Ok((p.trim().parse()?, g.trim().parse()?))
        })
        .collect::<Result<Vec<(usize, usize)>>>()?;
    let device = DeviceChoice::resolve(a.device, a.n_gpu_layers);
    // The deepest test's context, which `auto` sizes the cache for.
    let n_ctx = a.n_depth.iter().max().copied().unwrap_or(0)
        + (a.n_prompt.iter().max().copied().unwrap_or(0))
            .max(a.n_gen.iter().max().copied().unwrap_or(0))
            .max(prompt_gen.iter().map(|(p, g)| p + g).max().unwrap_or(0));
    let mut stdout = std::io::stdout();
    match a.output {
        Format::Md => write!(stdout, "{}", speed::md_header())?,
        Format::Csv => write!(stdout, "{}", speed::CSV_HEADER)?,
        _ => {}
    }
    let mut results = Vec::new();
    for model in &a.model {
        // `auto` asks `select` once per model; fixed types pass through.
        let auto = a
            .cache_type_k
            .iter()
            .chain(&a.cache_type_v)
            .any(|t| *t == KvType::Auto);
        let chosen = if auto {
            let on_gpu = matches!(device, DeviceChoice::Cuda(_));
            let kv = (KvType::Auto, KvType::Auto);
            Some(resolve_kv_types(
                kv,
                &model.to_string_lossy(),
                n_ctx,
                on_gpu,
            )?)
        } else {
            None
        };
        let types = |given: &[KvType], side: fn((CacheType, CacheType)) -> CacheType| {
            given
                .iter()
                .map(|t| match t {
                    KvType::Fixed(t) => *t,
                    KvType::Auto => side(chosen.expect("resolved above when any is auto")),
                })
                .collect::<Vec<_>>()
        };
        let (types_k, types_v) = (
            types(&a.cache_type_k, |c| c.0),
            types(&a.cache_type_v, |c| c.1),
        );
        let cfg = BenchConfig {
            models: vec![model.clone()],
            n_prompt: a.n_prompt.clone(),
            n_gen: a.n_gen.clone(),
            prompt_gen: prompt_gen.clone(),
            depths: a.n_depth.clone(),
            types_k,
            types_v,
            threads,
            repetitions: a.repetitions.max(1),
            kv_layer_policy: a.kv_layer_policy.clone(),
            kv_centering: !a.no_kv_centering,
            ple_resident: a.ple == PleMode::Resident,
            device,
            n_gpu_layers: a.n_gpu_layers,
        };
        results.extend(speed::run(&cfg, |r| {
            let line = match a.output {
                Format::Md => speed::md_row(r),
                Format::Csv => speed::csv_row(r),
                Format::Jsonl => serde_json::to_string(r).unwrap_or_default() + "\n",
                Format::Json => return,
            };
            print!("{line}");
            let _ = std::io::stdout().flush();
        })?);
    }
    if a.output == Format::Json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    }
    Ok(())
}

#[derive(Args)]
pub struct CodecsArgs {
    /// Capture K/V rows from this model (GGUF or HF dir) instead of synthetic rows.
    #[arg(long)]
    pub from_model: Option<PathBuf>,
    /// Text the model reads to produce K/V (with --from-model).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Tokens of --text to run.
    #[arg(long, default_value_t = 512)]
    pub tokens: usize,
    /// Width of synthetic rows (comma list).
    #[arg(long, default_value = "64,128,256", value_delimiter = ',')]
    pub head_dim: Vec<usize>,
    /// Rows per set.
    #[arg(long, default_value_t = 4096)]
    pub rows: usize,
    /// Cache types to measure (comma list; default all).
    #[arg(long, value_delimiter = ',')]
    pub types: Vec<CacheType>,
    /// Also write the results as JSON.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// Threads for the model run.
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
}

pub fn codecs_main(a: &CodecsArgs) -> Result<()> {
    let sets = match &a.from_model {
        Some(m) => {
            let text_path = a
                .text
                .as_ref()
                .context("--from-model needs --text FILE for the model to read")?;
            let text = std::fs::read_to_string(text_path)
                .with_context(|| format!("reading {}", text_path.display()))?;
            let engine = ModelArgs::f32_capture(m.clone(), a.tokens, a.threads).engine()?;
            from_model(&engine, &text, a.tokens, a.rows)?
        }
        None => a
            .head_dim
            .iter()
            .map(|&d| synthetic(d, a.rows, 42))
            .collect(),
    };
    let types = if a.types.is_empty() {
        CacheType::ALL.to_vec()
    } else {
        a.types.clone()
    };
    let mut reports = Vec::new();
    for set in &sets {
        for &t in &types {
            tracing::info!("codecs: {} on {} rows of {}", t, set.rows.len(), set.source);
            match measure(t, set, 7) {
                Ok(r) => reports.push(r),
                Err(e) => tracing::info!("codecs: skipping {t} on {}: {e}", set.source),
            }
        }
    }
    print!("{}", table(&reports));
    if let Some(p) = &a.json_out {
        std::fs::write(p, serde_json::to_string_pretty(&reports)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

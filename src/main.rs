//! `dh-server`: flags in, library calls out.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use dhurandhar::bench::perplexity::{KlMode, perplexity};
use dhurandhar::engine::run::{RunOptions, run};
use dhurandhar::engine::sampling::SamplingParams;
use dhurandhar::engine::{DeviceChoice, Engine, EngineConfig};
use dhurandhar::kv::{CacheType, KvPolicy};

#[derive(Parser)]
#[command(
    name = "dh-server",
    version,
    about = "llama.cpp-style inference with a compressed KV cache"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// OpenAI-compatible HTTP server (the default subcommand, like llama-server).
    Serve(ServeArgs),
    /// One-shot generation (like llama-cli / llama-simple).
    Run(RunArgs),
    /// Perplexity of a text file, as llama-perplexity computes it.
    Perplexity(PplArgs),
    /// Error and speed of every KV cache type on synthetic or captured K/V rows.
    Codecs(CodecsArgs),
    /// Prompt and generation speed, llama-bench's tests and output.
    Bench(BenchArgs),
    /// Will a model fit? Memory by component and a verdict per device.
    Plan(PlanArgs),
    /// The best KV cache type that fits this machine's memory (what `-ctk auto` uses).
    Select(SelectArgs),
    /// How fast per-layer embedding rows come out of a memory-mapped file, cold and warm.
    MmapProfile(MmapProfileArgs),
    /// HF safetensors directory → GGUF (llama.cpp tensor names and keys, f32 tensors).
    Convert(ConvertArgs),
    /// Needle in a haystack: recall of a fact placed early in a long context, per cache type.
    Needle(NeedleArgs),
    /// Random-weight llama GGUF with a real model's shapes (llama-8b, llama-1b), for speed runs.
    Synth(SynthArgs),
    /// The engine on the GPU against the CPU (-m), or one layer's decode attention timed.
    #[cfg(feature = "cuda")]
    CudaCheck(CudaCheckArgs),
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Parallel sequences (slots); -c is divided among them.
    #[arg(long = "parallel", default_value_t = 1)]
    parallel: usize,
    /// Requests that may wait for a free slot; beyond that the server answers 503.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// Require `Authorization: Bearer KEY` on every route but /health.
    #[arg(long, env = "LLAMA_API_KEY")]
    api_key: Option<String>,
    /// Allow cross-origin requests from any origin.
    #[arg(long)]
    cors: bool,
    /// Largest request body accepted (bytes); larger gets 413.
    #[arg(long, default_value_t = 8 << 20)]
    max_body_bytes: usize,
    /// Default max_tokens for requests that give none (-1: until the slot's context is full).
    #[arg(short = 'n', long = "n-predict", default_value_t = -1, allow_negative_numbers = true)]
    n_predict: i64,
    /// Model id reported by /v1/models (default: the model's file name).
    #[arg(short = 'a', long)]
    alias: Option<String>,
}

#[derive(Args)]
struct PlanArgs {
    /// A built-in profile (gemma4-e2b, smollm2-135m, ...), a YAML profile, a GGUF file or an HF dir.
    #[arg(long, short = 'm')]
    model: String,
    #[arg(long, short = 'c', default_value_t = 4096)]
    context_tokens: usize,
    /// Bits per weight (default: the profile's, or the file's own).
    #[arg(long)]
    quant_bits: Option<f64>,
    #[arg(long = "cache-type-k", default_value = "f16")]
    cache_type_k: CacheType,
    #[arg(long = "cache-type-v", default_value = "f16")]
    cache_type_v: CacheType,
    /// See `run --help`.
    #[arg(long)]
    kv_layer_policy: Option<String>,
    /// Plan for plain TurboQuant rows (no f16 sink rows).
    #[arg(long)]
    no_kv_centering: bool,
    /// Accepted as a GPU run's command line has it (checked against the layer count); GPU
    /// stores take the bytes host stores do.
    #[arg(long = "n-gpu-layers")]
    n_gpu_layers: Option<usize>,
    /// Leave the audio encoder out.
    #[arg(long)]
    strip_audio: bool,
    /// Only this device (a name from configs/devices.yaml, or `host`).
    #[arg(long)]
    device: Option<String>,
    /// Also write the report as JSON.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

#[derive(Args)]
struct SelectArgs {
    /// Model: GGUF file, HF dir, YAML profile or built-in slug.
    #[arg(short = 'm', long)]
    model: String,
    #[arg(short = 'c', long = "ctx-size", default_value_t = 4096)]
    ctx_size: usize,
    /// Memory to plan for in MiB instead of what this machine has available.
    #[arg(long)]
    memory_mb: Option<f64>,
    /// Share of memory to leave free.
    #[arg(long, default_value_t = dhurandhar::plan::select::DEFAULT_HEADROOM)]
    headroom: f64,
    /// JSON on stdout instead of text.
    #[arg(long)]
    json: bool,
    /// Size for a GPU run (`-ngl 99`): only cache types with GPU kernels, GPU store bytes.
    #[arg(long = "n-gpu-layers")]
    n_gpu_layers: Option<usize>,
}

#[derive(Args)]
struct MmapProfileArgs {
    /// Model whose PLE table shape to use (a profile with per-layer embeddings).
    #[arg(long, default_value = "gemma4-e2b")]
    model: String,
    /// Fraction of the full table's rows to write.
    #[arg(long, default_value_t = 0.1)]
    scale: f64,
    /// Tokens per pass.
    #[arg(long, default_value_t = 1000)]
    num_tokens: usize,
    /// Decode speed to judge each pass against.
    #[arg(long, default_value_t = 15.0)]
    target_tps: f64,
    /// Folder for the table file (on the storage to measure; removed afterwards).
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    #[arg(long)]
    json_out: Option<PathBuf>,
}

#[derive(Args)]
struct ConvertArgs {
    /// HF directory (config.json + *.safetensors).
    input: PathBuf,
    /// GGUF file to write.
    output: PathBuf,
}

#[cfg(feature = "cuda")]
#[derive(Args)]
struct CudaCheckArgs {
    /// Head dims of the timed layer; with --model, of the reshaped layer checks.
    #[arg(long, default_value = "128", value_delimiter = ',')]
    head_dim: Vec<usize>,
    /// Queries per KV head (the GQA group).
    #[arg(long, default_value_t = 4)]
    queries: usize,
    /// KV heads of the timed layer.
    #[arg(long, default_value_t = 8)]
    kv_heads: usize,
    #[arg(long, default_value_t = 50)]
    reps: usize,
    /// Instead of timing: run these models (comma list) on the CPU and on the GPU with the
    /// same tokens and compare logits and one layer's steps, per --cache-types.
    #[arg(short = 'm', long, value_delimiter = ',')]
    model: Vec<PathBuf>,
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "f16,turbo4,turbo3,turbo2,q8_0,q4_0"
    )]
    cache_types: Vec<CacheType>,
    /// With --model: V's type beside each K type of --cache-types (asymmetric pairs; the
    /// one-layer check stays symmetric).
    #[arg(long)]
    cache_type_v: Option<CacheType>,
    /// With --model: stores centered (calibrated means, K channel weights, sink rows; the
    /// layer checks on a random calibration) instead of plain.
    #[arg(long)]
    centered: bool,
    /// Prompt tokens (fed in two chunks) and greedy decode steps for --model.
    #[arg(long, default_value_t = 48)]
    prompt: usize,
    #[arg(long, default_value_t = 24)]
    steps: usize,
    /// Time one layer's decode attention (--kv-heads, --queries, each --head-dim) over these
    /// context lengths, per --cache-types.
    #[arg(long, value_delimiter = ',', default_value = "4096,32768,131072")]
    decode_context: Vec<usize>,
}

#[derive(Args)]
struct SynthArgs {
    /// GGUF file to write.
    #[arg(short = 'o', long)]
    output: PathBuf,
    /// Model shape: llama-8b (Llama 3.1 8B) or llama-1b (Llama 3.2 1B).
    #[arg(long, default_value = "llama-8b")]
    shape: String,
    /// Weight format, as llama-quantize names it.
    #[arg(long = "type", value_enum, default_value = "q4_k_m")]
    weight_type: dhurandhar::bench::synth::WeightType,
    /// Fewer layers than the shape has (quick runs).
    #[arg(long)]
    layers: Option<usize>,
}

#[derive(Args)]
struct NeedleArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Filler prose (e.g. wikitext) the needle is hidden in.
    #[arg(short = 'f', long)]
    file: PathBuf,
    /// Context lengths in tokens (comma list).
    #[arg(long, value_delimiter = ',', default_value = "2048,4096,8192")]
    lengths: Vec<usize>,
    /// Where the needle sits, as fractions of the filler (comma list; every length at each).
    #[arg(long, value_delimiter = ',', default_value = "0.1")]
    depth: Vec<f64>,
    /// Plain text completion instead of the chat template.
    #[arg(long)]
    raw: bool,
}

#[derive(Args)]
struct BenchArgs {
    /// Models (comma list or repeated).
    #[arg(short = 'm', long, value_delimiter = ',', required = true)]
    model: Vec<PathBuf>,
    /// Prompt lengths to time (0 skips).
    #[arg(
        short = 'p',
        long = "n-prompt",
        value_delimiter = ',',
        default_value = "512"
    )]
    n_prompt: Vec<usize>,
    /// Generation lengths to time (0 skips).
    #[arg(
        short = 'n',
        long = "n-gen",
        value_delimiter = ',',
        default_value = "128"
    )]
    n_gen: Vec<usize>,
    /// Prompt then generation, timed together: PP,TG (repeatable).
    #[arg(long = "prompt-gen")]
    prompt_gen: Vec<String>,
    /// Context already in the cache before each test.
    #[arg(
        short = 'd',
        long = "n-depth",
        value_delimiter = ',',
        default_value = "0"
    )]
    n_depth: Vec<usize>,
    #[arg(long = "cache-type-k", value_delimiter = ',', default_value = "f16")]
    cache_type_k: Vec<CacheType>,
    #[arg(long = "cache-type-v", value_delimiter = ',', default_value = "f16")]
    cache_type_v: Vec<CacheType>,
    /// See `run --help`.
    #[arg(long, env = "TURBO_LAYER_ADAPTIVE")]
    kv_layer_policy: Option<String>,
    /// See `run --help`.
    #[arg(long)]
    no_kv_centering: bool,
    /// See `run --help`.
    #[arg(long, value_enum, default_value = "mmap")]
    ple: PleMode,
    /// Threads (one value: the thread pool is sized once per process).
    #[arg(short = 't', long)]
    threads: Option<usize>,
    /// Accepted for llama-bench compatibility: attention always runs fused here (fa = 1).
    #[arg(long = "flash-attn")]
    flash_attn: Option<String>,
    /// Run on this device: cpu, cuda or cuda:N.
    #[arg(long)]
    device: Option<DeviceChoice>,
    /// llama-bench's layer offload (≥ the layer count: the GPU; 0: the CPU).
    #[arg(long = "n-gpu-layers")]
    n_gpu_layers: Option<usize>,
    /// Repetitions per test.
    #[arg(short = 'r', long, default_value_t = 5)]
    repetitions: usize,
    #[arg(short = 'o', long, value_enum, default_value = "md")]
    output: dhurandhar::bench::speed::Format,
}

#[derive(Args)]
struct CodecsArgs {
    /// Capture K/V rows from this model (GGUF or HF dir) instead of synthetic rows.
    #[arg(long)]
    from_model: Option<PathBuf>,
    /// Text the model reads to produce K/V (with --from-model).
    #[arg(long)]
    text: Option<PathBuf>,
    /// Tokens of --text to run.
    #[arg(long, default_value_t = 512)]
    tokens: usize,
    /// Width of synthetic rows (comma list).
    #[arg(long, default_value = "64,128,256", value_delimiter = ',')]
    head_dim: Vec<usize>,
    /// Rows per set.
    #[arg(long, default_value_t = 4096)]
    rows: usize,
    /// Cache types to measure (comma list; default all).
    #[arg(long, value_delimiter = ',')]
    types: Vec<CacheType>,
    /// Also write the results as JSON.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Threads for the model run.
    #[arg(short = 't', long)]
    threads: Option<usize>,
}

#[derive(Args)]
struct ModelArgs {
    /// GGUF file or Hugging Face directory (config.json + *.safetensors).
    #[arg(short = 'm', long)]
    model: PathBuf,
    /// Context size in tokens (0: the model's own).
    #[arg(short = 'c', long = "ctx-size", default_value_t = 4096)]
    ctx_size: usize,
    /// KV cache type for K, or `auto` (what `select` picks for this machine).
    #[arg(long = "cache-type-k", default_value = "f16")]
    cache_type_k: KvType,
    /// KV cache type for V, or `auto`.
    #[arg(long = "cache-type-v", default_value = "f16")]
    cache_type_v: KvType,
    /// Per-layer cache types: a TurboQuant fork mode (0,1,2,5,6,7), a preset (uniform,
    /// q8-boundary, q8-last8, boundary-v-turbo4, v-last8, boundary-v) or LAYERS:K/V,...
    /// Defaults to env TURBO_LAYER_ADAPTIVE.
    #[arg(long, env = "TURBO_LAYER_ADAPTIVE")]
    kv_layer_policy: Option<String>,
    /// Plain TurboQuant as the fork stores it: no centering on calibrated K/V means and no
    /// exact sink rows.
    #[arg(long)]
    no_kv_centering: bool,
    /// KV calibration file (K/V means and moments; SpectralQuant's per-head bases): read if it
    /// was written for these weights, else measured and written there. Default: beside the
    /// model for SpectralQuant; none for the other types, which measure at each load. The same
    /// file read on CPU and GPU makes both store the same centred rows.
    #[arg(long, value_name = "FILE")]
    kv_calibration: Option<PathBuf>,
    /// Per-layer embeddings (Gemma 4): read rows from the mapped file, or copy the table into memory.
    #[arg(long, value_enum, default_value = "mmap")]
    ple: PleMode,
    /// Threads (default: all cores).
    #[arg(short = 't', long)]
    threads: Option<usize>,
    /// Run on this device: cpu, cuda or cuda:N (CUDA needs a `--features cuda` build).
    #[arg(long)]
    device: Option<DeviceChoice>,
    /// llama.cpp's layer offload: any N ≥ the layer count (e.g. 99) runs the model on cuda:0;
    /// 0 on the CPU. Partial offload is refused.
    #[arg(long = "n-gpu-layers")]
    n_gpu_layers: Option<usize>,
    /// Jinja chat template overriding the model's own (a string, or @file).
    #[arg(long)]
    chat_template: Option<String>,
    /// Accepted for llama.cpp compatibility: templates are always rendered with Jinja.
    #[arg(long)]
    jinja: bool,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt text.
    #[arg(short = 'p', long)]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids (for models without a tokenizer).
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Render the prompt as a user turn with the chat template.
    #[arg(long)]
    chat: bool,
    /// System message for --chat.
    #[arg(long)]
    system: Option<String>,
    /// Tokens to generate.
    #[arg(short = 'n', long = "n-predict", default_value_t = 128)]
    n_predict: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Stop string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Print generated token ids (comma-separated) instead of text.
    #[arg(long)]
    print_ids: bool,
    /// Print the prompt's token ids to stderr.
    #[arg(long)]
    verbose_prompt: bool,
    /// Write the f32 logits of every prompt position to this safetensors file (tensor `logits` [T,V]).
    #[arg(long)]
    logits_out: Option<PathBuf>,
}

#[derive(Args)]
struct SamplingArgs {
    /// Temperature; 0 is greedy.
    #[arg(long = "temp", default_value_t = 0.8)]
    temperature: f32,
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    #[arg(long, default_value_t = 64)]
    repeat_last_n: usize,
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    #[arg(short = 's', long, default_value_t = 0xD4A1)]
    seed: u64,
    /// Do not stop at end-of-generation tokens.
    #[arg(long)]
    ignore_eos: bool,
}

#[derive(Args)]
struct PplArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Text file to score.
    #[arg(short = 'f', long)]
    file: PathBuf,
    /// Stop after this many chunks.
    #[arg(long)]
    chunks: Option<usize>,
    /// Tokens per forward pass; smaller makes later tokens read earlier ones from the KV cache.
    #[arg(long = "ubatch-size", default_value_t = 512)]
    ubatch_size: usize,
    /// Logits file of a base run: written by a run with this flag alone, read with --kl-divergence.
    #[arg(long)]
    kl_divergence_base: Option<PathBuf>,
    /// Compare this run's distributions with the --kl-divergence-base file (KL divergence).
    #[arg(long, requires = "kl_divergence_base")]
    kl_divergence: bool,
}

fn set_threads(threads: Option<usize>) -> usize {
    // candle and rayon size their pools from this variable; it must be set before either starts.
    let threads =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // SAFETY: set once, first thing, before any other thread exists.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
    threads
}

fn bench(a: &BenchArgs) -> Result<()> {
    use dhurandhar::bench::speed::{self, BenchConfig, Format};
    use std::io::Write;
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
    let cfg = BenchConfig {
        models: a.model.clone(),
        n_prompt: a.n_prompt.clone(),
        n_gen: a.n_gen.clone(),
        prompt_gen,
        depths: a.n_depth.clone(),
        types_k: a.cache_type_k.clone(),
        types_v: a.cache_type_v.clone(),
        threads,
        repetitions: a.repetitions.max(1),
        kv_layer_policy: a.kv_layer_policy.clone(),
        kv_centering: !a.no_kv_centering,
        ple_resident: a.ple == PleMode::Resident,
        device: DeviceChoice::resolve(a.device, a.n_gpu_layers),
        n_gpu_layers: a.n_gpu_layers,
    };
    let mut stdout = std::io::stdout();
    match a.output {
        Format::Md => write!(stdout, "{}", speed::md_header())?,
        Format::Csv => write!(stdout, "{}", speed::CSV_HEADER)?,
        _ => {}
    }
    let results = speed::run(&cfg, |r| {
        let line = match a.output {
            Format::Md => speed::md_row(r),
            Format::Csv => speed::csv_row(r),
            Format::Jsonl => serde_json::to_string(r).unwrap_or_default() + "\n",
            Format::Json => return,
        };
        print!("{line}");
        let _ = std::io::stdout().flush();
    })?;
    if a.output == Format::Json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    }
    Ok(())
}

fn plan(a: &PlanArgs) -> Result<()> {
    use dhurandhar::plan::memory::{PlanRequest, breakdown};
    use dhurandhar::plan::{PlanReport, devices, profile, render};
    let model = profile::resolve(&a.model)?;
    dhurandhar::engine::device::check_gpu_layers(a.n_gpu_layers, model.arch.n_layer)?;
    let b = breakdown(
        &model,
        &PlanRequest {
            context_tokens: a.context_tokens,
            quant_bits: a.quant_bits,
            cache_k: a.cache_type_k,
            cache_v: a.cache_type_v,
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
        anyhow::ensure!(
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

fn select_cmd(a: &SelectArgs) -> Result<()> {
    use dhurandhar::plan::{devices, profile, select};
    let model = profile::resolve(&a.model)?;
    dhurandhar::engine::device::check_gpu_layers(a.n_gpu_layers, model.arch.n_layer)?;
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

fn mmap_profile(a: &MmapProfileArgs) -> Result<()> {
    use dhurandhar::plan::mmap_profile::{PleShape, profile, table};
    let model = dhurandhar::plan::profile::resolve(&a.model)?;
    let ple = model
        .arch
        .extras
        .ple
        .as_ref()
        .with_context(|| format!("{} has no per-layer embeddings", model.name))?;
    anyhow::ensure!(a.scale > 0.0 && a.scale <= 1.0, "--scale must be in (0, 1]");
    let shape = PleShape {
        vocab: ((ple.vocab as f64 * a.scale) as usize).max(1),
        n_layer: model.arch.n_layer,
        dim: ple.dim,
        bits: model.weight_bits,
    };
    let results = profile(&a.dir, shape, a.num_tokens.max(1), a.target_tps)?;
    print!("{}", table(&results, a.target_tps));
    if let Some(p) = &a.json_out {
        std::fs::write(p, serde_json::to_string_pretty(&results)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

fn codecs(a: &CodecsArgs) -> Result<()> {
    use dhurandhar::bench::codecs::{from_model, measure, synthetic, table};
    let sets = match &a.from_model {
        Some(m) => {
            let text_path = a
                .text
                .as_ref()
                .context("--from-model needs --text FILE for the model to read")?;
            let text = std::fs::read_to_string(text_path)
                .with_context(|| format!("reading {}", text_path.display()))?;
            let engine = ModelArgs {
                model: m.clone(),
                ctx_size: a.tokens,
                cache_type_k: KvType::Fixed(CacheType::F32),
                cache_type_v: KvType::Fixed(CacheType::F32),
                kv_layer_policy: None,
                no_kv_centering: true,
                kv_calibration: None,
                ple: PleMode::Mmap,
                threads: a.threads,
                device: None,
                n_gpu_layers: None,
                chat_template: None,
                jinja: false,
            }
            .engine()?;
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
            eprintln!("codecs: {} on {} rows of {}", t, set.rows.len(), set.source);
            match measure(t, set, 7) {
                Ok(r) => reports.push(r),
                Err(e) => eprintln!("codecs: skipping {t} on {}: {e}", set.source),
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

impl SamplingArgs {
    fn params(&self) -> SamplingParams {
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

fn serve(a: &ServeArgs) -> Result<()> {
    use dhurandhar::server::{ServeConfig, serve};
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let engine = a.model.engine()?;
    let alias = a.alias.clone().unwrap_or_else(|| {
        let p = a.model.model.as_path();
        p.file_name().map_or_else(
            || p.display().to_string(),
            |f| f.to_string_lossy().into_owned(),
        )
    });
    let cfg = ServeConfig {
        host: a.host.clone(),
        port: a.port,
        n_slots: a.parallel,
        queue: a.queue,
        api_key: a.api_key.clone().filter(|k| !k.is_empty()),
        cors: a.cors,
        max_body_bytes: a.max_body_bytes,
        sampling: a.sampling.params(),
        n_predict: usize::try_from(a.n_predict).ok(),
        alias,
        model_path: a.model.model.display().to_string(),
        chat_template_src: engine.tok.as_ref().and_then(|t| t.chat_template.clone()),
        cache_k: KvPolicy::summary(engine.policy.layers.iter().map(|l| l.0)),
        cache_v: KvPolicy::summary(engine.policy.layers.iter().map(|l| l.1)),
    };
    serve(engine, cfg)
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PleMode {
    Mmap,
    Resident,
}

/// A `-ctk/-ctv` value: a cache type or `auto`.
#[derive(Clone, Copy)]
enum KvType {
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

impl ModelArgs {
    /// The cache types to load with; `auto` asks `select` about this machine's memory.
    fn cache_types(&self) -> Result<(CacheType, CacheType)> {
        use dhurandhar::plan::{devices, profile, select};
        if let (KvType::Fixed(k), KvType::Fixed(v)) = (self.cache_type_k, self.cache_type_v) {
            return Ok((k, v));
        }
        let model = profile::resolve(&self.model.to_string_lossy())?;
        let n_ctx = if self.ctx_size == 0 {
            model.arch.max_context
        } else {
            self.ctx_size
        };
        // With the model on a GPU, the cache is sized against that GPU's free memory.
        let on_gpu = matches!(
            DeviceChoice::resolve(self.device, self.n_gpu_layers),
            DeviceChoice::Cuda(_)
        );
        let memory = if on_gpu {
            devices::cuda()
                .context("-ctk auto with the GPU: no CUDA device found")?
                .app_budget_mb
        } else {
            devices::host()?.app_budget_mb
        };
        let s = select::select(&model, n_ctx, memory, select::DEFAULT_HEADROOM, on_gpu)?;
        for line in s.reasoning.iter().chain(&s.warnings) {
            eprintln!("auto kv: {line}");
        }
        let pick = |t: KvType, chosen: CacheType| match t {
            KvType::Auto => chosen,
            KvType::Fixed(t) => t,
        };
        Ok((
            pick(self.cache_type_k, s.type_k),
            pick(self.cache_type_v, s.type_v),
        ))
    }

    fn engine(&self) -> Result<Engine> {
        set_threads(self.threads);
        let chat_template = match &self.chat_template {
            Some(t) if t.starts_with('@') => Some(
                std::fs::read_to_string(&t[1..])
                    .with_context(|| format!("reading chat template {}", &t[1..]))?,
            ),
            other => other.clone(),
        };
        let (cache_k, cache_v) = self.cache_types()?;
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
            device: DeviceChoice::resolve(self.device, self.n_gpu_layers),
            n_gpu_layers: self.n_gpu_layers,
        })
    }
}

/// llama.cpp's multi-letter single-dash flags, which clap cannot declare as short options.
const LLAMA_FLAGS: &[(&str, &str)] = &[
    ("-ctk", "--cache-type-k"),
    ("-ctv", "--cache-type-v"),
    ("-ngl", "--n-gpu-layers"),
    ("-np", "--parallel"),
    ("-fa", "--flash-attn"),
    ("-ub", "--ubatch-size"),
    ("-pg", "--prompt-gen"),
];

/// `cuda-check --model`: each model and cache type on the CPU and the GPU, then the first
/// model's layer 0 again in the --head-dim / --kv-heads / --queries shapes.
#[cfg(feature = "cuda")]
fn cuda_check_models(a: &CudaCheckArgs) -> Result<()> {
    use dhurandhar::bench::gpu_parity;
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

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args()
        .map(|a| {
            LLAMA_FLAGS
                .iter()
                .find(|(short, _)| *short == a)
                .map_or(a, |(_, long)| long.to_string())
        })
        .collect();
    // `dh-server -m model.gguf ...` serves, as llama-server does.
    if args.get(1).is_some_and(|a| {
        a.starts_with('-') && !matches!(a.as_str(), "-h" | "--help" | "-V" | "--version")
    }) {
        args.insert(1, "serve".into());
    }
    let cli = Cli::parse_from(args);
    if !matches!(cli.command, Command::Serve(_)) {
        // Offline commands end quietly when their reader goes away (`dh-server plan | head`),
        // as Unix tools do; the server keeps Rust's ignored SIGPIPE and sees EPIPE per socket.
        // SAFETY: restoring a signal's default disposition before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let result = match cli.command {
        Command::Serve(a) => serve(&a),
        Command::Run(a) => a.model.engine().and_then(|e| {
            let s = &a.sampling;
            run(
                &e,
                &RunOptions {
                    prompt: a.prompt.clone(),
                    prompt_ids: a.prompt_ids.clone(),
                    chat: a.chat,
                    system: a.system.clone(),
                    n_predict: a.n_predict,
                    sampling: s.params(),
                    stop: a.stop.clone(),
                    print_ids: a.print_ids,
                    verbose_prompt: a.verbose_prompt,
                    logits_out: a.logits_out.clone(),
                },
            )
        }),
        Command::Codecs(a) => codecs(&a),
        Command::Plan(a) => plan(&a),
        Command::Select(a) => select_cmd(&a),
        Command::MmapProfile(a) => mmap_profile(&a),
        #[cfg(feature = "cuda")]
        Command::CudaCheck(a) if !a.model.is_empty() => cuda_check_models(&a),
        #[cfg(feature = "cuda")]
        Command::CudaCheck(a) => a.cache_types.iter().try_for_each(|&ty| {
            for &ctx in &a.decode_context {
                for &d in &a.head_dim {
                    let shape = (a.kv_heads, a.queries, d);
                    let r = dhurandhar::bench::gpu_parity::time_decode(ty, shape, ctx, a.reps)?;
                    println!("{}", serde_json::to_string(&r)?);
                }
            }
            Ok(())
        }),
        Command::Synth(a) => {
            use dhurandhar::bench::synth;
            synth::shape(&a.shape).and_then(|s| synth::write(&a.output, s, a.layers, a.weight_type))
        }
        Command::Convert(a) => {
            dhurandhar::model::convert::hf_to_gguf(&a.input, &a.output).map(|()| {
                eprintln!("wrote {}", a.output.display());
            })
        }
        Command::Bench(a) => bench(&a),
        Command::Needle(a) => a.model.engine().and_then(|e| {
            use dhurandhar::bench::needle::run_one;
            let filler = std::fs::read_to_string(&a.file)
                .with_context(|| format!("reading {}", a.file.display()))?;
            if let Some(d) = a.depth.iter().find(|d| !(0.0..=1.0).contains(*d)) {
                anyhow::bail!("--depth {d} is not a fraction between 0 and 1");
            }
            println!("| cache K/V | context | depth | pass | answer |\n|---|---|---|---|---|");
            let cells: Vec<(f64, usize)> = a
                .depth
                .iter()
                .flat_map(|&d| a.lengths.iter().map(move |&n| (d, n)))
                .collect();
            let mut passed = 0;
            for &(depth, n) in &cells {
                let r = run_one(&e, &filler, n, depth, a.raw)?;
                passed += r.pass as usize;
                println!(
                    "| {}/{} | {} | {:.2} | {} | {} |",
                    a.model.cache_type_k,
                    a.model.cache_type_v,
                    r.context_tokens,
                    r.depth,
                    if r.pass { "yes" } else { "no" },
                    r.answer.replace('|', "/").replace('\n', " ")
                );
            }
            eprintln!("needle: {passed} of {} passed", cells.len());
            Ok(())
        }),
        Command::Perplexity(a) => a.model.engine().and_then(|e| {
            let text = std::fs::read_to_string(&a.file)
                .with_context(|| format!("reading {}", a.file.display()))?;
            perplexity(
                &e,
                &text,
                a.model.ctx_size,
                a.ubatch_size,
                a.chunks,
                a.kl_divergence_base.as_deref().map(|p| {
                    if a.kl_divergence {
                        KlMode::Compare(p)
                    } else {
                        KlMode::WriteBase(p)
                    }
                }),
                &mut std::io::stdout(),
            )
            .map(|_| ())
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // candle errors carry a backtrace after the message; users get the message line.
            let msg = format!("{e:#}");
            eprintln!("error: {}", msg.lines().next().unwrap_or_default());
            ExitCode::FAILURE
        }
    }
}

//! `dh-server bench`: llama-bench's tests and output. `pp N` times N prompt tokens in ubatches,
//! `tg N` times N single-token decode steps, both after `d` tokens of context were prefilled
//! (untimed); every test runs `r` times and reports mean ± standard deviation of tokens/s.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::engine::{DeviceChoice, Engine, EngineConfig};
use crate::kv::CacheType;
use crate::model::Logits;

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub models: Vec<PathBuf>,
    pub n_prompt: Vec<usize>,
    pub n_gen: Vec<usize>,
    /// `-pg pp,tg`: prompt then generation, timed together.
    pub prompt_gen: Vec<(usize, usize)>,
    pub depths: Vec<usize>,
    pub types_k: Vec<CacheType>,
    pub types_v: Vec<CacheType>,
    pub threads: usize,
    pub repetitions: usize,
    pub kv_layer_policy: Option<String>,
    pub kv_centering: bool,
    pub ple_resident: bool,
    pub device: DeviceChoice,
    pub n_gpu_layers: Option<usize>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchResult {
    pub model_filename: String,
    pub model_type: String,
    pub model_size: u64,
    pub model_n_params: u64,
    pub backend: String,
    /// The SIMD level the cache codecs ran (`kv::codec::isa`): which CPU attention path this is.
    pub cpu_isa: String,
    pub n_threads: usize,
    pub type_k: String,
    pub type_v: String,
    pub n_prompt: usize,
    pub n_gen: usize,
    pub n_depth: usize,
    pub kv_bytes: usize,
    pub avg_ts: f64,
    pub stddev_ts: f64,
    pub samples_ts: Vec<f64>,
}

impl BenchResult {
    pub fn test_name(&self) -> String {
        let base = match (self.n_prompt, self.n_gen) {
            (p, 0) => format!("pp{p}"),
            (0, g) => format!("tg{g}"),
            (p, g) => format!("pp{p}+tg{g}"),
        };
        if self.n_depth > 0 {
            format!("{base} @ d{}", self.n_depth)
        } else {
            base
        }
    }
}

/// Runs every combination, calling `on_result` as each test finishes.
pub fn run(cfg: &BenchConfig, mut on_result: impl FnMut(&BenchResult)) -> Result<Vec<BenchResult>> {
    let mut tests: Vec<(usize, usize)> = Vec::new();
    tests.extend(cfg.n_prompt.iter().filter(|&&p| p > 0).map(|&p| (p, 0)));
    tests.extend(cfg.n_gen.iter().filter(|&&g| g > 0).map(|&g| (0, g)));
    tests.extend(cfg.prompt_gen.iter().copied());
    let mut out = Vec::new();
    for model in &cfg.models {
        for &tk in &cfg.types_k {
            for &tv in &cfg.types_v {
                let n_ctx = cfg.depths.iter().max().copied().unwrap_or(0)
                    + tests.iter().map(|(p, g)| p + g).max().unwrap_or(0);
                let engine = Engine::load(&EngineConfig {
                    model: model.clone(),
                    n_ctx,
                    cache_k: tk,
                    cache_v: tv,
                    chat_template: None,
                    kv_layer_policy: cfg.kv_layer_policy.clone(),
                    kv_centering: cfg.kv_centering,
                    ple_resident: cfg.ple_resident,
                    kv_calibration: None,
                    device: cfg.device,
                    n_gpu_layers: cfg.n_gpu_layers,
                })?;
                let mut cache = engine.new_cache(n_ctx)?;
                let kv_bytes = cache.k_bytes() + cache.v_bytes();
                let mut rng = StdRng::seed_from_u64(1234);
                let vocab = engine.model.arch.vocab as u32;
                let mut tokens =
                    |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(0..vocab)).collect() };
                // Warm-up: first-touch of weights and scratch, as llama-bench does (within
                // the cache the tests size: `-p 0 -n 4` holds 4 positions).
                engine.prefill(&mut cache, &tokens(n_ctx.clamp(1, 16)))?;
                for &depth in &cfg.depths {
                    for &(p, g) in &tests {
                        let mut samples = Vec::new();
                        for rep in 0..cfg.repetitions {
                            tracing::info!(
                                "bench: {} {tk}/{tv} pp{p} tg{g} d{depth} run {}/{}",
                                file_name(model),
                                rep + 1,
                                cfg.repetitions
                            );
                            cache.truncate(0);
                            if depth > 0 {
                                engine.prefill(&mut cache, &tokens(depth))?;
                            }
                            let (prompt, gen_ids) = (tokens(p), tokens(g));
                            let t0 = Instant::now();
                            if p > 0 {
                                engine.prefill(&mut cache, &prompt)?;
                            }
                            for &t in &gen_ids {
                                engine.model.forward(&[t], &mut cache, Logits::Last)?;
                            }
                            // GPU work is queued: the time counts once it is done.
                            engine.model.device.synchronize()?;
                            samples.push((p + g) as f64 / t0.elapsed().as_secs_f64());
                        }
                        let n = samples.len() as f64;
                        let avg = samples.iter().sum::<f64>() / n;
                        let var = samples.iter().map(|s| (s - avg).powi(2)).sum::<f64>()
                            / (n - 1.0).max(1.0);
                        let r = BenchResult {
                            model_filename: model.display().to_string(),
                            model_type: format!("{} {}", engine.model.arch.name, file_name(model)),
                            model_size: engine.model.weight_bytes,
                            model_n_params: engine.model.n_params(),
                            backend: cfg.device.backend().into(),
                            cpu_isa: crate::kv::codec::isa::isa().name().into(),
                            n_threads: cfg.threads,
                            type_k: tk.name().into(),
                            type_v: tv.name().into(),
                            n_prompt: p,
                            n_gen: g,
                            n_depth: depth,
                            kv_bytes,
                            avg_ts: avg,
                            stddev_ts: var.sqrt(),
                            samples_ts: samples,
                        };
                        on_result(&r);
                        out.push(r);
                    }
                }
            }
        }
    }
    Ok(out)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// llama-bench's output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Md,
    Csv,
    Json,
    Jsonl,
}

pub fn md_header() -> String {
    // `fa` is always 1: attention here always runs fused over the (compressed) cache.
    "| model | size | params | backend | threads | type_k | type_v | fa | test | t/s | KV MiB |\n\
     | --- | ---: | ---: | --- | ---: | --- | --- | -: | ---: | ---: | ---: |\n"
        .to_string()
}

/// The backend as the table shows it: on the CPU with the SIMD level its attention ran, e.g.
/// `CPU (avx2)`.
fn backend_label(r: &BenchResult) -> String {
    if r.backend == "CPU" {
        format!("CPU ({})", r.cpu_isa)
    } else {
        r.backend.clone()
    }
}

pub fn md_row(r: &BenchResult) -> String {
    format!(
        "| {} | {:.2} MiB | {:.2} M | {} | {} | {} | {} | 1 | {} | {:.2} ± {:.2} | {:.2} |\n",
        r.model_type,
        r.model_size as f64 / 1048576.0,
        r.model_n_params as f64 / 1e6,
        backend_label(r),
        r.n_threads,
        r.type_k,
        r.type_v,
        r.test_name(),
        r.avg_ts,
        r.stddev_ts,
        r.kv_bytes as f64 / 1048576.0
    )
}

pub const CSV_HEADER: &str = "model_filename,model_type,model_size,model_n_params,backend,n_threads,type_k,type_v,n_prompt,n_gen,n_depth,kv_bytes,avg_ts,stddev_ts,cpu_isa\n";

pub fn csv_row(r: &BenchResult) -> String {
    format!(
        "\"{}\",\"{}\",{},{},{},{},{},{},{},{},{},{},{:.6},{:.6},{}\n",
        r.model_filename,
        r.model_type,
        r.model_size,
        r.model_n_params,
        r.backend,
        r.n_threads,
        r.type_k,
        r.type_v,
        r.n_prompt,
        r.n_gen,
        r.n_depth,
        r.kv_bytes,
        r.avg_ts,
        r.stddev_ts,
        r.cpu_isa
    )
}

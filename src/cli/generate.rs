//! Subcommands that run a model over text: `run`, `perplexity`, `needle`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;

use dhurandhar::bench::needle::run_one;
use dhurandhar::bench::perplexity::{KlMode, perplexity};
use dhurandhar::engine::run::{RunOptions, run};

use super::args::{ModelArgs, SamplingArgs};

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt text.
    #[arg(short = 'p', long)]
    pub prompt: Option<String>,
    /// Prompt as comma-separated token ids (for models without a tokenizer).
    #[arg(long, value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    /// Render the prompt as a user turn with the chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat.
    #[arg(long)]
    pub system: Option<String>,
    /// Tokens to generate.
    #[arg(short = 'n', long = "n-predict", default_value_t = 128)]
    pub n_predict: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Stop string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Print generated token ids (comma-separated) instead of text.
    #[arg(long)]
    pub print_ids: bool,
    /// Print the prompt's token ids to stderr.
    #[arg(long)]
    pub verbose_prompt: bool,
    /// Write the f32 logits of every prompt position to this safetensors file (tensor `logits` [T,V]).
    #[arg(long)]
    pub logits_out: Option<PathBuf>,
}

pub fn run_main(a: &RunArgs) -> Result<()> {
    let engine = a.model.engine()?;
    run(
        &engine,
        &RunOptions {
            prompt: a.prompt.clone(),
            prompt_ids: a.prompt_ids.clone(),
            chat: a.chat,
            system: a.system.clone(),
            n_predict: a.n_predict,
            sampling: a.sampling.params(),
            stop: a.stop.clone(),
            print_ids: a.print_ids,
            verbose_prompt: a.verbose_prompt,
            logits_out: a.logits_out.clone(),
        },
    )
}

#[derive(Args)]
pub struct PplArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text file to score.
    #[arg(short = 'f', long)]
    pub file: PathBuf,
    /// Stop after this many chunks.
    #[arg(long)]
    pub chunks: Option<usize>,
    /// Tokens per forward pass; smaller makes later tokens read earlier ones from the KV cache.
    #[arg(long = "ubatch-size", default_value_t = 512)]
    pub ubatch_size: usize,
    /// Logits file of a base run: written by a run with this flag alone, read with --kl-divergence.
    #[arg(long)]
    pub kl_divergence_base: Option<PathBuf>,
    /// Compare this run's distributions with the --kl-divergence-base file (KL divergence).
    #[arg(long, requires = "kl_divergence_base")]
    pub kl_divergence: bool,
}

pub fn perplexity_main(a: &PplArgs) -> Result<()> {
    let engine = a.model.engine()?;
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading {}", a.file.display()))?;
    let kl = a.kl_divergence_base.as_deref().map(|p| {
        if a.kl_divergence {
            KlMode::Compare(p)
        } else {
            KlMode::WriteBase(p)
        }
    });
    perplexity(
        &engine,
        &text,
        a.model.ctx_size,
        a.ubatch_size,
        a.chunks,
        kl,
        &mut std::io::stdout(),
    )
    .map(|_| ())
}

#[derive(Args)]
pub struct NeedleArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Filler prose (e.g. wikitext) the needle is hidden in.
    #[arg(short = 'f', long)]
    pub file: PathBuf,
    /// Context lengths in tokens (comma list).
    #[arg(long, value_delimiter = ',', default_value = "2048,4096,8192")]
    pub lengths: Vec<usize>,
    /// Where the needle sits, as fractions of the filler (comma list; every length at each).
    #[arg(long, value_delimiter = ',', default_value = "0.1")]
    pub depth: Vec<f64>,
    /// Plain text completion instead of the chat template.
    #[arg(long)]
    pub raw: bool,
}

pub fn needle_main(a: &NeedleArgs) -> Result<()> {
    let engine = a.model.engine()?;
    let filler = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading {}", a.file.display()))?;
    if let Some(d) = a.depth.iter().find(|d| !(0.0..=1.0).contains(*d)) {
        bail!("--depth {d} is not a fraction between 0 and 1");
    }
    println!("| cache K/V | context | depth | pass | answer |\n|---|---|---|---|---|");
    let cells: Vec<(f64, usize)> = a
        .depth
        .iter()
        .flat_map(|&d| a.lengths.iter().map(move |&n| (d, n)))
        .collect();
    let mut passed = 0;
    for &(depth, n) in &cells {
        let r = run_one(&engine, &filler, n, depth, a.raw)?;
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
    tracing::info!("needle: {passed} of {} passed", cells.len());
    Ok(())
}

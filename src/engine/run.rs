//! `dh-server run`: one-shot generation from a raw prompt, a chat message or token ids.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use candle_core::Tensor;

use super::Engine;
use super::sampling::{Sampler, SamplingParams};
use crate::chat::Message;
use crate::model::Logits;

pub struct RunOptions {
    pub prompt: Option<String>,
    pub prompt_ids: Option<Vec<u32>>,
    /// Wrap the prompt as a user message in the chat template.
    pub chat: bool,
    pub system: Option<String>,
    pub n_predict: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub print_ids: bool,
    /// Print the prompt's token ids to stderr (llama-cli's `--verbose-prompt`).
    pub verbose_prompt: bool,
    pub logits_out: Option<PathBuf>,
}

pub fn run(engine: &Engine, opts: &RunOptions) -> Result<()> {
    let prompt = match (&opts.prompt_ids, &opts.prompt) {
        (Some(ids), _) => ids.clone(),
        (None, Some(p)) => {
            let tok = engine.tokenizer()?;
            if opts.chat {
                let tmpl = engine
                    .template
                    .as_ref()
                    .context("the model has no chat template (pass --chat-template)")?;
                let mut msgs = Vec::new();
                if let Some(s) = &opts.system {
                    msgs.push(Message {
                        role: "system".into(),
                        content: s.clone(),
                    });
                }
                msgs.push(Message {
                    role: "user".into(),
                    content: p.clone(),
                });
                engine.encode_rendered(&tmpl.render(&msgs, None, true)?)?
            } else {
                tok.encode(p, true)?
            }
        }
        (None, None) => bail!("nothing to run: pass -p PROMPT or --prompt-ids 1,2,3"),
    };
    if opts.verbose_prompt {
        let ids: Vec<String> = prompt.iter().map(|t| t.to_string()).collect();
        tracing::info!("prompt ids ({}): {}", prompt.len(), ids.join(","));
    }
    let mut cache = engine.new_cache(engine.n_ctx)?;
    if let Some(path) = &opts.logits_out {
        let mut rows = Vec::new();
        for chunk in prompt.chunks(super::UBATCH) {
            rows.push(engine.model.forward(chunk, &mut cache, Logits::All)?);
        }
        let logits = Tensor::cat(&rows, 0)?;
        logits
            .save_safetensors("logits", path)
            .with_context(|| format!("writing {}", path.display()))?;
        tracing::info!("wrote logits {:?} to {}", logits.dims(), path.display());
        cache.truncate(0);
        if opts.n_predict == 0 {
            return Ok(());
        }
    }
    let mut sampler = Sampler::new(opts.sampling.clone());
    let stdout = std::io::stdout();
    let print_text = !opts.print_ids && engine.tok.is_some();
    let out = engine.generate(
        &mut cache,
        &prompt,
        opts.n_predict,
        &mut sampler,
        &opts.stop,
        |_, piece| {
            if print_text {
                let mut o = stdout.lock();
                let _ = o.write_all(piece.as_bytes());
                let _ = o.flush();
            }
            true
        },
    )?;
    if opts.print_ids {
        let ids: Vec<String> = out.tokens.iter().map(|t| t.to_string()).collect();
        println!("{}", ids.join(","));
    } else {
        println!();
    }
    let n = out.tokens.len();
    tracing::info!(
        "prompt: {} tokens in {:.1} ms ({:.1} t/s) | generation: {} tokens in {:.1} ms ({:.1} t/s)",
        prompt.len(),
        out.prompt_ms,
        prompt.len() as f64 / out.prompt_ms * 1e3,
        n,
        out.gen_ms,
        if n > 1 {
            (n - 1) as f64 / out.gen_ms * 1e3
        } else {
            0.0
        },
    );
    if let Some((present, total)) = engine.model.ple_resident_bytes() {
        tracing::info!(
            "ple: {:.2} MiB of the {:.2} MiB table resident in this process ({:.2}%)",
            present as f64 / 1048576.0,
            total as f64 / 1048576.0,
            100.0 * present as f64 / total.max(1) as f64
        );
    }
    Ok(())
}

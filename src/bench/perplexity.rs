//! Perplexity as llama-perplexity computes it: the text is cut into `n_ctx`-token chunks, each chunk
//! is evaluated from an empty cache (first token replaced by BOS when the model adds one), and the
//! second half of every chunk is scored. Chunks are fed `ubatch` tokens at a time (llama.cpp's
//! `-ub`); with the default 512 a chunk is one pass and its own K/V stay at full precision.

use std::io::Write;
use std::time::Instant;

use anyhow::{Result, bail};
use rayon::prelude::*;

use super::kld::{KlReader, KlSummary, KlWriter};
use crate::engine::Engine;
use crate::model::Logits;

#[derive(Debug, Clone)]
pub struct PplResult {
    pub ppl: f64,
    pub ppl_err: f64,
    pub chunks: usize,
    pub tokens_scored: usize,
    pub seconds: f64,
    pub kl: Option<KlSummary>,
}

/// What to do with the logits beside scoring them (llama-perplexity's KL options).
pub enum KlMode<'a> {
    /// `--kl-divergence-base F`: store them as the base.
    WriteBase(&'a std::path::Path),
    /// `--kl-divergence-base F --kl-divergence`: compare them with the stored base.
    Compare(&'a std::path::Path),
}

/// Scores `text`; running values go to `out`, progress to stderr.
pub fn perplexity(
    engine: &Engine,
    text: &str,
    n_ctx: usize,
    ubatch: usize,
    max_chunks: Option<usize>,
    kl: Option<KlMode>,
    out: &mut dyn Write,
) -> Result<PplResult> {
    let tok = engine.tokenizer()?;
    let t0 = Instant::now();
    let tokens = tok.encode(text, true)?;
    tracing::info!(
        "perplexity: tokenized {} bytes into {} tokens in {:.0} ms",
        text.len(),
        tokens.len(),
        t0.elapsed().as_secs_f64() * 1e3
    );
    if tokens.len() < 2 * n_ctx {
        bail!(
            "need at least {} tokens to evaluate perplexity with a context of {n_ctx}, the text has {}",
            2 * n_ctx,
            tokens.len()
        );
    }
    let n_chunk_max = tokens.len() / n_ctx;
    let n_chunk = max_chunks.map_or(n_chunk_max, |c| c.min(n_chunk_max));
    let first = n_ctx / 2;
    let vocab = engine.model.arch.vocab;
    let evaluated = &tokens[..n_chunk * n_ctx];
    let (mut writer, mut reader) = match kl {
        Some(KlMode::WriteBase(p)) => (Some(KlWriter::create(p, n_ctx, vocab, evaluated)?), None),
        Some(KlMode::Compare(p)) => (None, Some(KlReader::open(p, n_ctx, vocab, evaluated)?)),
        None => (None, None),
    };
    let (mut nll, mut nll2, mut count) = (0f64, 0f64, 0usize);
    let mut cache = engine.new_cache(n_ctx)?;
    let t_start = Instant::now();
    for i in 0..n_chunk {
        let start = i * n_ctx;
        let mut chunk = tokens[start..start + n_ctx].to_vec();
        if tok.add_bos
            && let Some(bos) = tok.bos
        {
            chunk[0] = bos;
        }
        cache.truncate(0);
        // Positions past the first ubatch attend to earlier ones through the cache, so a small
        // ubatch measures the KV codec the way decoding uses it.
        let mut logits = Vec::with_capacity((n_ctx - first) * vocab);
        for (bi, part) in chunk.chunks(ubatch.max(1)).enumerate() {
            let start = bi * ubatch.max(1);
            let which = if start + part.len() <= first {
                Logits::Last
            } else {
                Logits::From(first.saturating_sub(start))
            };
            let l = engine.model.forward(part, &mut cache, which)?;
            if which != Logits::Last {
                logits.extend(l.flatten_all()?.to_vec1::<f32>()?);
            }
        }
        let targets = &tokens[start + first + 1..start + n_ctx];
        let (s, s2) = targets
            .par_iter()
            .enumerate()
            .map(|(j, &t)| {
                let row = &logits[j * vocab..(j + 1) * vocab];
                let v = -log_softmax_at(row, t as usize);
                (v, v * v)
            })
            .reduce(|| (0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
        for (j, &t) in targets.iter().enumerate() {
            let row = &logits[j * vocab..(j + 1) * vocab];
            if let Some(w) = writer.as_mut() {
                w.push(row)?;
            }
            if let Some(r) = reader.as_mut() {
                r.push(row, t as usize)?;
            }
        }
        nll += s;
        nll2 += s2;
        count += targets.len();
        write!(out, "[{}]{:.4},", i + 1, (nll / count as f64).exp())?;
        out.flush()?;
        let el = t_start.elapsed().as_secs_f64();
        tracing::info!(
            "perplexity: chunk {}/{n_chunk} ({:.2} s/chunk, ETA {:.0} s)",
            i + 1,
            el / (i + 1) as f64,
            el / (i + 1) as f64 * (n_chunk - i - 1) as f64
        );
    }
    writeln!(out)?;
    let mean = nll / count as f64;
    let ppl = mean.exp();
    let var = nll2 / count as f64 - mean * mean;
    let ppl_err = if var > 0.0 {
        (var / (count - 1) as f64).sqrt() * ppl
    } else {
        0.0
    };
    writeln!(out, "Final estimate: PPL = {ppl:.4} +/- {ppl_err:.5}")?;
    if let Some(w) = writer {
        w.finish()?;
    }
    let kl = reader.map(|r| r.summary());
    if let Some(k) = &kl {
        k.print(out)?;
    }
    Ok(PplResult {
        ppl,
        ppl_err,
        chunks: n_chunk,
        tokens_scored: count,
        seconds: t_start.elapsed().as_secs_f64(),
        kl,
    })
}

/// `log softmax(row)[target]`, in f64 like llama-perplexity.
pub fn log_softmax_at(row: &[f32], target: usize) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&l| ((l - max) as f64).exp()).sum();
    (row[target] - max) as f64 - sum.ln()
}

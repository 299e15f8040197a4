//! KL divergence against a base run, as llama-perplexity's `--kl-divergence-base` /
//! `--kl-divergence` do it: the base run stores every scored position's logits (16-bit, linearly
//! scaled per position), a later run with another cache type reads them back and compares
//! distributions position by position.
//!
//! File: magic `DHKLD1\0\0`, then u64 n_ctx, vocab, chunks, token count, the tokens (u32), then
//! per scored position f32 min, f32 step and `vocab` u16 codes.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use crate::engine::sampling::argmax;
use anyhow::{Context, Result, bail};

const MAGIC: &[u8; 8] = b"DHKLD1\0\0";

/// Writes the base logits.
pub struct KlWriter {
    out: BufWriter<File>,
}

impl KlWriter {
    pub fn create(path: &Path, n_ctx: usize, vocab: usize, tokens: &[u32]) -> Result<Self> {
        let f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let mut out = BufWriter::with_capacity(1 << 20, f);
        out.write_all(MAGIC)?;
        for v in [n_ctx, vocab, 0, tokens.len()] {
            out.write_all(&(v as u64).to_le_bytes())?;
        }
        for t in tokens {
            out.write_all(&t.to_le_bytes())?;
        }
        Ok(Self { out })
    }

    pub fn push(&mut self, logits: &[f32]) -> Result<()> {
        let min = logits.iter().copied().fold(f32::INFINITY, f32::min);
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let step = ((max - min) / 65535.0).max(f32::MIN_POSITIVE);
        self.out.write_all(&min.to_le_bytes())?;
        self.out.write_all(&step.to_le_bytes())?;
        let mut buf = Vec::with_capacity(2 * logits.len());
        for &l in logits {
            let code = ((l - min) / step).round().clamp(0.0, 65535.0) as u16;
            buf.extend_from_slice(&code.to_le_bytes());
        }
        self.out.write_all(&buf)?;
        Ok(())
    }

    pub fn finish(mut self) -> Result<()> {
        self.out.flush()?;
        Ok(())
    }
}

/// Reads the base logits back and accumulates the comparison.
pub struct KlReader {
    inp: BufReader<File>,
    vocab: usize,
    buf: Vec<u8>,
    kld: Vec<f64>,
    same_top: usize,
    ln_ratio: f64,
}

fn read_u64(r: &mut impl Read) -> Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

impl KlReader {
    /// Opens a base file and checks it was made from the same tokens, context and vocabulary.
    pub fn open(path: &Path, n_ctx: usize, vocab: usize, tokens: &[u32]) -> Result<Self> {
        let f = File::open(path).with_context(|| format!("opening KL base {}", path.display()))?;
        let mut inp = BufReader::with_capacity(1 << 20, f);
        let mut magic = [0u8; 8];
        inp.read_exact(&mut magic)
            .with_context(|| format!("{}: too short to be a KL base file", path.display()))?;
        if &magic != MAGIC {
            bail!(
                "{} is not a dh-server KL base file (write one with --kl-divergence-base alone)",
                path.display()
            );
        }
        let (c, v, _, nt) = (
            read_u64(&mut inp)?,
            read_u64(&mut inp)?,
            read_u64(&mut inp)?,
            read_u64(&mut inp)?,
        );
        if c as usize != n_ctx || v as usize != vocab {
            bail!(
                "KL base was written with -c {c} and a vocabulary of {v}; this run has -c {n_ctx} and {vocab}"
            );
        }
        let mut base_tokens = vec![0u8; 4 * nt as usize];
        inp.read_exact(&mut base_tokens)?;
        let same = nt as usize == tokens.len()
            && base_tokens
                .chunks_exact(4)
                .zip(tokens)
                .all(|(b, &t)| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) == t);
        if !same {
            bail!("KL base was written from a different text or tokenizer");
        }
        Ok(Self {
            inp,
            vocab,
            buf: vec![0u8; 8 + 2 * vocab],
            kld: Vec::new(),
            same_top: 0,
            ln_ratio: 0.0,
        })
    }

    /// Compares this run's logits at the next scored position with the base, whose target is `target`.
    pub fn push(&mut self, logits: &[f32], target: usize) -> Result<()> {
        self.inp
            .read_exact(&mut self.buf)
            .context("KL base file ends early (fewer chunks than this run?)")?;
        let min = f32::from_le_bytes(self.buf[0..4].try_into()?);
        let step = f32::from_le_bytes(self.buf[4..8].try_into()?);
        let base: Vec<f32> = self.buf[8..]
            .chunks_exact(2)
            .map(|c| min + step * u16::from_le_bytes([c[0], c[1]]) as f32)
            .collect();
        let (lp, lq) = (log_softmax(&base), log_softmax(logits));
        let kld: f64 = lp.iter().zip(&lq).map(|(p, q)| p.exp() * (p - q)).sum();
        self.kld.push(kld.max(0.0));
        self.same_top += (argmax(&base) == argmax(logits)) as usize;
        self.ln_ratio += lp[target] - lq[target];
        debug_assert_eq!(base.len(), self.vocab);
        Ok(())
    }

    pub fn summary(&self) -> KlSummary {
        let n = self.kld.len().max(1) as f64;
        let mean = self.kld.iter().sum::<f64>() / n;
        let var = self
            .kld
            .iter()
            .map(|k| (k - mean) * (k - mean))
            .sum::<f64>()
            / n;
        let mut sorted = self.kld.clone();
        sorted.sort_by(f64::total_cmp);
        let pct = |p: f64| {
            sorted
                .get(((sorted.len() as f64 - 1.0) * p).round() as usize)
                .copied()
                .unwrap_or(0.0)
        };
        KlSummary {
            mean,
            mean_err: (var / n).sqrt(),
            median: pct(0.5),
            p99: pct(0.99),
            max: pct(1.0),
            same_top: self.same_top as f64 / n,
            ln_ppl_ratio: self.ln_ratio / n,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct KlSummary {
    pub mean: f64,
    pub mean_err: f64,
    pub median: f64,
    pub p99: f64,
    pub max: f64,
    /// Fraction of positions where both runs rank the same token first.
    pub same_top: f64,
    /// Mean of ln(p_base(target) / p_this(target)) = ln(PPL(this) / PPL(base)): positive when
    /// this run is worse.
    pub ln_ppl_ratio: f64,
}

impl KlSummary {
    pub fn print(&self, out: &mut dyn Write) -> Result<()> {
        writeln!(out, "====== KL divergence statistics ======")?;
        writeln!(out, "Mean ln(PPL(Q)/PPL(base)): {:10.6}", self.ln_ppl_ratio)?;
        writeln!(
            out,
            "Mean    KLD: {:10.6} ± {:8.6}",
            self.mean, self.mean_err
        )?;
        writeln!(out, "Maximum KLD: {:10.6}", self.max)?;
        writeln!(out, "99.0%   KLD: {:10.6}", self.p99)?;
        writeln!(out, "Median  KLD: {:10.6}", self.median)?;
        writeln!(out, "Same top p: {:6.3} %", 100.0 * self.same_top)?;
        Ok(())
    }
}

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = row
        .iter()
        .map(|&l| (l as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    row.iter().map(|&l| l as f64 - lse).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_gives_zero_and_detects_change() {
        let dir = std::env::temp_dir().join(format!("dh-kld-{}", std::process::id()));
        let tokens = [1u32, 2, 3];
        let rows: Vec<Vec<f32>> = (0..3)
            .map(|r| {
                (0..50)
                    .map(|i| ((i * (r + 3)) as f32 * 0.3).sin() * 4.0)
                    .collect()
            })
            .collect();
        let mut w = KlWriter::create(&dir, 8, 50, &tokens).unwrap();
        for r in &rows {
            w.push(r).unwrap();
        }
        w.finish().unwrap();
        let mut same = KlReader::open(&dir, 8, 50, &tokens).unwrap();
        let mut other = KlReader::open(&dir, 8, 50, &tokens).unwrap();
        for r in &rows {
            same.push(r, 7).unwrap();
            let shifted: Vec<f32> = r
                .iter()
                .enumerate()
                .map(|(i, v)| v + (i % 3) as f32)
                .collect();
            other.push(&shifted, 7).unwrap();
        }
        let (s, o) = (same.summary(), other.summary());
        assert!(s.mean < 1e-6, "{s:?}");
        assert_eq!(s.same_top, 1.0);
        assert!(o.mean > 0.05, "{o:?}");
        assert!(KlReader::open(&dir, 16, 50, &tokens).is_err());
        assert!(KlReader::open(&dir, 8, 50, &[1, 2, 4]).is_err());
        std::fs::remove_file(&dir).unwrap();
    }
}

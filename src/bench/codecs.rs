//! `dh-server codecs`: how well and how fast each cache type stores rows, on synthetic
//! heavy-tailed vectors or on K/V captured from a real model. Error metrics use the codecs' own
//! attention paths (rotated query, fused dot), so what is measured is what attention computes.

use std::time::Instant;

use anyhow::{Result, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::engine::Engine;
use crate::kv::{CacheType, KvCache, KvCodec, KvPolicy};

/// A set of rows of one width, from one source.
pub struct RowSet {
    pub source: String,
    pub head_dim: usize,
    pub rows: Vec<Vec<f32>>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CodecReport {
    pub source: String,
    pub cache_type: String,
    pub head_dim: usize,
    pub bits_per_value: f64,
    pub compression_vs_f16: f64,
    /// Σ‖x − x̂‖² / Σ‖x‖².
    pub nmse: f64,
    pub cosine: f64,
    /// Mean of `<q,k̂> − <q,k>` over query/row pairs, relative to the RMS of `<q,k>`.
    pub ip_bias: f64,
    /// Standard deviation of the same error, relative to the RMS of `<q,k>`.
    pub ip_spread: f64,
    /// Mean ‖x̂‖ / ‖x‖.
    pub norm_ratio: f64,
    pub quantize_ns_per_row: f64,
    pub dot_ns_per_row: f64,
    /// A decode step's read of one cached row for a GQA group of 4 queries: scores
    /// (`dot_rows`) and the weighted V sum (`axpy_rows`), in the codec's domain.
    pub gqa4_read_ns_per_row: f64,
}

fn normal(rng: &mut StdRng) -> f32 {
    let u1: f64 = rng.random::<f64>().max(1e-300);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

/// Rows like real keys: Student-t (ν = 4) values, a few channels 10× larger, a shared offset.
pub fn synthetic(head_dim: usize, n: usize, seed: u64) -> RowSet {
    let mut rng = StdRng::seed_from_u64(seed);
    let scale: Vec<f32> = (0..head_dim)
        .map(|_| {
            if rng.random::<f32>() < 0.05 {
                10.0
            } else {
                1.0
            }
        })
        .collect();
    let offset: Vec<f32> = (0..head_dim).map(|_| 0.5 * normal(&mut rng)).collect();
    let rows = (0..n)
        .map(|_| {
            (0..head_dim)
                .map(|i| {
                    let chi2: f32 = (0..4).map(|_| normal(&mut rng).powi(2)).sum();
                    let t = normal(&mut rng) / (chi2 / 4.0).sqrt().max(1e-3);
                    scale[i] * t + offset[i]
                })
                .collect()
        })
        .collect();
    RowSet {
        source: format!("synthetic-t4 d{head_dim}"),
        head_dim,
        rows,
    }
}

/// Runs `text` through the model with an f32 cache and returns its K rows and V rows, grouped by
/// head_dim (one set per distinct width), at most `max_rows` each.
pub fn from_model(
    engine: &Engine,
    text: &str,
    n_tokens: usize,
    max_rows: usize,
) -> Result<Vec<RowSet>> {
    let tok = engine.tokenizer()?;
    let mut tokens = tok.encode(text, true)?;
    tokens.truncate(n_tokens);
    if tokens.len() < 8 {
        bail!("--text gives only {} tokens; need at least 8", tokens.len());
    }
    let arch = &engine.model.arch;
    let policy = KvPolicy::uniform(arch.n_layer, CacheType::F32, CacheType::F32);
    let mut cache = KvCache::new(arch, &policy, tokens.len(), None, &engine.model.device)?;
    engine.prefill(&mut cache, &tokens)?;
    let n = tokens.len();
    let mut sets: Vec<RowSet> = Vec::new();
    for layer in &cache.layers {
        let hd = layer.head_dim;
        let lo = layer.sliding_window.map_or(0, |w| n.saturating_sub(w));
        for (kind, store) in [("K", &layer.k), ("V", &layer.v)] {
            let source = format!("model-{kind} d{hd}");
            let idx = match sets.iter().position(|s| s.source == source) {
                Some(i) => i,
                None => {
                    sets.push(RowSet {
                        source,
                        head_dim: hd,
                        rows: Vec::new(),
                    });
                    sets.len() - 1
                }
            };
            for h in 0..store.n_kv_head {
                store.read_rows(h, lo..n, |row| sets[idx].rows.push(row.to_vec()));
            }
        }
    }
    // Keep an even spread over layers and positions when there are more rows than asked for.
    for s in &mut sets {
        if s.rows.len() > max_rows {
            let step = s.rows.len() as f64 / max_rows as f64;
            s.rows = (0..max_rows)
                .map(|i| s.rows[(i as f64 * step) as usize].clone())
                .collect();
        }
    }
    Ok(sets)
}

/// Measures one cache type on one row set, with the quantizer the server's default (centered)
/// stores run.
pub fn measure(ty: CacheType, set: &RowSet, seed: u64) -> Result<CodecReport> {
    let codec = ty.codec_for(true);
    let d = set.head_dim;
    if !d.is_multiple_of(codec.block_size()) {
        bail!("{ty} needs head_dim a multiple of {}", codec.block_size());
    }
    let rb = codec.bytes_per_row(d);
    let mut store = vec![0u8; rb * set.rows.len()];
    let t0 = Instant::now();
    for (row, dst) in set.rows.iter().zip(store.chunks_exact_mut(rb)) {
        codec.quantize_row(row, dst);
    }
    let quantize_ns = t0.elapsed().as_nanos() as f64 / set.rows.len() as f64;

    let (mut err2, mut energy, mut cos, mut ratio) = (0f64, 0f64, 0f64, 0f64);
    let mut y = vec![0f32; d];
    for (x, r) in set.rows.iter().zip(store.chunks_exact(rb)) {
        codec.dequantize_row(r, &mut y);
        let (mut xy, mut xx, mut yy, mut e) = (0f64, 0f64, 0f64, 0f64);
        for (&a, &b) in x.iter().zip(&y) {
            let (a, b) = (a as f64, b as f64);
            xy += a * b;
            xx += a * a;
            yy += b * b;
            e += (a - b) * (a - b);
        }
        err2 += e;
        energy += xx;
        if xx > 0.0 && yy > 0.0 {
            cos += xy / (xx * yy).sqrt();
            ratio += (yy / xx).sqrt();
        }
    }
    let n = set.rows.len() as f64;

    // Inner products through the fused path against random queries, as attention reads them
    // (over the codec's shrink).
    let gain = 1.0 / codec.shrink() as f64;
    let mut rng = StdRng::seed_from_u64(seed);
    let n_q = 16;
    let (mut e_sum, mut e2_sum, mut ip2_sum, mut count) = (0f64, 0f64, 0f64, 0f64);
    let mut qr = vec![0f32; d];
    let mut scores = vec![0f32; set.rows.len()];
    let mut dot_ns = 0f64;
    for _ in 0..n_q {
        let q: Vec<f32> = (0..d).map(|_| normal(&mut rng)).collect();
        codec.prepare_query(&q, &mut qr);
        let t = Instant::now();
        codec.dot_rows(d, &qr, &store, &mut scores);
        dot_ns += t.elapsed().as_nanos() as f64;
        for (x, &s) in set.rows.iter().zip(&scores) {
            let exact: f64 = q.iter().zip(x).map(|(&a, &b)| a as f64 * b as f64).sum();
            let e = s as f64 * gain - exact;
            e_sum += e;
            e2_sum += e * e;
            ip2_sum += exact * exact;
            count += 1.0;
        }
    }
    let gqa4_read_ns = gqa4_read_ns(&*codec, d, &store, &mut rng);
    let ip_rms = (ip2_sum / count).sqrt().max(1e-30);
    let e_mean = e_sum / count;
    let e_std = (e2_sum / count - e_mean * e_mean).max(0.0).sqrt();
    let bpv = rb as f64 * 8.0 / d as f64;
    Ok(CodecReport {
        source: set.source.clone(),
        cache_type: ty.name().to_string(),
        head_dim: d,
        bits_per_value: bpv,
        compression_vs_f16: 16.0 / bpv,
        nmse: err2 / energy.max(1e-30),
        cosine: cos / n,
        ip_bias: e_mean / ip_rms,
        ip_spread: e_std / ip_rms,
        norm_ratio: ratio / n,
        quantize_ns_per_row: quantize_ns,
        dot_ns_per_row: dot_ns / (n_q as f64 * n),
        gqa4_read_ns_per_row: gqa4_read_ns,
    })
}

/// Nanoseconds per row of [`CodecReport::gqa4_read_ns_per_row`]: the best of 8 passes over
/// `store` (rows of `d` values) in slices of 256 rows, as the decode step takes them.
fn gqa4_read_ns(codec: &dyn KvCodec, d: usize, store: &[u8], rng: &mut StdRng) -> f64 {
    const QUERIES: usize = 4;
    const SLICE: usize = 256;
    let rb = codec.bytes_per_row(d);
    let mut qs = vec![0f32; QUERIES * d];
    for q in qs.chunks_exact_mut(d) {
        let raw: Vec<f32> = (0..d).map(|_| normal(rng)).collect();
        codec.prepare_query(&raw, q);
    }
    let mut scores = vec![0f32; QUERIES * SLICE];
    let mut acc = vec![0f32; QUERIES * d];
    let mut best = f64::INFINITY;
    for _ in 0..8 {
        let t = Instant::now();
        for slice in store.chunks(SLICE * rb) {
            let n = slice.len() / rb;
            codec.dot_rows(d, &qs, slice, &mut scores[..QUERIES * n]);
            // weights of a softmax's size, not its values: the read is what is timed
            for w in &mut scores[..QUERIES * n] {
                *w = w.abs().min(1.0);
            }
            codec.axpy_rows(d, &scores[..QUERIES * n], slice, &mut acc);
        }
        best = best.min(t.elapsed().as_nanos() as f64);
        std::hint::black_box(&acc);
    }
    best / (store.len() / rb) as f64
}

/// The table `dh-server codecs` prints.
pub fn table(reports: &[CodecReport]) -> String {
    let mut s = String::from(
        "| source | type | bits/value | x f16 | NMSE | cosine | IP bias | IP spread | norm ratio | quantize ns/row | dot ns/row | GQA-4 read ns/row |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in reports {
        s += &format!(
            "| {} | {} | {:.3} | {:.2} | {:.5} | {:.5} | {:+.5} | {:.5} | {:.4} | {:.0} | {:.1} | {:.1} |\n",
            r.source,
            r.cache_type,
            r.bits_per_value,
            r.compression_vs_f16,
            r.nmse,
            r.cosine,
            r.ip_bias,
            r.ip_spread,
            r.norm_ratio,
            r.quantize_ns_per_row,
            r.dot_ns_per_row,
            r.gqa4_read_ns_per_row
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_bits_less_error_and_unbiased_dots() {
        let set = synthetic(128, 256, 7);
        let r = |t| measure(t, &set, 1).unwrap();
        let (f16, q8, t4, t3, t2) = (
            r(CacheType::F16),
            r(CacheType::Q8_0),
            r(CacheType::Turbo4),
            r(CacheType::Turbo3),
            r(CacheType::Turbo2),
        );
        assert!(f16.nmse < 1e-6 && f16.bits_per_value == 16.0);
        assert!(q8.nmse < t4.nmse && t4.nmse < t3.nmse && t3.nmse < t2.nmse);
        assert!((t4.bits_per_value - 4.25).abs() < 1e-9);
        for t in [&t4, &t3, &t2] {
            assert!(t.ip_bias.abs() < 0.05, "{t:?}");
            assert!((t.norm_ratio - 1.0).abs() < 0.01, "{t:?}");
        }
    }
}

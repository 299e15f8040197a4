//! Attention over the stored rows. The model hands in the chunk's own Q/K/V (already normed and
//! roped); past positions are read from the store through the codecs' fused paths, the chunk's own
//! positions at full precision. The chunk is appended to the store afterwards.
//!
//! Past rows are always read for a whole GQA group (and, in prefill, a block of queries) at once,
//! so each compressed row is decoded once per tile and used by every query that needs it.
//! Layers whose stores live in GPU memory attend through [`device`] instead.

use std::ops::Range;

use anyhow::{Result, bail};
use candle_core::{Device, Tensor};

use super::codec::{axpy_f32, dot_f32};
use super::softmax::exp_sum;
use super::store::{LayerCache, RowStore};
use crate::parallel::{SharedMut, par_chunks_mut, par_for};

#[cfg(feature = "cuda")]
pub mod device;

/// Causal attention of `t` queries at positions `pos..pos+t`.
///
/// Shapes: `q` [t, n_head, head_dim], `k`/`v` [t, n_kv_head, head_dim]; returns [t, n_head, head_dim].
pub fn attention(
    cache: &mut LayerCache,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    pos: usize,
    n_head: usize,
    scale: f32,
) -> Result<Vec<f32>> {
    let out = attend(cache, q, k, v, pos, n_head, scale)?;
    if let Some(moments) = cache.query_moments.as_mut() {
        moments.add_rotated(q, pos, n_head);
    }
    append(cache, k, v, pos);
    Ok(out)
}

/// Attention of queries at `pos..` over the positions before `pos` stored in `cache` and this
/// chunk's own `k`/`v`, without storing anything: a shared-KV layer reads its source layer's
/// cache this way, and the source stores its rows once every reader is done.
pub fn attend(
    cache: &LayerCache,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    pos: usize,
    n_head: usize,
    scale: f32,
) -> Result<Vec<f32>> {
    let hd = cache.head_dim;
    let n_kv = cache.k.n_kv_head;
    let t = q.len() / (n_head * hd);
    if q.len() != t * n_head * hd || k.len() != t * n_kv * hd || v.len() != k.len() {
        bail!(
            "attention: shapes disagree (q {}, k {}, v {}, {n_head}x{n_kv} heads of {hd})",
            q.len(),
            k.len(),
            v.len()
        );
    }
    if cache.sliding_window.is_none() && pos + t > cache.k.capacity {
        bail!(
            "context overflow: position {} exceeds the cache's {} cells",
            pos + t,
            cache.k.capacity
        );
    }
    let shape = Shape {
        t,
        n_head,
        n_kv,
        hd,
        pos,
        scale,
    };
    if t == 1 {
        Ok(decode(cache, q, k, v, &shape))
    } else {
        prefill(cache, q, k, v, &shape)
    }
}

/// Stores a chunk's K/V rows `k`, `v` [t, n_kv, hd] at positions `pos..`, quantizing them once.
pub fn append(cache: &mut LayerCache, k: &[f32], v: &[f32], pos: usize) {
    let hd = cache.head_dim;
    let n_kv = cache.k.n_kv_head;
    let t = k.len() / (n_kv * hd);
    // K and V stores in parallel (a prefill chunk is thousands of rows).
    let mut stores = [(&mut cache.k, k), (&mut cache.v, v)];
    let write = |(store, rows): &mut (&mut RowStore, &[f32])| {
        for ti in 0..t {
            for h in 0..n_kv {
                let off = (ti * n_kv + h) * hd;
                store.write(h, pos + ti, &rows[off..off + hd]);
            }
        }
    };
    if t == 1 {
        stores.iter_mut().for_each(write);
    } else {
        par_chunks_mut(&mut stores, 1, |_, s| write(&mut s[0]));
    }
}

struct Shape {
    t: usize,
    n_head: usize,
    n_kv: usize,
    hd: usize,
    pos: usize,
    scale: f32,
}

impl Shape {
    fn group(&self) -> usize {
        self.n_head / self.n_kv
    }

    /// Oldest position query `ti` may see.
    fn lo(&self, cache: &LayerCache, ti: usize) -> usize {
        let qpos = self.pos + ti;
        cache
            .sliding_window
            .map_or(0, |w| (qpos + 1).saturating_sub(w))
    }
}

/// `scores` [m, range.len()] of `m` prepared queries `qs` [m, hd] against K rows `range` of
/// head `kvh`, through the codec, plus `bias[i]` (the query's dot with the store's mean, when it
/// centers rows), times `scale`.
#[allow(clippy::too_many_arguments)]
fn past_scores(
    k: &RowStore,
    hd: usize,
    kvh: usize,
    range: Range<usize>,
    qs: &[f32],
    bias: &[f32],
    scale: f32,
    scores: &mut [f32],
) {
    let (m, n) = (qs.len() / hd, range.len());
    let mut off = 0;
    let mut seg_scores = Vec::new();
    for (codec, rows, ns) in k.runs(kvh, range) {
        seg_scores.resize(m * ns, 0.0);
        codec.dot_rows(hd, qs, rows, &mut seg_scores);
        let gain = 1.0 / codec.shrink();
        for i in 0..m {
            for (d, s) in scores[i * n + off..][..ns]
                .iter_mut()
                .zip(&seg_scores[i * ns..(i + 1) * ns])
            {
                *d = (s * gain + bias[i]) * scale;
            }
        }
        off += ns;
    }
}

/// `acc[i] += Σ_j w[i, j] · V(range[j])` in the V codec's domain; `w` [m, range.len()].
fn past_values(
    v: &RowStore,
    hd: usize,
    kvh: usize,
    range: Range<usize>,
    w: &[f32],
    acc: &mut [f32],
) {
    let (m, n) = (acc.len() / hd, range.len());
    let mut off = 0;
    let mut seg_w = Vec::new();
    for (codec, rows, ns) in v.runs(kvh, range) {
        seg_w.clear();
        let gain = 1.0 / codec.shrink();
        for i in 0..m {
            seg_w.extend(w[i * n + off..][..ns].iter().map(|x| x * gain));
        }
        codec.axpy_rows(hd, &seg_w, rows, acc);
        off += ns;
    }
}

/// Softmax state of one query over part of its keys: running max, sum of weights, and the
/// weighted V sum (in the V codec's domain) relative to that max.
struct Partial {
    max: Vec<f32>,
    sum: Vec<f32>,
    acc: Vec<f32>,
}

/// One query per head. Tasks are (KV head, slice of the past); each reads its slice once for
/// the whole GQA group, and the slices' partial softmaxes are merged (flash-decoding).
fn decode(cache: &LayerCache, q: &[f32], k: &[f32], v: &[f32], s: &Shape) -> Vec<f32> {
    let (hd, g) = (s.hd, s.group());
    let past = s.lo(cache, 0)..s.pos;
    let threads = candle_core::utils::get_num_threads().max(1);
    // Enough slices to keep every thread busy, none shorter than a few tiles.
    let n_split = past
        .len()
        .div_ceil(256)
        .min((2 * threads).div_ceil(s.n_kv))
        .max(1);
    let split = past.len().div_ceil(n_split).max(1);
    let n_tasks = s.n_kv * n_split;
    let mut partials: Vec<Option<Partial>> = (0..n_tasks).map(|_| None).collect();
    let shared = SharedMut::new(&mut partials);
    par_for(n_tasks, |task| {
        let (kvh, part) = (task / n_split, task % n_split);
        let lo = past.start + part * split;
        let range = lo.min(past.end)..(lo + split).min(past.end);
        let mut qs = vec![0f32; g * hd];
        let mut bias = vec![0f32; g];
        let mean = cache.k.head_mean(kvh, hd);
        for (gi, qr) in qs.chunks_exact_mut(hd).enumerate() {
            let h = kvh * g + gi;
            let qh = &q[h * hd..(h + 1) * hd];
            cache.k.prepare_query(kvh, qh, qr);
            bias[gi] = mean.map_or(0.0, |m| dot_f32(qh, m));
        }
        let n = range.len();
        let mut w = vec![0f32; g * n];
        past_scores(
            &cache.k,
            hd,
            kvh,
            range.clone(),
            &qs,
            &bias,
            s.scale,
            &mut w,
        );
        let (mut max, mut sum) = (vec![f32::NEG_INFINITY; g], vec![0f32; g]);
        for gi in 0..g {
            let row = &mut w[gi * n..(gi + 1) * n];
            max[gi] = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            sum[gi] = exp_sum(row, max[gi]);
        }
        let mut acc = vec![0f32; g * hd];
        past_values(&cache.v, hd, kvh, range, &w, &mut acc);
        // SAFETY: slot `task` belongs to this task alone.
        let slot = unsafe { shared.range(task..task + 1) };
        slot[0] = Some(Partial { max, sum, acc });
    });
    let mut out = vec![0f32; q.len()];
    for kvh in 0..s.n_kv {
        let parts: Vec<&Partial> = partials[kvh * n_split..(kvh + 1) * n_split]
            .iter()
            .flatten()
            .collect();
        let (k_own, v_own) = (&k[kvh * hd..(kvh + 1) * hd], &v[kvh * hd..(kvh + 1) * hd]);
        for gi in 0..g {
            let h = kvh * g + gi;
            let o = &mut out[h * hd..(h + 1) * hd];
            let own = dot_f32(&q[h * hd..(h + 1) * hd], k_own) * s.scale;
            let max = parts.iter().map(|p| p.max[gi]).fold(own, f32::max);
            let w_own = (own - max).exp();
            let mut past = 0f32;
            for p in &parts {
                if p.sum[gi] > 0.0 {
                    let c = (p.max[gi] - max).exp();
                    past += c * p.sum[gi];
                    axpy_f32(c, &p.acc[gi * hd..(gi + 1) * hd], o);
                }
            }
            cache.v.finish_values(kvh, o, past);
            let total = past + w_own;
            let inv = 1.0 / total;
            for x in o.iter_mut() {
                *x *= inv;
            }
            axpy_f32(w_own * inv, v_own, o);
        }
    }
    out
}

/// Queries per prefill task (per GQA member): blocks share each decoded past tile.
const PREFILL_BLOCK: usize = 16;

/// A chunk of queries: the chunk's own K/V at full precision through matmuls (Q·Kᵀ and P·V per
/// KV head, all heads of a group stacked), the past through the codecs, merged in one softmax.
fn prefill(cache: &LayerCache, q: &[f32], k: &[f32], v: &[f32], s: &Shape) -> Result<Vec<f32>> {
    let (t, hd, n_kv, g) = (s.t, s.hd, s.n_kv, s.group());
    let dev = Device::Cpu;
    // q [t, kv, g, d] → [kv, g·t, d]; k, v [t, kv, d] → [kv, t, d]
    let qt = Tensor::from_slice(q, (t, n_kv, g, hd), &dev)?
        .permute((1, 2, 0, 3))?
        .contiguous()?
        .reshape((n_kv, g * t, hd))?;
    let kt = Tensor::from_slice(k, (t, n_kv, hd), &dev)?
        .transpose(0, 1)?
        .contiguous()?;
    let vt = Tensor::from_slice(v, (t, n_kv, hd), &dev)?
        .transpose(0, 1)?
        .contiguous()?;
    // rows of `probs` are (kv head, group member, query); columns are chunk keys
    let mut probs = qt.matmul(&kt.t()?)?.flatten_all()?.to_vec1::<f32>()?;
    let mut past_out = vec![0f32; n_kv * g * t * hd];
    let n_blocks = t.div_ceil(PREFILL_BLOCK);
    let (probs_w, past_w) = (SharedMut::new(&mut probs), SharedMut::new(&mut past_out));
    par_for(n_kv * n_blocks, |task| {
        let (kvh, b) = (task / n_blocks, task % n_blocks);
        let tis = b * PREFILL_BLOCK..((b + 1) * PREFILL_BLOCK).min(t);
        let nb = tis.len();
        let m = g * nb;
        // The block's past: from what its first query may see to the chunk start.
        let lo_first = s.lo(cache, tis.start);
        let past = lo_first.min(s.pos)..s.pos;
        let n = past.len();
        let mut qs = vec![0f32; m * hd];
        let mut bias = vec![0f32; m];
        let k_mean = cache.k.head_mean(kvh, hd);
        for gi in 0..g {
            for (bi, ti) in tis.clone().enumerate() {
                let h = kvh * g + gi;
                let src = &q[(ti * s.n_head + h) * hd..][..hd];
                let r = gi * nb + bi;
                cache.k.prepare_query(kvh, src, &mut qs[r * hd..][..hd]);
                bias[r] = k_mean.map_or(0.0, |mu| dot_f32(src, mu));
            }
        }
        let mut w = vec![0f32; m * n];
        let mut past_weight = vec![0f32; m];
        past_scores(&cache.k, hd, kvh, past.clone(), &qs, &bias, s.scale, &mut w);
        for gi in 0..g {
            for (bi, ti) in tis.clone().enumerate() {
                let r = gi * nb + bi;
                let row = (kvh * g + gi) * t + ti;
                // SAFETY: rows (kvh, gi, ti in this block) belong to this task alone.
                let prow = unsafe { probs_w.range(row * t..(row + 1) * t) };
                let lo = s.lo(cache, ti);
                let own_lo = lo.max(s.pos) - s.pos;
                let wrow = &mut w[r * n..(r + 1) * n];
                // Keys older than this query's window are not part of its softmax.
                let masked = lo.saturating_sub(past.start).min(n);
                wrow[..masked].fill(f32::NEG_INFINITY);
                let mut max = wrow.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                for x in &mut prow[own_lo..=ti] {
                    *x *= s.scale;
                    max = max.max(*x);
                }
                let mut sum = exp_sum(wrow, max);
                for (j, x) in prow.iter_mut().enumerate() {
                    if j < own_lo || j > ti {
                        *x = 0.0;
                    } else {
                        *x = (*x - max).exp();
                        sum += *x;
                    }
                }
                let inv = 1.0 / sum;
                for x in prow.iter_mut() {
                    *x *= inv;
                }
                for x in wrow.iter_mut() {
                    *x *= inv;
                }
                past_weight[r] = wrow.iter().sum();
            }
        }
        let mut acc = vec![0f32; m * hd];
        past_values(&cache.v, hd, kvh, past, &w, &mut acc);
        for gi in 0..g {
            for (bi, ti) in tis.clone().enumerate() {
                let r = gi * nb + bi;
                let o = &mut acc[r * hd..][..hd];
                cache.v.finish_values(kvh, o, past_weight[r]);
                let row = (kvh * g + gi) * t + ti;
                // SAFETY: as for `probs` above.
                let dst = unsafe { past_w.range(row * hd..(row + 1) * hd) };
                dst.copy_from_slice(o);
            }
        }
    });
    let p = Tensor::from_vec(probs, (n_kv, g * t, t), &dev)?;
    let own = p.matmul(&vt)?.flatten_all()?.to_vec1::<f32>()?;
    // [kv, g, t, d] + past → [t, kv·g, d]
    let mut out = vec![0f32; q.len()];
    for kvh in 0..n_kv {
        for gi in 0..g {
            for ti in 0..t {
                let row = (kvh * g + gi) * t + ti;
                let dst = &mut out[(ti * s.n_head + kvh * g + gi) * hd..][..hd];
                for ((d, a), b) in dst
                    .iter_mut()
                    .zip(&own[row * hd..(row + 1) * hd])
                    .zip(&past_out[row * hd..(row + 1) * hd])
                {
                    *d = a + b;
                }
            }
        }
    }
    Ok(out)
}

//! Attention over the stored rows. The model hands in the chunk's own Q/K/V (already normed and
//! roped); past positions are read from the store through the codec, the chunk's own positions at
//! full precision. The chunk is appended to the store afterwards.

use anyhow::{Result, bail};
use candle_core::{Device, Tensor};

use super::codec::{axpy_f32, dot_f32};
use super::store::LayerCache;
use crate::parallel::par_chunks_mut;

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
    let out = if t == 1 {
        decode(cache, q, k, v, &shape)
    } else {
        prefill(cache, q, k, v, &shape)?
    };
    for ti in 0..t {
        for h in 0..n_kv {
            let off = (ti * n_kv + h) * hd;
            cache.k.write(h, pos + ti, &k[off..off + hd]);
            cache.v.write(h, pos + ti, &v[off..off + hd]);
        }
    }
    Ok(out)
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
    /// Oldest position query `ti` may see.
    fn lo(&self, cache: &LayerCache, ti: usize) -> usize {
        let qpos = self.pos + ti;
        cache
            .sliding_window
            .map_or(0, |w| (qpos + 1).saturating_sub(w))
    }
}

/// Scores of one query against its past rows, read through the K codec.
fn past_scores(
    cache: &LayerCache,
    qr: &[f32],
    kvh: usize,
    past: std::ops::Range<usize>,
    scale: f32,
    scores: &mut Vec<f32>,
) {
    scores.clear();
    scores.resize(past.len(), 0.0);
    let mut off = 0;
    for (rows, n) in cache.k.segments(kvh, past) {
        cache.k.codec.dot_rows(qr, rows, &mut scores[off..off + n]);
        off += n;
    }
    for x in scores.iter_mut() {
        *x *= scale;
    }
}

/// `o += Σ weights[i] · V(past[i])`, through the V codec, in its domain.
fn past_values(
    cache: &LayerCache,
    kvh: usize,
    past: std::ops::Range<usize>,
    weights: &[f32],
    o: &mut [f32],
) {
    let mut off = 0;
    for (rows, n) in cache.v.segments(kvh, past) {
        cache.v.codec.axpy_rows(&weights[off..off + n], rows, o);
        off += n;
    }
}

/// One query per head: the fused path, every score and V row read from the store.
fn decode(cache: &LayerCache, q: &[f32], k: &[f32], v: &[f32], s: &Shape) -> Vec<f32> {
    let (hd, group) = (s.hd, s.n_head / s.n_kv);
    let lo = s.lo(cache, 0);
    let mut out = vec![0f32; q.len()];
    // One head per task; decode work per head is small, so scratch is per task.
    par_chunks_mut(&mut out, hd, |h, o| {
        let (qr, scores) = (
            &mut vec![0f32; hd],
            &mut Vec::<f32>::with_capacity(s.pos + 1),
        );
        let kvh = h / group;
        let qv = &q[h * hd..(h + 1) * hd];
        cache.k.codec.prepare_query(qv, qr);
        past_scores(cache, qr, kvh, lo..s.pos, s.scale, scores);
        let own = dot_f32(qv, &k[kvh * hd..(kvh + 1) * hd]) * s.scale;
        let max = scores.iter().copied().fold(own, f32::max);
        let mut sum = (own - max).exp();
        let w_own = sum;
        for x in scores.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        let inv = 1.0 / sum;
        o.fill(0.0);
        for x in scores.iter_mut() {
            *x *= inv;
        }
        past_values(cache, kvh, lo..s.pos, scores, o);
        cache.v.codec.finish_output(o);
        axpy_f32(w_own * inv, &v[kvh * hd..(kvh + 1) * hd], o);
    });
    out
}

/// A chunk of queries: the chunk's own K/V at full precision through matmuls (Q·Kᵀ and P·V per
/// KV head, all heads of a group stacked), the past through the codec, merged in one softmax.
fn prefill(cache: &LayerCache, q: &[f32], k: &[f32], v: &[f32], s: &Shape) -> Result<Vec<f32>> {
    let (t, hd, n_kv, group) = (s.t, s.hd, s.n_kv, s.n_head / s.n_kv);
    let dev = Device::Cpu;
    // q [t, kv, g, d] → [kv, g·t, d]; k, v [t, kv, d] → [kv, t, d]
    let qt = Tensor::from_slice(q, (t, n_kv, group, hd), &dev)?
        .permute((1, 2, 0, 3))?
        .contiguous()?
        .reshape((n_kv, group * t, hd))?;
    let kt = Tensor::from_slice(k, (t, n_kv, hd), &dev)?
        .transpose(0, 1)?
        .contiguous()?;
    let vt = Tensor::from_slice(v, (t, n_kv, hd), &dev)?
        .transpose(0, 1)?
        .contiguous()?;
    // rows of `probs` are (kv head, group member, query); columns are chunk keys
    let mut probs = qt.matmul(&kt.t()?)?.flatten_all()?.to_vec1::<f32>()?;
    let mut past_out = vec![0f32; n_kv * group * t * hd];
    let mut rows: Vec<(&mut [f32], &mut [f32])> =
        probs.chunks_mut(t).zip(past_out.chunks_mut(hd)).collect();
    // Rows per task: enough to amortize the scratch buffers, many tasks to balance the pool.
    let per_task = (rows.len() / 64).max(1);
    par_chunks_mut(&mut rows, per_task, |task, batch| {
        let (qr, scores) = (&mut vec![0f32; hd], &mut Vec::<f32>::new());
        for (r, (prow, o)) in batch.iter_mut().enumerate() {
            let row = task * per_task + r;
            let (kvh, gi, ti) = (row / (group * t), (row / t) % group, row % t);
            let h = kvh * group + gi;
            let lo = s.lo(cache, ti);
            let past = lo.min(s.pos)..s.pos;
            let own_lo = lo.max(s.pos) - s.pos;
            let qv = &q[(ti * s.n_head + h) * hd..][..hd];
            cache.k.codec.prepare_query(qv, qr);
            past_scores(cache, qr, kvh, past.clone(), s.scale, scores);
            let mut max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            for x in &mut prow[own_lo..=ti] {
                *x *= s.scale;
                max = max.max(*x);
            }
            let mut sum = 0f32;
            for x in scores.iter_mut() {
                *x = (*x - max).exp();
                sum += *x;
            }
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
            o.fill(0.0);
            for x in scores.iter_mut() {
                *x *= inv;
            }
            past_values(cache, kvh, past, scores, o);
            cache.v.codec.finish_output(o);
        }
    });
    let p = Tensor::from_vec(probs, (n_kv, group * t, t), &dev)?;
    let own = p.matmul(&vt)?.flatten_all()?.to_vec1::<f32>()?;
    // [kv, g, t, d] + past → [t, kv·g, d]
    let mut out = vec![0f32; q.len()];
    for kvh in 0..n_kv {
        for gi in 0..group {
            for ti in 0..t {
                let row = (kvh * group + gi) * t + ti;
                let dst = &mut out[(ti * s.n_head + kvh * group + gi) * hd..][..hd];
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

//! Attention over the stored rows. The model hands in the chunk's own Q/K/V (already normed and
//! roped); past positions are read from the store through the codec, the chunk's own positions at
//! full precision. The chunk is appended to the store afterwards.

use anyhow::{Result, bail};
use rayon::prelude::*;

use super::codec::{axpy_f32, dot_f32};
use super::store::LayerCache;

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
    let group = n_head / n_kv;
    let window = cache.sliding_window;
    let mut out = vec![0f32; q.len()];
    {
        let cache = &*cache;
        out.par_chunks_mut(hd).enumerate().for_each_init(
            || (vec![0f32; hd], Vec::<f32>::new()),
            |(qr, scores), (idx, o)| {
                let (ti, h) = (idx / n_head, idx % n_head);
                let kvh = h / group;
                let qpos = pos + ti;
                let lo = window.map_or(0, |w| (qpos + 1).saturating_sub(w));
                let past = lo.min(pos)..pos;
                let own = lo.max(pos)..qpos + 1;
                let qv = &q[idx * hd..(idx + 1) * hd];
                cache.k.codec.prepare_query(qv, qr);
                scores.clear();
                for p in past.clone() {
                    scores.push(cache.k.codec.dot(qr, cache.k.row(kvh, p)) * scale);
                }
                for p in own.clone() {
                    let kr = &k[((p - pos) * n_kv + kvh) * hd..][..hd];
                    scores.push(dot_f32(qv, kr) * scale);
                }
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let inv = 1.0 / sum;
                let n_past = past.len();
                // V of the past accumulates in the codec's domain; the chunk's own V in plain space.
                o.fill(0.0);
                for (i, p) in past.enumerate() {
                    cache.v.codec.axpy(scores[i] * inv, cache.v.row(kvh, p), o);
                }
                cache.v.codec.finish_output(o);
                for (i, p) in own.enumerate() {
                    let vr = &v[((p - pos) * n_kv + kvh) * hd..][..hd];
                    axpy_f32(scores[n_past + i] * inv, vr, o);
                }
            },
        );
    }
    for ti in 0..t {
        for h in 0..n_kv {
            let off = (ti * n_kv + h) * hd;
            cache.k.write(h, pos + ti, &k[off..off + hd]);
            cache.v.write(h, pos + ti, &v[off..off + hd]);
        }
    }
    Ok(out)
}

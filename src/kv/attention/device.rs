//! Attention over a layer's stores in GPU memory (`--features cuda`): the layer-level calls the
//! model makes — decode and prefill over the past, shared-KV layers attending without storing,
//! a chunk stored after them — on top of `kv::device`'s rows and kernel launches.

use anyhow::{Context, Result, bail};
use candle_core::Tensor;
use candle_core::cuda_backend::CudaDevice;
use cudarc::driver::CudaSlice;

use crate::gpu::{Input, cuda};
use crate::kv::device::{self, DeviceRows, Geometry, Rotary, Rows, Step, decode};
use crate::kv::store::{LayerCache, RowStore};

mod prefill;

/// The step of `t` queries at `pos` over `cache` (with `n_head` query heads and score scale
/// `scale`); a context overflow is an error.
fn step(cache: &LayerCache, t: usize, pos: usize, n_head: usize, scale: f32) -> Result<Step> {
    if pos + t > cache.k.capacity && cache.sliding_window.is_none() {
        bail!(
            "context overflow: position {} exceeds the cache's {} cells",
            pos + t,
            cache.k.capacity
        );
    }
    let lo = cache
        .sliding_window
        .map_or(0, |w| (pos + 1).saturating_sub(w));
    Ok(Step {
        pos,
        lo,
        n_head,
        scale,
    })
}

/// Head dim, KV heads and ring capacity of a layer's stores.
fn geometry(cache: &LayerCache) -> Geometry {
    Geometry {
        hd: cache.head_dim,
        n_kv: cache.k.n_kv_head,
        capacity: cache.k.capacity,
    }
}

fn gpu_rows(store: &RowStore) -> Result<&DeviceRows> {
    store.gpu.as_ref().context("layer cache is not on the GPU")
}

fn gpu_rows_mut(store: &mut RowStore) -> Result<&mut DeviceRows> {
    store.gpu.as_mut().context("layer cache is not on the GPU")
}

/// Quantizes `x` [t · n_kv, hd] into `store` at `pos..`, as [`append`] does.
fn store_rows(
    dev: &CudaDevice,
    store: &mut RowStore,
    x: &Input,
    own: Option<&mut CudaSlice<f32>>,
    t: usize,
    pos: usize,
) -> Result<()> {
    let (cap, n_kv) = (store.capacity, store.n_kv_head);
    let d = x.values() / (t * n_kv);
    device::append(
        dev,
        gpu_rows_mut(store)?,
        &x.view()?,
        own,
        (t, n_kv, d),
        cap,
        pos,
    )
}

/// Causal attention of `t` queries at positions `pos..` over the layer's device cache and
/// the chunk's own K/V, then stores the chunk. Shapes: `q` [t · n_head, hd], `k`/`v`
/// [t · n_kv, hd] (token-major; q and k roped here when `rope` is given); returns
/// [t, n_head · hd]. Prefill attends over the past in tiles of `key_tile` keys (`None`: sized to
/// a memory budget; checks pass small tiles to exercise the merge).
#[allow(clippy::too_many_arguments)]
pub fn attention(
    cache: &mut LayerCache,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rope: Option<&Rotary>,
    pos: usize,
    n_head: usize,
    scale: f32,
    key_tile: Option<usize>,
) -> Result<Tensor> {
    let dev = cuda(q)?;
    let t = q.dims2()?.0 / n_head;
    let step = step(cache, t, pos, n_head, scale)?;
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    // The calibration pass (query energies kept) takes the prefill path even for one token.
    if t == 1 && cache.query_moments.is_none() {
        let geom = geometry(cache);
        let rows = Rows::Write(gpu_rows_mut(&mut cache.k)?, gpu_rows_mut(&mut cache.v)?);
        return decode(&dev, rows, geom, &q, &k, &v, rope, &step);
    }
    if let Some(moments) = cache.query_moments.as_mut() {
        moments.add(&q.flatten_all()?.to_vec1::<f32>()?, n_head);
    }
    let (q, k) = match rope {
        Some(r) => (
            device::rope(&q, r.inv_freq, n_head, pos, r.neox)?,
            device::rope(&k, r.inv_freq, cache.k.n_kv_head, pos, r.neox)?,
        ),
        None => (q, k),
    };
    let out = prefill::attend(&dev, cache, &q, &k, &v, &step, key_tile)?;
    let (ki, vi) = (Input::of(&k)?, Input::of(&v)?);
    store_rows(&dev, &mut cache.k, &ki, None, t, pos)?;
    store_rows(&dev, &mut cache.v, &vi, None, t, pos)?;
    Ok(out)
}

/// Causal attention as [`attention`] without storing: for a layer whose store shared-KV layers
/// read (it stores the chunk once they are done, [`append_chunk`]) and for those layers. `q` and
/// `k` come roped; the chunk's K/V take part at full precision.
pub fn attend(
    cache: &LayerCache,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    pos: usize,
    n_head: usize,
    scale: f32,
) -> Result<Tensor> {
    let dev = cuda(q)?;
    let t = q.dims2()?.0 / n_head;
    let step = step(cache, t, pos, n_head, scale)?;
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    if t == 1 {
        let rows = Rows::Read(gpu_rows(&cache.k)?, gpu_rows(&cache.v)?);
        return decode(&dev, rows, geometry(cache), &q, &k, &v, None, &step);
    }
    prefill::attend(&dev, cache, &q, &k, &v, &step, None)
}

/// Stores a chunk's roped K and V [t · n_kv, hd] at positions `pos..` (after [`attend`]).
pub fn append_chunk(cache: &mut LayerCache, k: &Tensor, v: &Tensor, pos: usize) -> Result<()> {
    let dev = cuda(k)?;
    let t = k.dims2()?.0 / cache.k.n_kv_head;
    let (k, v) = (k.contiguous()?, v.contiguous()?);
    let (ki, vi) = (Input::of(&k)?, Input::of(&v)?);
    store_rows(&dev, &mut cache.k, &ki, None, t, pos)?;
    store_rows(&dev, &mut cache.v, &vi, None, t, pos)
}

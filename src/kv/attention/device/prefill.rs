//! Prefill attention over a layer's GPU cache: a tensor-core kernel (prefill.cu) for head
//! dims 64 and 128, cuBLAS matmuls with candle's ops for the others. Both attend over the past
//! in key tiles (dequantized per tile) with an online softmax across tiles, so memory stays
//! bounded at any depth.

use anyhow::{Context, Result};
use candle_core::cuda_backend::CudaDevice;
use candle_core::{DType, Device, Tensor};
use cudarc::driver::PushKernelArg;

use super::gpu_rows;
use crate::gpu::{self, Input, launch_cfg, scratch, tensor};
use crate::kv::device::{Step, dequant};
use crate::kv::store::{LayerCache, RowStore};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/prefill.ptx"));

/// Bytes the matmul path's score tile [n_kv, group · t, keys] may take, so a 131K-token past
/// needs no 8 GiB score matrix.
const SCORE_BYTES: usize = 256 << 20;

/// Bytes one key tile of the dequantized past (K and V) may take on the kernel path.
const PAST_TILE_BYTES: usize = 256 << 20;

/// Causal (and sliding-window) attention of the chunk's queries `q` [t · n_head, hd] (roped)
/// over the keys `step.lo..pos+t`: the past from the cache, the chunk's own `k`/`v`
/// [t · n_kv, hd] at full precision. Returns [t, n_head · hd].
pub(super) fn attend(
    dev: &CudaDevice,
    cache: &LayerCache,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    step: &Step,
    key_tile: Option<usize>,
) -> Result<Tensor> {
    match cache.head_dim {
        64 | 128 => flash(dev, cache, q, k, v, step, key_tile),
        _ => matmuls(dev, cache, q, k, v, step, key_tile),
    }
}

/// The tensor-core kernel, one launch per key tile; a single tile (any chunk whose past fits
/// one) needs no state between launches.
fn flash(
    dev: &CudaDevice,
    cache: &LayerCache,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    step: &Step,
    key_tile: Option<usize>,
) -> Result<Tensor> {
    let (hd, n_kv, n_head) = (cache.head_dim, cache.k.n_kv_head, step.n_head);
    let (pos, lo) = (step.pos, step.lo);
    let group = n_head / n_kv;
    let t = q.dims2()?.0 / n_head;
    let (end, rows) = (pos + t, group * t);
    let key_tile = key_tile.unwrap_or(PAST_TILE_BYTES / (8 * n_kv * hd)).max(1);
    let tiles = (end - lo).div_ceil(key_tile);
    let (qi, ki, vi) = (Input::of(q)?, Input::of(k)?, Input::of(v)?);
    let (qv, kv, vv) = (qi.view()?, ki.view()?, vi.view()?);
    let mut out = scratch(dev, t * n_head * hd)?;
    // Running max, weight sum and output between tiles (unused with one tile).
    let state_rows = if tiles > 1 { n_kv * rows } else { 1 };
    let mut m = scratch(dev, state_rows)?;
    let mut l = scratch(dev, state_rows)?;
    let mut o = scratch(dev, state_rows * hd)?;
    let f = gpu::func(
        dev,
        "dhurandhar_prefill",
        PTX,
        &format!("kv_flash_prefill_d{hd}"),
    )?;
    let scale_log2 = step.scale * std::f32::consts::LOG2_E;
    let window = cache.sliding_window.unwrap_or(0) as i32;
    let (t_i, pos_i, nkv_i, group_i) = (t as i32, pos as i32, n_kv as i32, group as i32);
    let mut a = lo;
    for tile in 0..tiles {
        let b = (a + key_tile).min(end);
        let past = if a < pos {
            let n = b.min(pos) - a;
            let (kr, vr) = (gpu_rows(&cache.k)?, gpu_rows(&cache.v)?);
            let cap = cache.k.capacity;
            Some((
                dequant(dev, kr, (n_kv, hd), cap, (a, n), false)?,
                dequant(dev, vr, (n_kv, hd), cap, (a, n), false)?,
            ))
        } else {
            None
        };
        let past_in = match &past {
            Some((pk, pv)) => Some((Input::of(pk)?, Input::of(pv)?)),
            None => None,
        };
        let past_views = match &past_in {
            Some((pk, pv)) => Some((pk.view()?, pv.view()?)),
            None => None,
        };
        // Past keys absent: the kernel reads the chunk's (never touched below `pos`).
        let (pk, pv) = match &past_views {
            Some((pk, pv)) => (pk, pv),
            None => (&kv, &vv),
        };
        let (a_i, b_i) = (a as i32, b as i32);
        let (has_state, last) = ((tile > 0) as i32, (b == end) as i32);
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        lb.arg(&qv)
            .arg(pk)
            .arg(pv)
            .arg(&kv)
            .arg(&vv)
            .arg(&mut m)
            .arg(&mut l)
            .arg(&mut o)
            .arg(&mut out)
            .arg(&scale_log2)
            .arg(&t_i)
            .arg(&pos_i)
            .arg(&a_i)
            .arg(&b_i)
            .arg(&nkv_i)
            .arg(&group_i)
            .arg(&window)
            .arg(&has_state)
            .arg(&last);
        let grid = (rows.div_ceil(64) as u32, n_kv as u32);
        // SAFETY: argument types and order match `kv_flash_prefill_d{hd}`; q holds t · n_head
        // rows of hd, k/v t · n_kv, the past [n_kv, b' − a, hd]; the state holds n_kv · rows
        // rows whenever a launch reads or writes it (more than one tile).
        unsafe { lb.launch(launch_cfg(grid, 128)) }?;
        a = b;
    }
    Ok(tensor(dev, out, &[t, n_head * hd]))
}

/// Prefill: causal (and sliding-window) masked softmax attention with cuBLAS matmuls over the
/// keys `lo..pos+t`, the past dequantized and the chunk's K/V at full precision. Keys go in
/// tiles of `key_tile` with an online softmax (running max, sum and output rescaled per tile),
/// so memory stays bounded at any depth; one tile takes the fused softmax.
fn matmuls(
    dev: &CudaDevice,
    cache: &LayerCache,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    step: &Step,
    key_tile: Option<usize>,
) -> Result<Tensor> {
    let (hd, n_kv, n_head) = (cache.head_dim, cache.k.n_kv_head, step.n_head);
    let (pos, lo) = (step.pos, step.lo);
    let group = n_head / n_kv;
    let t = q.dims2()?.0 / n_head;
    let end = pos + t;
    let key_tile = key_tile
        .unwrap_or_else(|| (SCORE_BYTES / (4 * n_head * t)).max(256))
        .max(1);
    let device = Device::Cuda(dev.clone());
    // [t, n_kv, hd] → [n_kv, t, hd]
    let chunk = |x: &Tensor| -> Result<Tensor> {
        Ok(x.reshape((t, n_kv, hd))?.transpose(0, 1)?.contiguous()?)
    };
    let (k_new, v_new) = (chunk(k)?, chunk(v)?);
    // [n_kv, group · t, hd] → [t, n_head · hd]
    let heads_to_tokens = |o: &Tensor| -> Result<Tensor> {
        Ok(o.reshape((n_kv, group, t, hd))?
            .permute((2, 0, 1, 3))?
            .contiguous()?
            .reshape((t, n_head * hd))?)
    };
    // [t, n_kv, group, hd] → [n_kv, group · t, hd], scaled once
    let qh = (q
        .reshape((t, n_kv, group, hd))?
        .permute((1, 2, 0, 3))?
        .contiguous()?
        .reshape((n_kv, group * t, hd))?
        * step.scale as f64)?;
    // Query positions, repeated per group member: [group · t, 1].
    let qpos = Tensor::arange(pos as f32, end as f32, &device)?
        .reshape((1, t))?
        .broadcast_as((group, t))?
        .contiguous()?
        .reshape((group * t, 1))?;
    // Keys a..b: the stored past below `pos`, then the chunk's own rows.
    let keys = |store: &RowStore, new: &Tensor, a: usize, b: usize| -> Result<Tensor> {
        let mut parts = Vec::with_capacity(2);
        if a < pos {
            let rows = gpu_rows(store)?;
            let n = b.min(pos) - a;
            parts.push(dequant(
                dev,
                rows,
                (n_kv, hd),
                store.capacity,
                (a, n),
                false,
            )?);
        }
        if b > pos {
            let s = a.max(pos);
            parts.push(new.narrow(1, s - pos, b - s)?);
        }
        Ok(Tensor::cat(&parts, 1)?)
    };
    // (running max, sum of weights, weighted V sum), each [n_kv, group · t, ·]
    let mut state: Option<(Tensor, Tensor, Tensor)> = None;
    let mut a = lo;
    while a < end {
        let b = (a + key_tile).min(end);
        let (kt, vt) = (keys(&cache.k, &k_new, a, b)?, keys(&cache.v, &v_new, a, b)?);
        let mut scores = qh.matmul(&kt.t()?.contiguous()?)?;
        // A key is hidden from a query above it, or (sliding) w or more below it.
        let future = b - 1 > pos;
        let slid = cache.sliding_window.is_some_and(|w| a + w < end);
        if future || slid {
            let kpos = Tensor::arange(a as f32, b as f32, &device)?.reshape((1, b - a))?;
            let mut visible = kpos.broadcast_le(&qpos)?.to_dtype(DType::F32)?;
            if let Some(w) = cache.sliding_window {
                let recent = kpos
                    .broadcast_gt(&(&qpos - w as f64)?)?
                    .to_dtype(DType::F32)?;
                visible = (visible * recent)?;
            }
            scores = scores.broadcast_add(&((visible - 1.0)? * 1e30)?)?;
        }
        if state.is_none() && b == end {
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            return heads_to_tokens(&probs.matmul(&vt)?);
        }
        let tile_max = scores.max_keepdim(2)?;
        let m = match &state {
            Some((m0, _, _)) => m0.maximum(&tile_max)?,
            None => tile_max,
        };
        let p = scores.broadcast_sub(&m)?.exp()?;
        let (l_tile, o_tile) = (p.sum_keepdim(2)?, p.matmul(&vt)?);
        state = Some(match state {
            Some((m0, l0, o0)) => {
                let alpha = (m0 - &m)?.exp()?;
                let l = (l0.broadcast_mul(&alpha)? + l_tile)?;
                let o = (o0.broadcast_mul(&alpha)? + o_tile)?;
                (m, l, o)
            }
            None => (m, l_tile, o_tile),
        });
        a = b;
    }
    let (_, l, o) = state.context("prefill with no keys")?;
    heads_to_tokens(&o.broadcast_div(&l)?)
}

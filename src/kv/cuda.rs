//! The CUDA side of the compressed cache (`--features cuda`): our kernels (`kernels/cuda/*.cu`,
//! PTX embedded at build time) launched through cudarc on rows in the CPU codecs' byte layout.
//! First piece of the GPU backend (issue 7): turbo4 decode scores and V accumulation, checked
//! against the CPU codec by `dh-server cuda-check`.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;

use super::KvCodec;
use super::codec::lloyd_max;
use super::codec::turbo::group_width;
use super::codec::turbo4::Turbo4Codec;

const TURBO4_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/turbo4.ptx"));

/// Queries per launch the kernels hold in registers (a GQA group).
pub const MAX_QUERIES: usize = 8;

pub struct Turbo4Kernels {
    pub stream: Arc<CudaStream>,
    scores: CudaFunction,
    axpy: CudaFunction,
    attn_partial: CudaFunction,
    attn_merge: CudaFunction,
}

/// Rows per flash-decoding slice (`SPLIT_MAX` in the kernel).
pub const SPLIT: usize = 256;

/// One layer's decode attention on the GPU: K and V rows of every KV head (head-major, `n`
/// rows each), the prepared and pre-scaled queries [n_kv, n_q, d], partials and output.
pub struct DeviceLayer {
    pub n_kv: usize,
    pub n_q: usize,
    pub n: usize,
    pub d: usize,
    k_rows: CudaSlice<u8>,
    v_rows: CudaSlice<u8>,
    queries: CudaSlice<f32>,
    codebook: CudaSlice<f32>,
    part_max: CudaSlice<f32>,
    part_sum: CudaSlice<f32>,
    part_acc: CudaSlice<f32>,
    pub out: CudaSlice<f32>,
}

/// Rows, queries and weights resident on the GPU, for one head.
pub struct DeviceHead {
    pub n: usize,
    pub d: usize,
    pub n_q: usize,
    rows: CudaSlice<u8>,
    queries: CudaSlice<f32>,
    weights: CudaSlice<f32>,
    codebook: CudaSlice<f32>,
    pub scores: CudaSlice<f32>,
    pub out: CudaSlice<f32>,
}

impl Turbo4Kernels {
    pub fn new(ordinal: usize) -> Result<Self> {
        let ctx = CudaContext::new(ordinal).context("opening the CUDA device")?;
        // Everything runs on one stream, so cudarc's cross-stream events (recorded per buffer
        // argument on every launch) only add latency.
        // SAFETY: no buffer of this context is used from a second stream.
        unsafe { ctx.disable_event_tracking() };
        let module = ctx
            .load_module(Ptx::from_src(TURBO4_PTX))
            .context("loading the turbo4 kernels")?;
        Ok(Self {
            stream: ctx.default_stream(),
            scores: module.load_function("turbo4_scores")?,
            axpy: module.load_function("turbo4_axpy")?,
            attn_partial: module.load_function("turbo4_attn_partial")?,
            attn_merge: module.load_function("turbo4_attn_merge")?,
        })
    }

    pub fn upload_layer(
        &self,
        (n_kv, n_q, d): (usize, usize, usize),
        k_rows: &[u8],
        v_rows: &[u8],
        q: &[f32],
    ) -> Result<DeviceLayer> {
        if n_q == 0 || n_q > MAX_QUERIES || d > 256 || !d.is_multiple_of(64) {
            bail!(
                "turbo4 attention takes 1..={MAX_QUERIES} queries per KV head and head_dim 64..=256"
            );
        }
        let rb = Turbo4Codec::default().bytes_per_row(d);
        let n = k_rows.len() / (rb * n_kv);
        let n_split = n.div_ceil(SPLIT).max(1);
        let cb = &lloyd_max::turbo(group_width(d), 4).centroids;
        let s = &self.stream;
        Ok(DeviceLayer {
            n_kv,
            n_q,
            n,
            d,
            k_rows: s.clone_htod(k_rows)?,
            v_rows: s.clone_htod(v_rows)?,
            queries: s.clone_htod(q)?,
            codebook: s.clone_htod(cb.as_slice())?,
            part_max: s.alloc_zeros(n_kv * n_split * n_q)?,
            part_sum: s.alloc_zeros(n_kv * n_split * n_q)?,
            part_acc: s.alloc_zeros(n_kv * n_split * n_q * d)?,
            out: s.alloc_zeros(n_kv * n_q * d)?,
        })
    }

    /// `layer.out` = softmax(q·Kᵀ)·V per query, in V's rotated domain: one block per KV head
    /// and slice of [`SPLIT`] rows, then a merge of the slices.
    pub fn attention(&self, layer: &mut DeviceLayer) -> Result<()> {
        let rb = Turbo4Codec::default().bytes_per_row(layer.d);
        let n_split = layer.n.div_ceil(SPLIT).max(1);
        let (n_q, n, d) = (layer.n_q as i32, layer.n as i32, layer.d as i32);
        let (rb_i, stride, split) = (rb as i32, (rb * layer.n) as i64, SPLIT as i32);
        let mut b = self.stream.launch_builder(&self.attn_partial);
        b.arg(&layer.queries)
            .arg(&layer.k_rows)
            .arg(&layer.v_rows)
            .arg(&layer.codebook)
            .arg(&mut layer.part_max)
            .arg(&mut layer.part_sum)
            .arg(&mut layer.part_acc)
            .arg(&n_q)
            .arg(&n)
            .arg(&d)
            .arg(&rb_i)
            .arg(&stride)
            .arg(&split);
        let cfg = LaunchConfig {
            grid_dim: (layer.n_kv as u32, n_split as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument types and order match `turbo4_attn_partial`; partials hold
        // n_kv · n_split slots.
        unsafe { b.launch(cfg) }?;
        let n_split_i = n_split as i32;
        let mut b = self.stream.launch_builder(&self.attn_merge);
        b.arg(&layer.part_max)
            .arg(&layer.part_sum)
            .arg(&layer.part_acc)
            .arg(&mut layer.out)
            .arg(&n_q)
            .arg(&d)
            .arg(&n_split_i);
        let cfg = LaunchConfig {
            grid_dim: (layer.n_kv as u32, 1, 1),
            block_dim: (layer.d as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: as above, for `turbo4_attn_merge`.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// Uploads `rows` (turbo4 bytes, `d` values each), prepared queries `q` [n_q, d] and
    /// softmax weights `w` [n_q, n].
    pub fn upload(&self, d: usize, rows: &[u8], q: &[f32], w: &[f32]) -> Result<DeviceHead> {
        let n_q = q.len() / d;
        if n_q == 0 || n_q > MAX_QUERIES || d > 512 || !d.is_multiple_of(64) {
            bail!(
                "turbo4 kernels take 1..={MAX_QUERIES} queries and head_dim a multiple of 64 up to 512"
            );
        }
        let n = rows.len() / Turbo4Codec::default().bytes_per_row(d);
        let cb = &lloyd_max::turbo(group_width(d), 4).centroids;
        let s = &self.stream;
        Ok(DeviceHead {
            n,
            d,
            n_q,
            rows: s.clone_htod(rows)?,
            queries: s.clone_htod(q)?,
            weights: s.clone_htod(w)?,
            codebook: s.clone_htod(cb.as_slice())?,
            scores: s.alloc_zeros(n_q * n)?,
            out: s.alloc_zeros(n_q * d)?,
        })
    }

    /// `head.scores` = every query's dot with every row (no scale).
    pub fn scores(&self, head: &mut DeviceHead) -> Result<()> {
        let (n_q, n, d) = (head.n_q as i32, head.n as i32, head.d as i32);
        let rb = Turbo4Codec::default().bytes_per_row(head.d) as i32;
        let warps = 8u32;
        let cfg = LaunchConfig {
            grid_dim: ((head.n as u32).div_ceil(warps).min(65535), 1, 1),
            block_dim: (32 * warps, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&self.scores);
        b.arg(&head.queries)
            .arg(&head.rows)
            .arg(&head.codebook)
            .arg(&mut head.scores)
            .arg(&n_q)
            .arg(&n)
            .arg(&d)
            .arg(&rb);
        // SAFETY: argument types and order match `turbo4_scores`; buffers hold the sizes it reads.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// `head.out` = Σ_j w[qi, j] · row j, in the rotated domain.
    pub fn axpy(&self, head: &mut DeviceHead) -> Result<()> {
        self.stream.memset_zeros(&mut head.out)?;
        let (n_q, n, d) = (head.n_q as i32, head.n as i32, head.d as i32);
        let rb = Turbo4Codec::default().bytes_per_row(head.d) as i32;
        let per_block = 64i32;
        let cfg = LaunchConfig {
            grid_dim: ((head.n as u32).div_ceil(per_block as u32), 1, 1),
            block_dim: ((head.d / 2) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&self.axpy);
        b.arg(&head.weights)
            .arg(&head.rows)
            .arg(&head.codebook)
            .arg(&mut head.out)
            .arg(&n_q)
            .arg(&n)
            .arg(&d)
            .arg(&rb)
            .arg(&per_block);
        // SAFETY: argument types and order match `turbo4_axpy`; buffers hold the sizes it reads.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }
}

/// What `cuda-check` found for one layer's fused decode attention.
#[derive(Debug, serde::Serialize)]
pub struct AttentionReport {
    pub kv_heads: usize,
    pub queries_per_kv_head: usize,
    pub context: usize,
    pub head_dim: usize,
    /// max |gpu − cpu| / max |cpu| over the outputs.
    pub rel_err: f64,
    pub us: f64,
    /// K and V bytes read per second.
    pub gbps: f64,
}

/// A layer of `n_kv` heads × `n` turbo4 rows written by the CPU codec; the GPU's fused
/// attention against softmax(q·Kᵀ)·V computed with the codec's CPU paths.
pub fn check_attention(
    n_kv: usize,
    n_q: usize,
    n: usize,
    d: usize,
    reps: usize,
) -> Result<AttentionReport> {
    let codec = Turbo4Codec::default();
    let rb = codec.bytes_per_row(d);
    let mut rng = super::codec::turbo::SplitMix(0xA77E);
    let mut x = vec![0f32; d];
    let mut rows = |rng: &mut super::codec::turbo::SplitMix| {
        let mut r = vec![0u8; n_kv * n * rb];
        for row in r.chunks_exact_mut(rb) {
            x.iter_mut().for_each(|v| *v = rng.gaussian() as f32);
            codec.quantize_row(&x, row);
        }
        r
    };
    let (k_rows, v_rows) = (rows(&mut rng), rows(&mut rng));
    let scale = 1.0 / (d as f32).sqrt();
    let mut q = vec![0f32; n_kv * n_q * d];
    let mut raw = vec![0f32; d];
    for qi in q.chunks_exact_mut(d) {
        raw.iter_mut()
            .for_each(|v| *v = 2.0 * rng.gaussian() as f32 * scale);
        codec.prepare_query(&raw, qi);
    }
    let mut want = vec![0f32; n_kv * n_q * d];
    for h in 0..n_kv {
        let qs = &q[h * n_q * d..(h + 1) * n_q * d];
        let mut w = vec![0f32; n_q * n];
        codec.dot_rows(d, qs, &k_rows[h * n * rb..(h + 1) * n * rb], &mut w);
        for row in w.chunks_exact_mut(n) {
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            row.iter_mut().for_each(|s| *s = (*s - m).exp());
            let sum: f32 = row.iter().sum();
            row.iter_mut().for_each(|s| *s /= sum);
        }
        let out = &mut want[h * n_q * d..(h + 1) * n_q * d];
        codec.axpy_rows(d, &w, &v_rows[h * n * rb..(h + 1) * n * rb], out);
    }
    let k = Turbo4Kernels::new(0)?;
    let mut layer = k.upload_layer((n_kv, n_q, d), &k_rows, &v_rows, &q)?;
    k.attention(&mut layer)?;
    let got = k.stream.clone_dtoh(&layer.out)?;
    let top = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    let err = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max)
        / top;
    k.stream.synchronize()?;
    let t0 = Instant::now();
    for _ in 0..reps {
        k.attention(&mut layer)?;
    }
    k.stream.synchronize()?;
    let us = t0.elapsed().as_secs_f64() * 1e6 / reps as f64;
    Ok(AttentionReport {
        kv_heads: n_kv,
        queries_per_kv_head: n_q,
        context: n,
        head_dim: d,
        rel_err: err as f64,
        us,
        gbps: (2 * n_kv * n * rb) as f64 / (us * 1e-6) / 1e9,
    })
}

/// What `cuda-check` found: largest differences from the CPU codec and kernel times.
#[derive(Debug, serde::Serialize)]
pub struct CheckReport {
    pub rows: usize,
    pub head_dim: usize,
    pub queries: usize,
    /// max |gpu − cpu| / max |cpu|, scores and V sums.
    pub scores_rel_err: f64,
    pub axpy_rel_err: f64,
    pub scores_us: f64,
    pub axpy_us: f64,
    /// Row bytes read per second by each kernel.
    pub scores_gbps: f64,
    pub axpy_gbps: f64,
}

/// Writes `n` pseudo-random rows with the CPU turbo4 codec, runs both kernels on them and
/// compares with the codec's own fused paths; then times `reps` launches of each.
pub fn check(n: usize, d: usize, n_q: usize, reps: usize) -> Result<CheckReport> {
    let codec = Turbo4Codec::default();
    let rb = codec.bytes_per_row(d);
    let mut rng = super::codec::turbo::SplitMix(0xC0DA);
    let mut rows = vec![0u8; n * rb];
    let mut x = vec![0f32; d];
    for r in rows.chunks_exact_mut(rb) {
        x.iter_mut().for_each(|v| *v = rng.gaussian() as f32);
        codec.quantize_row(&x, r);
    }
    let mut q = vec![0f32; n_q * d];
    for qi in q.chunks_exact_mut(d) {
        x.iter_mut().for_each(|v| *v = rng.gaussian() as f32);
        codec.prepare_query(&x, qi);
    }
    let w: Vec<f32> = (0..n_q * n)
        .map(|_| rng.next_f64() as f32 / n as f32)
        .collect();
    let mut cpu_scores = vec![0f32; n_q * n];
    codec.dot_rows(d, &q, &rows, &mut cpu_scores);
    let mut cpu_out = vec![0f32; n_q * d];
    codec.axpy_rows(d, &w, &rows, &mut cpu_out);

    let k = Turbo4Kernels::new(0)?;
    let mut head = k.upload(d, &rows, &q, &w)?;
    k.scores(&mut head)?;
    k.axpy(&mut head)?;
    let gpu_scores = k.stream.clone_dtoh(&head.scores)?;
    let gpu_out = k.stream.clone_dtoh(&head.out)?;
    let rel = |a: &[f32], b: &[f32]| {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max) as f64
            / scale as f64
    };
    let time = |f: &dyn Fn(&mut DeviceHead) -> Result<()>, head: &mut DeviceHead| -> Result<f64> {
        k.stream.synchronize()?;
        let t0 = Instant::now();
        for _ in 0..reps {
            f(head)?;
        }
        k.stream.synchronize()?;
        Ok(t0.elapsed().as_secs_f64() * 1e6 / reps as f64)
    };
    let scores_us = time(&|h| k.scores(h), &mut head)?;
    let axpy_us = time(&|h| k.axpy(h), &mut head)?;
    let gbps = |us: f64| (n * rb) as f64 / (us * 1e-6) / 1e9;
    Ok(CheckReport {
        rows: n,
        head_dim: d,
        queries: n_q,
        scores_rel_err: rel(&gpu_scores, &cpu_scores),
        axpy_rel_err: rel(&gpu_out, &cpu_out),
        scores_us,
        axpy_us,
        scores_gbps: gbps(scores_us),
        axpy_gbps: gbps(axpy_us),
    })
}

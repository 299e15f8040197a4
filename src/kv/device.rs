//! The KV cache in GPU memory (`--features cuda`): rows stay on the device in the CPU codecs'
//! bytes and store layout, K/V are quantized there as they are appended
//! (`kernels/cuda/kv.cu`), decode attention reads the compressed rows (flash-decoding, query
//! rotated once, V accumulated in the rotated domain and rotated back once per head), and
//! prefill dequantizes the past once per layer and runs causal attention with cuBLAS through
//! candle. Types with kernels: f16, turbo4, turbo3, turbo2, q8_0, q4_0. Other types (the block
//! rotors and SpectralQuant), and architectures with shared-KV layers, keep their cache in host
//! memory and attend on the CPU.
//!
//! Device stores do not center rows on calibrated means, weight K's channels nor keep exact
//! sink rows (the CPU store's refinements): they hold the fork's plain TurboQuant rows, like
//! `--no-kv-centering`.

use anyhow::{Context, Result, bail};

use candle_core::Tensor;
use candle_core::cuda_backend::CudaDevice;
use cudarc::driver::{CudaFunction, CudaSlice, CudaView, LaunchArgs, LaunchConfig, PushKernelArg};

use crate::gpu::{self, Input, cuda, launch_cfg, scratch, tensor};

use super::CacheType;
use super::codec::lloyd_max;
use super::codec::turbo::group_width;
use super::store::{GPU_TYPES, LayerCache, RowStore};

mod prefill;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kv.ptx"));
/// The decode partials, one module per K codec in [`GPU_TYPES`] order (`kernels/cuda/decode.cu`
/// built for that codec; build.rs).
const DECODE_PTX: [&str; GPU_TYPES.len()] = [
    include_str!(concat!(env!("OUT_DIR"), "/decode_f16.ptx")),
    include_str!(concat!(env!("OUT_DIR"), "/decode_turbo4.ptx")),
    include_str!(concat!(env!("OUT_DIR"), "/decode_turbo3.ptx")),
    include_str!(concat!(env!("OUT_DIR"), "/decode_turbo2.ptx")),
    include_str!(concat!(env!("OUT_DIR"), "/decode_q8_0.ptx")),
    include_str!(concat!(env!("OUT_DIR"), "/decode_q4_0.ptx")),
];

/// Most past rows per flash-decoding slice (kv.cu's DEC_SPLIT, the slice's score buffer), and
/// threads per slice's block (kv.cu's DEC_WARPS warps).
const SPLIT: usize = 256;
const DECODE_THREADS: u32 = 128;
/// Shared memory a slice's staged K and V rows may take: f16 rows of 128 values get 96-row
/// slices, turbo4 the full 256.
const STAGE_BYTES: usize = 56 << 10;

/// kv.cu's `staged_size`: shared bytes for `len` staged rows of `rb` bytes (f16 rows padded
/// by 16 bytes each, turbo rows packed with 64 bytes for alignment).
fn staged_size(len: usize, rb: usize) -> usize {
    if rb.is_multiple_of(16) {
        len * (rb + 16)
    } else {
        (len * rb).next_multiple_of(16) + 64
    }
}

/// Rows per decode slice (a multiple of the kernel's 16-row tiles) for a K/V row-size pair, and
/// the shared bytes its staging takes.
fn decode_split(k_rb: usize, v_rb: usize) -> (usize, usize) {
    let stride = |rb: usize| if rb.is_multiple_of(16) { rb + 16 } else { rb };
    let rows = ((STAGE_BYTES - 128) / (stride(k_rb) + stride(v_rb))).clamp(16, SPLIT) / 16 * 16;
    (rows, staged_size(rows, k_rb) + staged_size(rows, v_rb))
}
/// The kernels' codec ids (`C_*` in kv.cu): the type's place in [`GPU_TYPES`].
fn codec_id(ty: CacheType) -> Option<i32> {
    GPU_TYPES.iter().position(|&t| t == ty).map(|i| i as i32)
}

/// One of K or V of one layer in GPU memory.
pub struct DeviceRows {
    rows: CudaSlice<u8>,
    codec: i32,
    rotates: bool,
    /// Turbo codebook (padded to 16) and its decision points; empty for other codecs.
    centroids: CudaSlice<f32>,
    mids: CudaSlice<f32>,
    n_mids: i32,
}

impl DeviceRows {
    pub fn new(
        dev: &CudaDevice,
        ty: CacheType,
        n_kv_head: usize,
        head_dim: usize,
        capacity: usize,
    ) -> Result<Self> {
        let codec = codec_id(ty).with_context(|| format!("no CUDA kernels for cache type {ty}"))?;
        let bytes = n_kv_head * capacity * ty.codec().bytes_per_row(head_dim);
        // 16 bytes of slack: the decode kernel copies rows in aligned 16-byte pieces.
        let alloc = bytes + 16;
        let s = dev.cuda_stream();
        let (mut centroids, mut mids) = (vec![0f32; 16], vec![0f32]);
        let bits = match ty {
            CacheType::Turbo4 => Some(4),
            CacheType::Turbo3 => Some(3),
            CacheType::Turbo2 => Some(2),
            _ => None,
        };
        if let Some(bits) = bits {
            let cb = lloyd_max::turbo(group_width(head_dim), bits);
            centroids[..cb.centroids.len()].copy_from_slice(&cb.centroids);
            mids = cb.mids.clone();
        }
        Ok(Self {
            rows: s
                .alloc_zeros::<u8>(alloc)
                .with_context(|| format!("allocating {bytes} bytes of KV cache on the GPU"))?,
            codec,
            rotates: bits.is_some(),
            n_mids: if bits.is_some() { mids.len() as i32 } else { 0 },
            centroids: s.clone_htod(&centroids)?,
            mids: s.clone_htod(&mids)?,
        })
    }
}

impl DeviceRows {
    /// `kv_step`'s arguments for one store: rows, the step's full-precision row `own`, codec,
    /// row bytes, codebook, decision points and their count.
    fn push_store_args<'a>(
        &'a mut self,
        b: &mut LaunchArgs<'a>,
        own: &'a mut CudaSlice<f32>,
        row_bytes: &'a i32,
    ) {
        b.arg(&mut self.rows)
            .arg(own)
            .arg(&self.codec)
            .arg(row_bytes)
            .arg(&self.centroids)
            .arg(&self.mids)
            .arg(&self.n_mids);
    }

    /// The stored bytes, copied to the host (checks).
    pub fn to_host(&self, dev: &CudaDevice) -> Result<Vec<u8>> {
        Ok(dev.cuda_stream().clone_dtoh(&self.rows)?)
    }
}

/// Our kernel `name` (kv.cu) on `dev`.
fn func(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
    gpu::func(dev, "dhurandhar_kv", PTX, name)
}

/// `x` [rows, hd] (rows = t · n_head, token-major) rotated for positions `pos..`;
/// `inv_freq` [hd/2] on the device.
pub fn rope(
    x: &Tensor,
    inv_freq: &Tensor,
    n_head: usize,
    pos: usize,
    neox: bool,
) -> Result<Tensor> {
    let dev = cuda(x)?;
    let (rows, hd) = x.dims2()?;
    let x = x.contiguous()?;
    let (xi, fi) = (Input::of(&x)?, Input::of(inv_freq)?);
    let mut y = scratch(&dev, rows * hd)?;
    let f = func(&dev, "kv_rope")?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    let (xv, fv) = (xi.view()?, fi.view()?);
    let (nh, hd_i, pos_i, neox_i) = (n_head as i32, hd as i32, pos as i32, neox as i32);
    b.arg(&xv)
        .arg(&mut y)
        .arg(&fv)
        .arg(&nh)
        .arg(&hd_i)
        .arg(&pos_i)
        .arg(&neox_i);
    // SAFETY: argument types and order match `kv_rope`; y holds rows · hd values.
    unsafe { b.launch(launch_cfg((rows as u32, 1), (hd / 2) as u32)) }?;
    drop((xi, fi));
    Ok(tensor(&dev, y, &[rows, hd]))
}

/// Quantizes `x` [t · n_kv, d] (token-major) into the store at positions `pos..pos+t`; with
/// `own`, also writes the rows in the codec's domain at full precision.
#[allow(clippy::too_many_arguments)]
fn append(
    dev: &CudaDevice,
    store: &mut DeviceRows,
    x: &CudaView<f32>,
    own: Option<&mut CudaSlice<f32>>,
    (t, n_kv, d): (usize, usize, usize),
    row_bytes: usize,
    capacity: usize,
    pos: usize,
) -> Result<()> {
    let f = func(dev, "kv_append")?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    let null = 0u64;
    let (codec, rb, cap, pos_i, nkv, d_i) = (
        store.codec,
        row_bytes as i32,
        capacity as i64,
        pos as i32,
        n_kv as i32,
        d as i32,
    );
    b.arg(x).arg(&mut store.rows);
    match own {
        Some(o) => b.arg(o),
        None => b.arg(&null),
    };
    b.arg(&codec)
        .arg(&rb)
        .arg(&cap)
        .arg(&pos_i)
        .arg(&nkv)
        .arg(&d_i)
        .arg(&store.centroids)
        .arg(&store.mids)
        .arg(&store.n_mids);
    // SAFETY: argument types and order match `kv_append`; the store holds n_kv · capacity rows.
    unsafe { b.launch(launch_cfg((n_kv as u32, t as u32), d as u32)) }?;
    Ok(())
}

/// Positions `first..first+n` of every head as values [n_kv, n, d].
fn dequant(
    dev: &CudaDevice,
    store: &DeviceRows,
    (n_kv, d): (usize, usize),
    row_bytes: usize,
    capacity: usize,
    first: usize,
    n: usize,
) -> Result<Tensor> {
    let mut out = scratch(dev, n_kv * n * d)?;
    let f = func(dev, "kv_dequant")?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    let (codec, rb, cap, first_i, n_i, d_i) = (
        store.codec,
        row_bytes as i32,
        capacity as i64,
        first as i32,
        n as i32,
        d as i32,
    );
    b.arg(&store.rows)
        .arg(&mut out)
        .arg(&codec)
        .arg(&rb)
        .arg(&cap)
        .arg(&first_i)
        .arg(&n_i)
        .arg(&d_i)
        .arg(&store.centroids);
    // SAFETY: argument types and order match `kv_dequant`; out holds n_kv · n · d values.
    unsafe { b.launch(launch_cfg((n as u32, n_kv as u32), d as u32)) }?;
    Ok(tensor(dev, out, &[n_kv, n, d]))
}

/// Where one attention call sits: queries at `pos..pos+t` see keys from `lo`.
struct Step {
    pos: usize,
    lo: usize,
    n_head: usize,
    scale: f32,
}

fn gpu_rows(store: &RowStore) -> Result<&DeviceRows> {
    store.gpu.as_ref().context("layer cache is not on the GPU")
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
    let (rb, cap, n_kv) = (store.row_bytes, store.capacity, store.n_kv_head);
    let d = x.values() / (t * n_kv);
    let rows = store
        .gpu
        .as_mut()
        .context("layer cache is not on the GPU")?;
    append(dev, rows, &x.view()?, own, (t, n_kv, d), rb, cap, pos)
}

/// RoPE for the queries and keys an attention call takes: frequencies [hd/2] on the device and
/// the pairing.
pub struct Rotary<'a> {
    pub inv_freq: &'a Tensor,
    pub neox: bool,
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
    if pos + t > cache.k.capacity && cache.sliding_window.is_none() {
        bail!(
            "context overflow: position {} exceeds the cache's {} cells",
            pos + t,
            cache.k.capacity
        );
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let lo = cache
        .sliding_window
        .map_or(0, |w| (pos + 1).saturating_sub(w));
    let step = Step {
        pos,
        lo,
        n_head,
        scale,
    };
    if t == 1 {
        return decode(&dev, cache, &q, &k, &v, rope, &step);
    }
    let (q, k) = match rope {
        Some(r) => (
            self::rope(&q, r.inv_freq, n_head, pos, r.neox)?,
            self::rope(&k, r.inv_freq, cache.k.n_kv_head, pos, r.neox)?,
        ),
        None => (q, k),
    };
    let out = prefill::attend(&dev, cache, &q, &k, &v, &step, key_tile)?;
    let (ki, vi) = (Input::of(&k)?, Input::of(&v)?);
    store_rows(&dev, &mut cache.k, &ki, None, t, pos)?;
    store_rows(&dev, &mut cache.v, &vi, None, t, pos)?;
    Ok(out)
}

/// One query per head, in three launches: `kv_step` (rope, the query into K's domain, the
/// step's K/V appended and kept at full precision in the codecs' domains), flash-decoding
/// partials over the past `lo..pos` on tensor cores, and their merge with the own position
/// (V rotated back).
fn decode(
    dev: &CudaDevice,
    cache: &mut LayerCache,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rope: Option<&Rotary>,
    step: &Step,
) -> Result<Tensor> {
    let (hd, n_kv, n_head) = (cache.head_dim, cache.k.n_kv_head, step.n_head);
    let group = n_head / n_kv;
    let mut own_k = scratch(dev, n_kv * hd)?;
    let mut own_v = scratch(dev, n_kv * hd)?;
    let mut q_prep = scratch(dev, n_head * hd)?;
    let (krb, vrb) = (cache.k.row_bytes as i32, cache.v.row_bytes as i32);
    let cap = cache.k.capacity as i64;
    let (qi, ki, vi) = (Input::of(q)?, Input::of(k)?, Input::of(v)?);
    let freqs = rope.map(|r| Input::of(r.inv_freq)).transpose()?;
    {
        let (kr, vr) = (
            cache
                .k
                .gpu
                .as_mut()
                .context("layer cache is not on the GPU")?,
            cache
                .v
                .gpu
                .as_mut()
                .context("layer cache is not on the GPU")?,
        );
        let f = func(dev, "kv_step")?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        let (qv, kv, vv) = (qi.view()?, ki.view()?, vi.view()?);
        let fv = freqs.as_ref().map(|f| f.view()).transpose()?;
        let null = 0u64;
        let (neox, pos_i) = (rope.is_some_and(|r| r.neox) as i32, step.pos as i32);
        let (nh, nkv, d_i) = (n_head as i32, n_kv as i32, hd as i32);
        b.arg(&qv).arg(&kv).arg(&vv);
        match &fv {
            Some(f) => b.arg(f),
            None => b.arg(&null),
        };
        b.arg(&neox)
            .arg(&pos_i)
            .arg(&mut q_prep)
            .arg(&step.scale)
            .arg(&nh)
            .arg(&nkv)
            .arg(&d_i)
            .arg(&cap);
        kr.push_store_args(&mut b, &mut own_k, &krb);
        vr.push_store_args(&mut b, &mut own_v, &vrb);
        let blocks = (n_head + 2 * n_kv) as u32;
        // SAFETY: argument types and order match `kv_step`; the stores hold n_kv · capacity
        // rows, q_prep n_head · hd values, own_k/own_v n_kv · hd.
        unsafe { b.launch(launch_cfg((blocks, 1), hd as u32)) }?;
    }
    drop((qi, ki, vi, freqs));
    let (kr, vr) = (gpu_rows(&cache.k)?, gpu_rows(&cache.v)?);
    let n = step.pos - step.lo;
    let (split, stage_bytes) = decode_split(krb as usize, vrb as usize);
    let slots = n.div_ceil(split);
    let mut part_max = scratch(dev, n_kv * slots * group)?;
    let mut part_sum = scratch(dev, n_kv * slots * group)?;
    let mut part_acc = scratch(dev, n_kv * slots * group * hd)?;
    let (nq, d_i) = (group as i32, hd as i32);
    if slots > 0 {
        // One instance per head dim and K/V codec pair (kv.cu); `layer_on_gpu` keeps other head
        // dims and GQA groups over 8 (kv.cu's MAX_Q) in host memory.
        let (kc, vc) = (kr.codec as usize, vr.codec as usize);
        let partial = format!(
            "kv_attn_partial_{hd}_{}_{}",
            GPU_TYPES[kc].name(),
            GPU_TYPES[vc].name()
        );
        let module = format!("dhurandhar_decode_{}", GPU_TYPES[kc].name());
        let f = gpu::func(dev, &module, DECODE_PTX[kc], &partial)?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        let (first, n_i, split_i) = (step.lo as i32, n as i32, split as i32);
        b.arg(&q_prep)
            .arg(&kr.rows)
            .arg(&vr.rows)
            .arg(&krb)
            .arg(&vrb)
            .arg(&kr.centroids)
            .arg(&vr.centroids)
            .arg(&cap)
            .arg(&first)
            .arg(&n_i)
            .arg(&mut part_max)
            .arg(&mut part_sum)
            .arg(&mut part_acc)
            .arg(&nq)
            .arg(&split_i);
        let cfg = LaunchConfig {
            shared_mem_bytes: stage_bytes as u32,
            ..launch_cfg((n_kv as u32, slots as u32), DECODE_THREADS)
        };
        // SAFETY: argument types and order match `kv_attn_partial_*`; partials hold
        // n_kv · slots slots; K and V stores share capacity and head count (and 16 bytes of
        // slack after their rows for the staging copies); stage_bytes ≤ MAX_DYNAMIC_SHARED.
        unsafe { b.launch(cfg) }?;
    }
    let mut out = scratch(dev, n_head * hd)?;
    let f = func(dev, "kv_attn_merge")?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    let (slots_i, inverse) = (slots as i32, vr.rotates as i32);
    b.arg(&part_max)
        .arg(&part_sum)
        .arg(&part_acc)
        .arg(&q_prep)
        .arg(&own_k)
        .arg(&own_v)
        .arg(&mut out)
        .arg(&nq)
        .arg(&d_i)
        .arg(&slots_i)
        .arg(&inverse);
    // Threads in d-wide phases, each summing every phases-th slot: at 32K positions f16 has
    // ~340 slots a head.
    let cfg = LaunchConfig {
        grid_dim: (n_kv as u32, group as u32, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: (4 * slots) as u32,
    };
    // SAFETY: as above, for `kv_attn_merge`; its dynamic shared memory holds one weight per
    // slot (within MAX_DYNAMIC_SHARED: 16384 slots, ≥ 1.5M positions); 1024 threads cover a
    // head (≤ 256 values).
    unsafe { b.launch(cfg) }?;
    Ok(tensor(dev, out, &[1, n_head * hd]))
}

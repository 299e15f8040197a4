//! The KV cache in GPU memory (`--features cuda`): rows stay on the device in the CPU codecs'
//! bytes and store layout, K/V are quantized there as they are appended
//! (`kernels/cuda/kv.cu`), decode attention reads the compressed rows (flash-decoding on tensor
//! cores, `kernels/cuda/decode.cu`: query rotated once, V accumulated in the rotated domain and
//! rotated back once per head), and prefill dequantizes the past tile by tile for a
//! flash-attention kernel (`prefill`). Types with kernels: f16, turbo4, turbo3, turbo2, q8_0,
//! q4_0, the RotorQuant family (rotor, iso, planar) as turbo4/turbo3 rows under their own
//! block rotations, and SpectralQuant (spectral4/3) through per-head bases and tables
//! (`codec::spectral::HeadBasis`). Shared-KV layers attend over their source layer's device
//! store ([`attend`]).
//!
//! Stores center their rows as the CPU store does: turbo rows on the calibrated per-head means,
//! K's channels weighted, the first positions kept as f16 sink rows in the codec's domain
//! ([`Centering`]); with `--no-kv-centering` they hold the fork's plain TurboQuant rows.

use anyhow::{Context, Result, bail};

use candle_core::Tensor;
use candle_core::cuda_backend::CudaDevice;
use cudarc::driver::{CudaFunction, CudaSlice, CudaView, LaunchArgs, LaunchConfig, PushKernelArg};

use crate::gpu::{self, Input, cuda, launch_cfg, scratch, tensor};

use super::codec::lloyd_max;
use super::codec::turbo::group_width;
use super::store::{GPU_TYPES, LayerCache, RowStore, SINK_ROWS, gpu_kernel_type};
use super::{CacheType, KvCodec};

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
    include_str!(concat!(env!("OUT_DIR"), "/decode_spectral4.ptx")),
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

/// Rows per decode slice (a multiple of the kernel's 16-row tiles) for a K/V row-size pair at
/// head dim `hd`, and the dynamic shared bytes the kernel takes: the staged rows, which the
/// warps' V tiles (4 warps × 8 queries × hd floats) reuse once read.
fn decode_split(k_rb: usize, v_rb: usize, hd: usize) -> (usize, usize) {
    let stride = |rb: usize| if rb.is_multiple_of(16) { rb + 16 } else { rb };
    let rows = ((STAGE_BYTES - 128) / (stride(k_rb) + stride(v_rb))).clamp(16, SPLIT) / 16 * 16;
    let tiles = DECODE_THREADS as usize / 32 * 8 * hd * 4;
    (
        rows,
        (staged_size(rows, k_rb) + staged_size(rows, v_rb)).max(tiles),
    )
}
/// The kernels' codec id (`C_*` in codec.cuh) for `ty`: the place in [`GPU_TYPES`] of the type
/// whose kernels run it ([`gpu_kernel_type`]).
fn codec_id(ty: CacheType) -> Result<usize> {
    gpu_kernel_type(ty)
        .and_then(|k| GPU_TYPES.iter().position(|&t| t == k))
        .with_context(|| format!("no CUDA kernels for cache type {ty}"))
}

/// One of K or V of one layer in GPU memory (kv.cu's `Store`).
pub struct DeviceRows {
    dev: CudaDevice,
    rows: CudaSlice<u8>,
    /// f16 sink rows in the codec's domain, `layout.n_sink` per head (a placeholder byte when
    /// none).
    sinks: CudaSlice<u8>,
    layout: Layout,
}

/// How a store's rows read: codec, sizes, centering.
struct Layout {
    n_sink: i32,
    codec: i32,
    row_bytes: i32,
    /// Turbo codebook (padded to 16) and its decision points; empty for other codecs.
    /// SpectralQuant: every head's table (`HeadBasis::table`) in `centroids`.
    centroids: CudaSlice<f32>,
    /// The codebook kernels that read rows take: `centroids` over the codec's shrink
    /// (`KvCodec::shrink`; SpectralQuant: each group's, `HeadBasis::read_table`), so scores and
    /// V sums come out unbiased; quantizing takes `centroids`, so the stored bytes stay the
    /// CPU's.
    read_centroids: CudaSlice<f32>,
    mids: CudaSlice<f32>,
    n_mids: i32,
    /// Centered stores: the per-head mean and channel weights, `n_kv_head × head_dim`.
    mean: Option<CudaSlice<f32>>,
    cscale: Option<CudaSlice<f32>>,
    /// The rotation of turbo rows: 0 for the WHT, else the block width of a RotorQuant type,
    /// whose blocks' parameters `rot` holds (a placeholder float for the WHT). SpectralQuant:
    /// every head's basis [d, d] in `rot`.
    rot_block: i32,
    rot: CudaSlice<f32>,
    /// 1 where the quantizer searches each group's scale (`KvCodec::searches_scale`).
    search: i32,
}

impl Layout {
    /// kv.cu's `STORE_PARAMS` after the rows and sinks, for a kernel that writes rows or reads
    /// the stored values (`stored`), or one that reads rows as attention does.
    fn push<'a>(&'a self, b: &mut LaunchArgs<'a>, null: &'a u64, stored: bool) {
        b.arg(&self.codec)
            .arg(&self.row_bytes)
            .arg(if stored {
                &self.centroids
            } else {
                &self.read_centroids
            })
            .arg(&self.mids)
            .arg(&self.n_mids);
        for x in [&self.mean, &self.cscale] {
            match x {
                Some(x) => b.arg(x),
                None => b.arg(null),
            };
        }
        b.arg(&self.n_sink)
            .arg(&self.rot_block)
            .arg(&self.rot)
            .arg(&self.search);
    }
}

/// How a store centers its rows (the CPU store's refinements): per-head mean and channel
/// weights (`n_kv_head × head_dim` each), and how many leading positions it keeps as sink rows.
pub struct Centering<'a> {
    pub mean: Option<&'a [f32]>,
    pub scale: Option<&'a [f32]>,
    pub sink: usize,
}

impl DeviceRows {
    /// `codecs`: the store's per-head codecs (fitted, for SpectralQuant).
    pub fn new(
        dev: &CudaDevice,
        ty: CacheType,
        (n_kv_head, head_dim, capacity): (usize, usize, usize),
        centering: &Centering,
        codecs: &[Box<dyn KvCodec>],
    ) -> Result<Self> {
        let codec = codec_id(ty)? as i32;
        let row_bytes = ty.codec().bytes_per_row(head_dim);
        let bytes = n_kv_head * capacity * row_bytes;
        // 16 bytes of slack: the decode kernel copies rows in aligned 16-byte pieces.
        let alloc = bytes + 16;
        let s = dev.cuda_stream();
        let (mut centroids, mut mids) = (vec![0f32; 16], vec![0f32]);
        let bits = match gpu_kernel_type(ty) {
            Some(CacheType::Turbo4) => Some(4),
            Some(CacheType::Turbo3) => Some(3),
            Some(CacheType::Turbo2) => Some(2),
            _ => None,
        };
        let (rot_block, mut rot) = match ty.codec().block_rotation() {
            Some(r) => (r.block as i32, r.params),
            None => (0, vec![0.0]),
        };
        let mut read_tables = None;
        if ty.codec().needs_spectrum() {
            let (mut vt, mut tables, mut reads) = (Vec::new(), Vec::new(), Vec::new());
            for (h, c) in codecs.iter().enumerate() {
                let b = c.head_basis(head_dim).with_context(|| {
                    format!("{ty}: head {h}'s fit has more groups than the GPU kernels read")
                })?;
                vt.extend_from_slice(&b.vt);
                tables.extend_from_slice(&b.table);
                reads.extend_from_slice(&b.read_table);
            }
            rot = vt;
            centroids = tables;
            read_tables = Some(reads);
        }
        if let Some(bits) = bits {
            let cb = lloyd_max::turbo(group_width(head_dim), bits);
            centroids[..cb.centroids.len()].copy_from_slice(&cb.centroids);
            mids = cb.mids.clone();
        }
        let gain = 1.0 / ty.codec().shrink();
        let read_centroids: Vec<f32> = match read_tables {
            Some(t) => t,
            None if bits.is_some() => centroids.iter().map(|c| c * gain).collect(),
            None => centroids.clone(),
        };
        if centering.sink > SINK_ROWS {
            bail!("at most {SINK_ROWS} sink rows on the GPU");
        }
        let upload = |x: Option<&[f32]>| x.map(|x| s.clone_htod(x)).transpose();
        Ok(Self {
            dev: dev.clone(),
            rows: s
                .alloc_zeros::<u8>(alloc)
                .with_context(|| format!("allocating {bytes} bytes of KV cache on the GPU"))?,
            sinks: s.alloc_zeros::<u8>((2 * n_kv_head * centering.sink * head_dim).max(1))?,
            layout: Layout {
                n_sink: centering.sink as i32,
                codec,
                row_bytes: row_bytes as i32,
                n_mids: if bits.is_some() { mids.len() as i32 } else { 0 },
                read_centroids: s.clone_htod(&read_centroids)?,
                centroids: s.clone_htod(&centroids)?,
                mids: s.clone_htod(&mids)?,
                mean: upload(centering.mean)?,
                cscale: upload(centering.scale)?,
                rot_block,
                search: codecs.iter().any(|c| c.searches_scale()) as i32,
                rot: s.clone_htod(&rot)?,
            },
        })
    }

    /// Pushes kv.cu's `STORE_PARAMS` for a kernel that writes the store.
    fn push_mut<'a>(&'a mut self, b: &mut LaunchArgs<'a>, null: &'a u64) {
        let Self {
            rows,
            sinks,
            layout,
            ..
        } = self;
        b.arg(rows).arg(sinks);
        layout.push(b, null, true);
    }

    /// Pushes kv.cu's `STORE_PARAMS` for a kernel that reads the store as attention does, or
    /// its values as stored.
    fn push_read<'a>(&'a self, b: &mut LaunchArgs<'a>, null: &'a u64, stored: bool) {
        b.arg(&self.rows).arg(&self.sinks);
        self.layout.push(b, null, stored);
    }

    /// Pushes kv.cu's `STORE_PARAMS` for a kernel that reads the store as attention does.
    fn push<'a>(&'a self, b: &mut LaunchArgs<'a>, null: &'a u64) {
        self.push_read(b, null, false);
    }

    /// Positions `range` of every head as values [n_kv, n, d] on the host, as stored (what the
    /// CPU store's `read_rows` gives), not as attention reads them.
    pub fn values(
        &self,
        (n_kv, d): (usize, usize),
        capacity: usize,
        range: std::ops::Range<usize>,
    ) -> Result<Vec<f32>> {
        if range.is_empty() {
            return Ok(Vec::new());
        }
        let x = dequant(
            &self.dev,
            self,
            (n_kv, d),
            capacity,
            (range.start, range.len()),
            true,
        )?;
        Ok(x.flatten_all()?.to_vec1::<f32>()?)
    }

    /// The stored bytes, copied to the host (checks).
    pub fn to_host(&self, dev: &CudaDevice) -> Result<Vec<u8>> {
        Ok(dev.cuda_stream().clone_dtoh(&self.rows)?)
    }
}

/// The decode partials for K/V codec ids `kc`/`vc` at head dim `hd` (decode.cu).
fn partial_func(dev: &CudaDevice, kc: usize, vc: usize, hd: usize) -> Result<CudaFunction> {
    let (k, v) = (GPU_TYPES[kc].name(), GPU_TYPES[vc].name());
    let module = format!("dhurandhar_decode_{k}");
    gpu::func(
        dev,
        &module,
        DECODE_PTX[kc],
        &format!("kv_attn_partial_{hd}_{k}_{v}"),
    )
}

/// Loads (JIT-compiles, the first time) the kernels a layer with these cache types runs, so
/// that the first decode step of a timed run does not pay for it.
pub fn load_kernels(dev: &CudaDevice, k: CacheType, v: CacheType, head_dim: usize) -> Result<()> {
    partial_func(dev, codec_id(k)?, codec_id(v)?, head_dim)?;
    func(dev, "kv_step")?;
    Ok(())
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

/// Stores `x` [t · n_kv, d] (token-major) at positions `pos..pos+t` (kv.cu's `put_row`); with
/// `own`, also writes the rows in the store's domain at full precision.
fn append(
    dev: &CudaDevice,
    store: &mut DeviceRows,
    x: &CudaView<f32>,
    own: Option<&mut CudaSlice<f32>>,
    (t, n_kv, d): (usize, usize, usize),
    capacity: usize,
    pos: usize,
) -> Result<()> {
    let f = func(dev, "kv_append")?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    let null = 0u64;
    let (cap, pos_i, nkv, d_i) = (capacity as i64, pos as i32, n_kv as i32, d as i32);
    b.arg(x);
    match own {
        Some(o) => b.arg(o),
        None => b.arg(&null),
    };
    b.arg(&cap).arg(&pos_i).arg(&nkv).arg(&d_i);
    store.push_mut(&mut b, &null);
    // SAFETY: argument types and order match `kv_append`; the store holds n_kv · capacity rows
    // and n_kv · n_sink sink rows.
    unsafe { b.launch(launch_cfg((n_kv as u32, t as u32), d as u32)) }?;
    Ok(())
}

/// Positions `first..first+n` of every head as values [n_kv, n, d] (sink or ring rows,
/// centering undone), as attention reads them or, `stored`, as they were stored.
fn dequant(
    dev: &CudaDevice,
    store: &DeviceRows,
    (n_kv, d): (usize, usize),
    capacity: usize,
    (first, n): (usize, usize),
    stored: bool,
) -> Result<Tensor> {
    let mut out = scratch(dev, n_kv * n * d)?;
    let f = func(dev, "kv_dequant")?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    let null = 0u64;
    let (cap, first_i, n_i, d_i) = (capacity as i64, first as i32, n as i32, d as i32);
    b.arg(&mut out).arg(&cap).arg(&first_i).arg(&n_i).arg(&d_i);
    store.push_read(&mut b, &null, stored);
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

impl Step {
    /// The step of `t` queries at `pos` over `cache`; a context overflow is an error.
    fn new(cache: &LayerCache, t: usize, pos: usize, n_head: usize, scale: f32) -> Result<Self> {
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
        Ok(Self {
            pos,
            lo,
            n_head,
            scale,
        })
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
    append(
        dev,
        gpu_rows_mut(store)?,
        &x.view()?,
        own,
        (t, n_kv, d),
        cap,
        pos,
    )
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
    let step = Step::new(cache, t, pos, n_head, scale)?;
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    // The calibration pass (query energies kept) takes the prefill path even for one token.
    if t == 1 && cache.query_moments.is_none() {
        let geom = Geometry::of(cache);
        let rows = Rows::Write(gpu_rows_mut(&mut cache.k)?, gpu_rows_mut(&mut cache.v)?);
        return decode(&dev, rows, geom, &q, &k, &v, rope, &step);
    }
    if let Some(moments) = cache.query_moments.as_mut() {
        moments.add(&q.flatten_all()?.to_vec1::<f32>()?, n_head);
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
    let step = Step::new(cache, t, pos, n_head, scale)?;
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    if t == 1 {
        let rows = Rows::Read(gpu_rows(&cache.k)?, gpu_rows(&cache.v)?);
        return decode(&dev, rows, Geometry::of(cache), &q, &k, &v, None, &step);
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

/// A layer's K and V stores for one decode step: written (the step stored) or only read.
enum Rows<'a> {
    Write(&'a mut DeviceRows, &'a mut DeviceRows),
    Read(&'a DeviceRows, &'a DeviceRows),
}

/// Head dim, KV heads and ring capacity of a layer's stores.
#[derive(Clone, Copy)]
struct Geometry {
    hd: usize,
    n_kv: usize,
    capacity: usize,
}

impl Geometry {
    fn of(cache: &LayerCache) -> Self {
        Self {
            hd: cache.head_dim,
            n_kv: cache.k.n_kv_head,
            capacity: cache.k.capacity,
        }
    }
}

/// One query per head, in three launches: `kv_step` (rope, the query into K's domain, the
/// step's K/V stored unless the stores are only read, and kept at full precision in the
/// stores' domains), flash-decoding partials over the past on tensor cores, and their merge
/// with the positions the stores keep as sink rows and the own position (V rotated back, its
/// mean added).
#[allow(clippy::too_many_arguments)]
fn decode(
    dev: &CudaDevice,
    mut rows: Rows,
    geom: Geometry,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rope: Option<&Rotary>,
    step: &Step,
) -> Result<Tensor> {
    let (hd, n_kv, n_head) = (geom.hd, geom.n_kv, step.n_head);
    let group = n_head / n_kv;
    let mut own_k = scratch(dev, n_kv * hd)?;
    let mut own_v = scratch(dev, n_kv * hd)?;
    let mut q_prep = scratch(dev, n_head * hd)?;
    let cap = geom.capacity as i64;
    let null = 0u64;
    let (qi, ki, vi) = (Input::of(q)?, Input::of(k)?, Input::of(v)?);
    let freqs = rope.map(|r| Input::of(r.inv_freq)).transpose()?;
    {
        let f = func(dev, "kv_step")?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        let (qv, kv, vv) = (qi.view()?, ki.view()?, vi.view()?);
        let fv = freqs.as_ref().map(|f| f.view()).transpose()?;
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
            .arg(&cap)
            .arg(&mut own_k)
            .arg(&mut own_v);
        let store = matches!(rows, Rows::Write(..)) as i32;
        b.arg(&store);
        match &mut rows {
            Rows::Write(kr, vr) => {
                kr.push_mut(&mut b, &null);
                vr.push_mut(&mut b, &null);
            }
            Rows::Read(kr, vr) => {
                kr.push(&mut b, &null);
                vr.push(&mut b, &null);
            }
        }
        let blocks = (n_head + 2 * n_kv) as u32;
        // SAFETY: argument types and order match `kv_step`; the stores hold n_kv · capacity
        // rows, q_prep n_head · hd values, own_k/own_v n_kv · hd.
        unsafe { b.launch(launch_cfg((blocks, 1), hd as u32)) }?;
    }
    drop((qi, ki, vi, freqs));
    let (kr, vr): (&DeviceRows, &DeviceRows) = match &rows {
        Rows::Write(k, v) => (k, v),
        Rows::Read(k, v) => (k, v),
    };
    // Positions below either store's sink count go to the merge, the rest to the partials.
    let x_hi = step
        .pos
        .min(kr.layout.n_sink.max(vr.layout.n_sink) as usize)
        .max(step.lo);
    let first = x_hi;
    let n = step.pos - first;
    let (krb, vrb) = (kr.layout.row_bytes, vr.layout.row_bytes);
    let (split, stage_bytes) = decode_split(krb as usize, vrb as usize, hd);
    let slots = n.div_ceil(split);
    let mut part_max = scratch(dev, n_kv * slots * group)?;
    let mut part_sum = scratch(dev, n_kv * slots * group)?;
    let mut part_acc = scratch(dev, n_kv * slots * group * hd)?;
    let (nq, d_i) = (group as i32, hd as i32);
    if slots > 0 {
        // One instance per head dim and K/V codec pair, one module per K codec (decode.cu);
        // `layer_on_gpu` keeps other head dims and GQA groups over 8 (MAX_Q) in host memory.
        let (kc, vc) = (kr.layout.codec as usize, vr.layout.codec as usize);
        let f = partial_func(dev, kc, vc, hd)?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        let (first_i, n_i, split_i) = (first as i32, n as i32, split as i32);
        b.arg(&q_prep)
            .arg(&kr.rows)
            .arg(&vr.rows)
            .arg(&krb)
            .arg(&vrb)
            .arg(&kr.layout.read_centroids)
            .arg(&vr.layout.read_centroids)
            .arg(&cap)
            .arg(&first_i)
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
    let (slots_i, x_lo, x_hi) = (slots as i32, step.lo as i32, x_hi as i32);
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
        .arg(&cap)
        .arg(&x_lo)
        .arg(&x_hi);
    kr.push(&mut b, &null);
    vr.push(&mut b, &null);
    // Threads in d-wide phases, each summing every phases-th slot: at 32K positions f16 has
    // ~340 slots a head.
    let cfg = LaunchConfig {
        grid_dim: (n_kv as u32, group as u32, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: (4 * slots) as u32,
    };
    // SAFETY: as above, for `kv_attn_merge`; its dynamic shared memory holds one weight per
    // slot (within MAX_DYNAMIC_SHARED: 16384 slots, ≥ 1.5M positions); 1024 threads cover a
    // head (≤ 256 values); x_hi − x_lo ≤ SINK_ROWS (kv.cu's MAX_SINK).
    unsafe { b.launch(cfg) }?;
    Ok(tensor(dev, out, &[1, n_head * hd]))
}

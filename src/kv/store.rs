//! Per-sequence, per-layer storage, allocated once for the whole context.

use anyhow::{Result, bail};

use super::calibration::{KvCalibration, LayerRows, QueryMoments, Spectrum, balance_blocks};
use super::codec::axpy_f32;
use super::codec::f16::F16Codec;
use super::{CacheType, KvCodec, KvPolicy};
use crate::arch::ModelArchitecture;

/// Positions that rotation-codec stores keep at f16 precision (in the codec's domain): the
/// attention sinks at the start of a sequence, which every later query attends to heavily.
pub const SINK_ROWS: usize = 4;
#[cfg(feature = "cuda")]
const _: () = assert!(
    SINK_ROWS <= super::device::MAX_SINK,
    "GPU stores keep these sink rows too"
);

static SINK_CODEC: F16Codec = F16Codec;

pub use super::codec::MAX_HEAD_DIM;

/// Sink rows a store of `capacity` rows keeps: they come with centering (both are off for the
/// fork's plain TurboQuant).
fn sink_count(centered: bool, capacity: usize) -> usize {
    if centered { SINK_ROWS.min(capacity) } else { 0 }
}

/// Bytes one layer's K or V store takes: `rows` rows per KV head in `ty`, plus f16 sink rows
/// when rows are centered (rotation codecs with calibration). What [`RowStore::bytes`] reports.
pub fn store_bytes(
    ty: CacheType,
    n_kv_head: usize,
    head_dim: usize,
    rows: usize,
    centered: bool,
) -> usize {
    let sink = sink_count(centered && ty.codec().rotates(), rows);
    n_kv_head * rows * ty.codec().bytes_per_row(head_dim) + 2 * n_kv_head * sink * head_dim
}

/// Bytes of one store's fitted per-head bases (SpectralQuant; 0 for other types): each head's
/// basis [d, d] and its two tables as the GPU kernels read them, quantizing's and attention's
/// (the host keeps the basis and smaller tables), f32.
pub fn basis_bytes(ty: CacheType, n_kv_head: usize, head_dim: usize) -> usize {
    if !ty.codec().needs_spectrum() {
        return 0;
    }
    4 * n_kv_head * (head_dim * head_dim + 2 * super::codec::spectral::table_len(head_dim))
}

/// One of K or V for one layer: `n_kv_head` rings of `capacity` rows, head-major so a head's
/// rows are contiguous for the decode scan.
pub struct RowStore {
    pub ty: CacheType,
    /// One codec per KV head: the same for most types, fitted per head for SpectralQuant.
    codecs: Vec<Box<dyn KvCodec>>,
    pub row_bytes: usize,
    pub capacity: usize,
    pub n_kv_head: usize,
    /// Per-head mean subtracted before quantizing (rotation codecs; see `calibration`),
    /// `n_kv_head × head_dim` values.
    pub mean: Option<Vec<f32>>,
    /// Per-head, per-channel weights the centered rows are multiplied by before quantizing
    /// (`n_kv_head × head_dim`; K only, see `calibration`): queries are divided by them, so
    /// scores are unchanged while the codec's error moves to the channels queries weigh least.
    pub scale: Option<Vec<f32>>,
    /// Leading positions kept in `sink_rows` instead of the ring ([`SINK_ROWS`] or 0).
    pub sink: usize,
    sink_rows: Vec<half::f16>,
    head_dim: usize,
    // u64 words keep f32/f16 rows aligned for zero-copy casts.
    data: Vec<u64>,
    /// The rows in GPU memory instead of `data` (`kv::device`).
    #[cfg(feature = "cuda")]
    pub gpu: Option<super::device::DeviceRows>,
}

impl RowStore {
    fn new(
        ty: CacheType,
        n_kv_head: usize,
        head_dim: usize,
        capacity: usize,
        mean: Option<Vec<f32>>,
        spectra: Option<&[Spectrum]>,
    ) -> Self {
        let codec = ty.codec();
        let row_bytes = codec.bytes_per_row(head_dim);
        let centered = mean.is_some();
        let codecs = (0..n_kv_head)
            .map(|h| {
                spectra
                    .and_then(|s| s.get(h))
                    .and_then(|s| codec.fit(s))
                    .unwrap_or_else(|| ty.codec_for(centered))
            })
            .collect();
        let bytes = n_kv_head * capacity * row_bytes;
        let sink = sink_count(centered, capacity);
        Self {
            ty,
            codecs,
            row_bytes,
            capacity,
            n_kv_head,
            mean,
            scale: None,
            sink,
            sink_rows: vec![half::f16::ZERO; n_kv_head * sink * head_dim],
            head_dim,
            data: vec![0u64; bytes.div_ceil(8)],
            #[cfg(feature = "cuda")]
            gpu: None,
        }
    }

    /// A store whose rows live in GPU memory, centered like a host store when given a mean
    /// (and channel weights): sink rows come with centering; SpectralQuant fitted per head to
    /// `spectra`.
    #[cfg(feature = "cuda")]
    pub fn on_gpu(
        dev: &candle_core::cuda_backend::CudaDevice,
        ty: CacheType,
        (n_kv_head, head_dim, capacity): (usize, usize, usize),
        (mean, scale): (Option<Vec<f32>>, Option<Vec<f32>>),
        spectra: Option<&[Spectrum]>,
    ) -> Result<Self> {
        let mut s = Self::new(ty, n_kv_head, head_dim, 0, mean, spectra).scaled(scale);
        let sink = sink_count(s.mean.is_some(), capacity);
        let centering = super::device::Centering {
            mean: s.mean.as_deref(),
            scale: s.scale.as_deref(),
            sink,
        };
        let rows = super::device::DeviceRows::new(
            dev,
            ty,
            (n_kv_head, head_dim, capacity),
            &centering,
            &s.codecs,
        )?;
        s.capacity = capacity;
        s.sink = sink;
        s.gpu = Some(rows);
        Ok(s)
    }

    /// This store with its rows scaled per channel (`scale`: n_kv_head × head_dim, or None).
    pub fn scaled(mut self, scale: Option<Vec<f32>>) -> Self {
        self.scale = scale;
        self
    }

    /// Head `head`'s query into the domain its rows are scored in: divided by the channel
    /// scales, then through the codec (rotated, for rotation codecs).
    pub fn prepare_query(&self, head: usize, q: &[f32], out: &mut [f32]) {
        let hd = q.len();
        match &self.scale {
            Some(s) => {
                let mut unscaled = [0f32; MAX_HEAD_DIM];
                for ((u, x), w) in unscaled.iter_mut().zip(q).zip(&s[head * hd..]) {
                    *u = x / w;
                }
                self.codec(head).prepare_query(&unscaled[..hd], out);
            }
            None => self.codec(head).prepare_query(q, out),
        }
    }

    /// Whether the rows live in GPU memory.
    pub fn on_device(&self) -> bool {
        #[cfg(feature = "cuda")]
        return self.gpu.is_some();
        #[cfg(not(feature = "cuda"))]
        false
    }

    /// Bytes of the codecs' per-head state (SpectralQuant's bases), beside [`bytes`](Self::bytes).
    pub fn state_bytes(&self) -> usize {
        self.codecs.iter().map(|c| c.state_bytes()).sum()
    }

    /// The codec that stores head `head`'s rows.
    pub fn codec(&self, head: usize) -> &dyn KvCodec {
        self.codecs[head].as_ref()
    }

    /// Bytes the rows occupy (the theoretical size: ring rows plus f16 sink rows; the
    /// allocation rounds up to 8 bytes at most).
    pub fn bytes(&self) -> usize {
        self.n_kv_head * (self.capacity * self.row_bytes + 2 * self.sink * self.head_dim)
    }

    /// The rows of positions `range` for one head, as runs of consecutive rows with the codec
    /// that reads them: the exact sink rows first, then at most two ring runs.
    pub fn runs(
        &self,
        head: usize,
        range: std::ops::Range<usize>,
    ) -> Vec<(&dyn KvCodec, &[u8], usize)> {
        let mut out: Vec<(&dyn KvCodec, &[u8], usize)> = Vec::with_capacity(3);
        let (hd, s) = (self.head_dim, self.sink);
        let sink_end = range.end.min(s);
        if range.start < sink_end {
            let rows = &self.sink_rows[(head * s + range.start) * hd..(head * s + sink_end) * hd];
            out.push((
                &SINK_CODEC,
                bytemuck::cast_slice(rows),
                sink_end - range.start,
            ));
        }
        let rest = range.start.max(s)..range.end;
        if !rest.is_empty() {
            for (bytes, n) in self.segments(head, rest) {
                if n > 0 {
                    out.push((self.codec(head), bytes, n));
                }
            }
        }
        out
    }

    /// The rows of positions `range` for one head as at most two contiguous byte runs (a ring
    /// wraps once), each with the number of rows it holds.
    pub fn segments(&self, head: usize, range: std::ops::Range<usize>) -> [(&[u8], usize); 2] {
        let n = range.len();
        let bytes: &[u8] = bytemuck::cast_slice(&self.data);
        let base = head * self.capacity * self.row_bytes;
        if n == 0 {
            // Empty runs still point into the store, so they keep its alignment for casts.
            let empty = &bytes[base..base];
            return [(empty, 0), (empty, 0)];
        }
        let slot = range.start % self.capacity;
        let first = n.min(self.capacity - slot);
        let a = &bytes[base + slot * self.row_bytes..][..first * self.row_bytes];
        let b = &bytes[base..][..(n - first) * self.row_bytes];
        [(a, first), (b, n - first)]
    }

    /// Reads positions `range` of one head back as values (sinks and ring rows alike, rotation
    /// undone, mean added back), calling `f` with each row.
    pub fn read_rows(&self, head: usize, range: std::ops::Range<usize>, mut f: impl FnMut(&[f32])) {
        let hd = self.head_dim;
        let mut emit = |row: &mut [f32]| {
            self.unweight(head, row, 1.0);
            f(row);
        };
        let mut row = vec![0f32; hd];
        for pos in range.start..range.end.min(self.sink) {
            let stored = &self.sink_rows[(head * self.sink + pos) * hd..][..hd];
            SINK_CODEC.dequantize_row(bytemuck::cast_slice(stored), &mut row);
            // sinks hold the codec's domain
            self.codec(head).finish_output(&mut row);
            emit(&mut row);
        }
        let rest = range.start.max(self.sink)..range.end;
        if !rest.is_empty() {
            for (bytes, n) in self.segments(head, rest) {
                for r in bytes.chunks_exact(self.row_bytes).take(n) {
                    self.codec(head).dequantize_row(r, &mut row);
                    emit(&mut row);
                }
            }
        }
    }

    /// Positions `range` of every head as values `[n_kv_head, range.len(), head_dim]`, as
    /// [`read_rows`](Self::read_rows) gives them (a GPU store's read back from the device).
    pub fn values(&self, range: std::ops::Range<usize>) -> Result<Vec<f32>> {
        #[cfg(feature = "cuda")]
        if let Some(rows) = &self.gpu {
            return rows.values((self.n_kv_head, self.head_dim), self.capacity, range);
        }
        let mut out = Vec::with_capacity(self.n_kv_head * range.len() * self.head_dim);
        for h in 0..self.n_kv_head {
            self.read_rows(h, range.clone(), |row| out.extend_from_slice(row));
        }
        Ok(out)
    }

    pub fn write(&mut self, head: usize, pos: usize, values: &[f32]) {
        let hd = values.len();
        // Row buffers on the stack: this runs once per head, layer and token.
        let mut centered = [0f32; MAX_HEAD_DIM];
        let values = match &self.mean {
            Some(mean) => {
                let c = &mut centered[..hd];
                for ((c, v), m) in c
                    .iter_mut()
                    .zip(values)
                    .zip(&mean[head * hd..(head + 1) * hd])
                {
                    *c = v - m;
                }
                if let Some(s) = &self.scale {
                    for (c, w) in c.iter_mut().zip(&s[head * hd..(head + 1) * hd]) {
                        *c *= w;
                    }
                }
                &centered[..hd]
            }
            None => values,
        };
        if pos < self.sink {
            let mut domain = [0f32; MAX_HEAD_DIM];
            self.codec(head).prepare_query(values, &mut domain[..hd]);
            let dst = &mut self.sink_rows[(head * self.sink + pos) * hd..][..hd];
            SINK_CODEC.quantize_row(&domain[..hd], bytemuck::cast_slice_mut(dst));
            return;
        }
        let slot = pos % self.capacity;
        let start = (head * self.capacity + slot) * self.row_bytes;
        let rb = self.row_bytes;
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut self.data);
        self.codecs[head].quantize_row(values, &mut bytes[start..start + rb]);
    }

    /// Head `head`'s stored mean, if this store centers its rows.
    /// A sum `acc` of this (V) store's rows of head `head` in its stored domain, with weights
    /// summing to `weight`, back into values: rotation undone, channel weights divided out,
    /// `weight` times the mean added.
    pub fn finish_values(&self, head: usize, acc: &mut [f32], weight: f32) {
        self.codec(head).finish_output(acc);
        self.unweight(head, acc, weight);
    }

    /// A row (or a sum of rows with weights summing to `weight`) of head `head`, rotation
    /// already undone, back into values: channel weights divided out, the mean added.
    fn unweight(&self, head: usize, acc: &mut [f32], weight: f32) {
        let hd = acc.len();
        if let Some(s) = &self.scale {
            for (x, w) in acc.iter_mut().zip(&s[head * hd..(head + 1) * hd]) {
                *x /= w;
            }
        }
        if let Some(m) = self.head_mean(head, hd) {
            axpy_f32(weight, m, acc);
        }
    }

    pub fn head_mean(&self, head: usize, head_dim: usize) -> Option<&[f32]> {
        self.mean
            .as_deref()
            .map(|m| &m[head * head_dim..(head + 1) * head_dim])
    }
}

pub struct LayerCache {
    pub k: RowStore,
    pub v: RowStore,
    pub head_dim: usize,
    pub sliding_window: Option<usize>,
    /// The queries attended so far, for K's centre and channel weights: kept by the
    /// calibration pass only.
    pub query_moments: Option<QueryMoments>,
}

/// Whether layer `il` keeps its K/V in GPU memory when the model runs on a GPU: both types have
/// kernels, head_dim is one the kernels read (64, 128 or 256) and the GQA group fits (≤ 8
/// queries) — in every layer where some layers read others' K/V (Gemma 3n/4's shared tail: all
/// on the GPU or none), and no layer is attention-free. Such stores center and keep sink rows
/// as host stores do.
pub fn layer_on_gpu(arch: &ModelArchitecture, il: usize, k: CacheType, v: CacheType) -> bool {
    let fits = |j: usize| {
        let g = &arch.layers[j];
        matches!(g.head_dim, 64 | 128 | 256)
            && g.n_head.is_multiple_of(g.n_kv_head)
            && g.n_head / g.n_kv_head <= 8
    };
    let shared_kv = (0..arch.n_layer).any(|j| arch.kv_source(j).is_some());
    let no_attention = (0..arch.n_layer).any(|j| !arch.stores_kv(j) && arch.kv_source(j).is_none());
    k.kernel_type().is_some()
        && v.kernel_type().is_some()
        && !no_attention
        && if shared_kv {
            (0..arch.n_layer).all(fits)
        } else {
            fits(il)
        }
}

/// Whether layer `il` keeps its K/V in `device`'s memory ([`layer_on_gpu`] on a CUDA device).
pub fn layer_in_device_memory(
    device: &candle_core::Device,
    arch: &ModelArchitecture,
    il: usize,
    k: CacheType,
    v: CacheType,
) -> bool {
    device.is_cuda() && layer_on_gpu(arch, il, k, v)
}

/// The KV cache of one sequence: every layer, sized for `n_ctx` tokens.
pub struct KvCache {
    pub layers: Vec<LayerCache>,
    pub n_ctx: usize,
    /// Tokens whose K/V are stored (the next position to write).
    pub len: usize,
}

impl KvCache {
    /// The K/V calibration over the positions this cache holds (an f32 cache that has read the
    /// calibration text), leaving out position 0: the first token is an attention sink whose
    /// K/V are unlike the rest. Sliding-window layers use the rows they still hold.
    pub fn calibration(&self, spectra: bool) -> Result<KvCalibration> {
        let n = self.len;
        let layers = self.layers.iter().map(|layer| {
            let first = layer
                .sliding_window
                .map_or(1, |w| n.saturating_sub(w).max(1))
                .min(n);
            let rows = |s: &RowStore| (s.capacity > 0).then(|| s.values(first..n)).transpose();
            Ok(LayerRows {
                head_dim: layer.head_dim,
                n_kv_head: layer.k.n_kv_head,
                first,
                k: rows(&layer.k)?,
                v: rows(&layer.v)?,
                query_moments: layer.query_moments.as_ref(),
            })
        });
        KvCalibration::measure(n, layers, spectra)
    }

    /// Storage for `n_ctx` tokens. With `calib`, rotation-codec stores keep its means and
    /// center their rows. On a GPU `device`, layers whose types have kernels keep their rows
    /// there (`kv::device`); the rest stay in host memory.
    pub fn new(
        arch: &ModelArchitecture,
        policy: &KvPolicy,
        n_ctx: usize,
        calib: Option<&KvCalibration>,
        device: &candle_core::Device,
    ) -> Result<Self> {
        if policy.layers.len() != arch.n_layer {
            bail!(
                "KV policy covers {} layers, model has {}",
                policy.layers.len(),
                arch.n_layer
            );
        }
        for (il, g) in arch.layers.iter().enumerate() {
            if g.head_dim > MAX_HEAD_DIM {
                bail!(
                    "layer {il} has head_dim {}; the KV cache supports up to {MAX_HEAD_DIM}",
                    g.head_dim
                );
            }
            for ty in [policy.layers[il].0, policy.layers[il].1] {
                let block = ty.codec().block_size();
                if !g.head_dim.is_multiple_of(block) {
                    bail!(
                        "cache type {ty} needs a head_dim that is a multiple of {block}; layer {il} has {}",
                        g.head_dim
                    );
                }
            }
        }
        let layers = arch
            .layers
            .iter()
            .enumerate()
            .map(|(il, g)| {
                // Shared-KV layers read their source layer's store and keep none.
                let rows = if arch.stores_kv(il) {
                    arch.kv_rows(il, n_ctx)
                } else {
                    0
                };
                let (tk, tv) = policy.layers[il];
                // What a store of `ty` centers on: the calibration's means where the codec
                // rotates (always for SpectralQuant, its basis fitted to centered rows), K's
                // channel weights (InnerQ) where it centers, except SpectralQuant's; and its
                // spectra.
                let centering = |ty: CacheType, k: bool| {
                    let codec = ty.codec();
                    let center = |c: &&KvCalibration| {
                        codec.rotates() && (c.center || codec.needs_spectrum())
                    };
                    let mean = calib.filter(center).map(|c| {
                        let k_center = c.k_center.get(il).filter(|m| !m.is_empty());
                        match k_center {
                            Some(m) if k && !codec.needs_spectrum() => m.clone(),
                            _ => (if k { &c.k_mean } else { &c.v_mean })[il].clone(),
                        }
                    });
                    // Channel weights: K's InnerQ weights, and for codecs that rotate small
                    // blocks, K's and V's weights evened out over the blocks.
                    let blocks = codec.mixed_blocks(g.head_dim);
                    let layer = |v: &Vec<Vec<f32>>| v.get(il).filter(|x| !x.is_empty()).cloned();
                    let scale = calib
                        .filter(|c| center(c) && !codec.needs_spectrum())
                        .and_then(|c| {
                            let (weights, var) = if k {
                                (layer(&c.k_scale)?, layer(&c.k_var))
                            } else {
                                let var = layer(&c.v_var).filter(|_| !blocks.is_empty())?;
                                (vec![1.0; var.len()], Some(var))
                            };
                            Some(match var {
                                Some(var) if !blocks.is_empty() => {
                                    balance_blocks(&weights, &var, g.head_dim, &blocks)
                                }
                                _ => weights,
                            })
                        });
                    let spectra = calib
                        .filter(|_| codec.needs_spectrum())
                        .and_then(|c| if k { &c.k_spectra } else { &c.v_spectra }.get(il))
                        .map(|s| s.as_slice());
                    (mean, scale, spectra)
                };
                #[cfg(feature = "cuda")]
                if let candle_core::Device::Cuda(dev) = device
                    && layer_in_device_memory(device, arch, il, tk, tv)
                {
                    super::device::load_kernels(dev, tk, tv, g.head_dim)?;
                    let store = |ty, k| {
                        let (mean, scale, spectra) = centering(ty, k);
                        let shape = (g.n_kv_head, g.head_dim, rows);
                        RowStore::on_gpu(dev, ty, shape, (mean, scale), spectra)
                    };
                    return Ok(LayerCache {
                        k: store(tk, true)?,
                        v: store(tv, false)?,
                        head_dim: g.head_dim,
                        sliding_window: g.sliding_window,
                        query_moments: None,
                    });
                }
                #[cfg(not(feature = "cuda"))]
                let _ = device;
                let store = |ty: CacheType, k: bool| {
                    let (mean, scale, spectra) = centering(ty, k);
                    RowStore::new(ty, g.n_kv_head, g.head_dim, rows, mean, spectra).scaled(scale)
                };
                Ok(LayerCache {
                    k: store(tk, true),
                    v: store(tv, false),
                    head_dim: g.head_dim,
                    sliding_window: g.sliding_window,
                    query_moments: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            n_ctx,
            len: 0,
        })
    }

    pub fn k_bytes(&self) -> usize {
        self.layers.iter().map(|l| l.k.bytes()).sum()
    }

    pub fn v_bytes(&self) -> usize {
        self.layers.iter().map(|l| l.v.bytes()).sum()
    }

    /// Forgets positions from `len` on (prefix reuse keeps the rest).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// How many stored positions `truncate` may drop and still leave a consistent cache: a
    /// sliding-window ring that is no larger than its window has already overwritten rows the
    /// earlier positions need, so it can only be extended or emptied.
    pub fn max_rewind(&self) -> usize {
        self.layers
            .iter()
            .filter_map(|l| {
                let cap = l.k.capacity;
                let window = l.sliding_window?;
                (cap < self.n_ctx).then(|| cap.saturating_sub(window))
            })
            .min()
            .unwrap_or(usize::MAX)
    }

    /// One line per cache in llama.cpp's style, for the load report.
    pub fn describe(&self) -> String {
        let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
        let kinds = |f: fn(&LayerCache) -> CacheType| KvPolicy::summary(self.layers.iter().map(f));
        let state: usize = self
            .layers
            .iter()
            .map(|l| l.k.state_bytes() + l.v.state_bytes())
            .sum();
        let state = if state > 0 {
            format!(", + {:.2} MiB of fitted bases", mib(state))
        } else {
            String::new()
        };
        let on_gpu = self.layers.iter().filter(|l| l.k.on_device()).count();
        let place = if on_gpu > 0 {
            format!("; {on_gpu} layers in GPU memory")
        } else {
            String::new()
        };
        format!(
            "kv cache: size = {:.2} MiB ({} cells, {} layers), K ({}): {:.2} MiB, V ({}): {:.2} MiB{state}{place}",
            mib(self.k_bytes() + self.v_bytes()),
            self.n_ctx,
            self.layers.len(),
            kinds(|l| l.k.ty),
            mib(self.k_bytes()),
            kinds(|l| l.v.ty),
            mib(self.v_bytes()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_segments_wrap_and_stay_aligned() {
        let mut s = RowStore::new(CacheType::F16, 2, 8, 4, None, None);
        for p in 0..6 {
            s.write(1, p, &[p as f32; 8]);
        }
        // positions 2..6 live in slots 2,3,0,1 of head 1
        let [(a, na), (b, nb)] = s.segments(1, 2..6);
        assert_eq!((na, nb), (2, 2));
        let mut got = vec![0f32; 4];
        let q = [1f32; 8];
        s.codec(1).dot_rows(8, &q, a, &mut got[..2]);
        s.codec(1).dot_rows(8, &q, b, &mut got[2..]);
        assert_eq!(got, vec![16.0, 24.0, 32.0, 40.0]);
        // an empty range casts like any other run
        let [(e, 0), _] = s.segments(0, 3..3) else {
            panic!()
        };
        s.codec(1).dot_rows(8, &q, e, &mut []);
    }

    /// Turbo rows centered on a mean, with the first positions kept exact: scores read through
    /// `runs` plus the mean's dot equal the exact scores (sinks to rounding, the rest to the
    /// codec's error, which centering keeps small when rows sit near the mean).
    #[test]
    fn centered_turbo_rows_and_sinks_score_like_exact() {
        let hd = 64;
        let mean: Vec<f32> = (0..hd).map(|i| (i as f32 * 0.1).sin() * 3.0).collect();
        let weights: Vec<f32> = (0..hd).map(|i| 0.8 + (i % 5) as f32 * 0.1).collect();
        // Plain centering, then with channel weights (scores and read-back must not change).
        for scale in [None, Some(weights)] {
            let mut s =
                RowStore::new(CacheType::Turbo4, 1, hd, 16, Some(mean.clone()), None).scaled(scale);
            let rows: Vec<Vec<f32>> = (0..12)
                .map(|p| {
                    (0..hd)
                        .map(|i| mean[i] + 0.3 * ((p * 7 + i * 3) as f32 * 0.37).cos())
                        .collect()
                })
                .collect();
            for (p, r) in rows.iter().enumerate() {
                s.write(0, p, r);
            }
            let q: Vec<f32> = (0..hd).map(|i| (i as f32 * 0.21).cos()).collect();
            let mut qr = vec![0f32; hd];
            s.prepare_query(0, &q, &mut qr);
            let bias: f32 = q.iter().zip(&mean).map(|(a, b)| a * b).sum();
            let mut got = Vec::new();
            for (codec, bytes, n) in s.runs(0, 0..12) {
                let mut out = vec![0f32; n];
                codec.dot_rows(hd, &qr, bytes, &mut out);
                got.extend(out.iter().map(|x| x + bias));
            }
            assert_eq!(s.runs(0, 0..12).len(), 2);
            for (p, (g, r)) in got.iter().zip(&rows).enumerate() {
                let want: f32 = q.iter().zip(r).map(|(a, b)| a * b).sum();
                let tol = if p < SINK_ROWS { 2e-2 } else { 0.3 };
                assert!((g - want).abs() < tol, "position {p}: {g} vs {want}");
            }
            // Reading back undoes rotation, weights and centering: sinks to f16 rounding, the
            // rest to the codec.
            let mut p = 0;
            s.read_rows(0, 0..12, |got| {
                let err = got
                    .iter()
                    .zip(&rows[p])
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    err < if p < SINK_ROWS { 1e-2 } else { 0.3 },
                    "row {p}: max error {err}"
                );
                p += 1;
            });
            assert_eq!(p, 12);
        }
    }

    /// Keys whose energy sits in channels the queries barely use: the calibration's channel
    /// weights move turbo3's error there, and the score error drops.
    #[test]
    fn channel_weights_cut_score_error_where_queries_and_keys_disagree() {
        let hd = 64;
        let n = 200;
        let wave = |a: usize, b: usize| ((a * 31 + b * 17) as f32 * 0.713).sin();
        // keys: large in the upper half; queries: large in the lower half
        let key = |p: usize| -> Vec<f32> {
            (0..hd)
                .map(|i| wave(p, i) * if i >= hd / 2 { 4.0 } else { 0.5 })
                .collect()
        };
        let query = |j: usize| -> Vec<f32> {
            (0..hd)
                .map(|i| wave(j + 1000, i) * if i < hd / 2 { 4.0 } else { 0.5 })
                .collect()
        };
        let (q2, k2) = energies(n, &key, &query);
        let weights = crate::kv::calibration::channel_scales(&q2, &k2);
        let error = |scale| score_error(CacheType::Turbo3, n, &key, &query, scale);
        let (plain, weighted) = (error(None), error(Some(weights)));
        assert!(
            weighted < 0.5 * plain,
            "score error with channel weights {weighted} vs without {plain}"
        );
    }

    /// A V store with channel weights gives back the weighted sum of its values, weights and
    /// mean undone by `finish_values`.
    #[test]
    fn v_weights_come_out_of_the_weighted_sum() {
        let (hd, n) = (64, 24);
        let value = |p: usize| -> Vec<f32> {
            (0..hd)
                .map(|i| ((p * 7 + i * 3) as f32 * 0.37).sin() * if i < 8 { 6.0 } else { 0.5 })
                .collect()
        };
        let mean = vec![0.3f32; hd];
        let weights: Vec<f32> = (0..hd).map(|i| if i < 8 { 0.25 } else { 1.5 }).collect();
        let p: Vec<f32> = (0..n).map(|j| 1.0 / (1 + j) as f32).collect();
        let mut want = vec![0f32; hd];
        for (j, pj) in p.iter().enumerate() {
            axpy_f32(*pj, &value(j), &mut want);
        }
        for scale in [None, Some(weights)] {
            let mut s = RowStore::new(CacheType::Iso4, 1, hd, n, Some(mean.clone()), None)
                .scaled(scale.clone());
            for j in 0..n {
                s.write(0, j, &value(j));
            }
            let mut acc = vec![0f32; hd];
            let mut first = 0;
            for (codec, bytes, m) in s.runs(0, 0..n) {
                codec.axpy_rows(hd, &p[first..first + m], bytes, &mut acc);
                first += m;
            }
            s.finish_values(0, &mut acc, p.iter().sum());
            let err = acc
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).powi(2))
                .sum::<f32>();
            let norm = want.iter().map(|b| b * b).sum::<f32>();
            assert!(
                err < 0.05 * norm,
                "weights {scale:?}: error {err} of {norm}"
            );
        }
    }

    /// Per channel, E q² and E k² over the first `n` queries and keys.
    fn energies(
        n: usize,
        key: &dyn Fn(usize) -> Vec<f32>,
        query: &dyn Fn(usize) -> Vec<f32>,
    ) -> (Vec<f64>, Vec<f64>) {
        let hd = key(0).len();
        let (mut q2, mut k2) = (vec![0f64; hd], vec![0f64; hd]);
        for p in 0..n {
            for (i, (k, q)) in key(p).iter().zip(query(p)).enumerate() {
                k2[i] += (*k as f64).powi(2) / n as f64;
                q2[i] += (q as f64).powi(2) / n as f64;
            }
        }
        (q2, k2)
    }

    /// Σ over 8 queries and `n` keys of the squared error of the scores a one-head store of `ty`
    /// (centered on zero, K weights `scale`) gives against the exact `<q, k>`.
    fn score_error(
        ty: CacheType,
        n: usize,
        key: &dyn Fn(usize) -> Vec<f32>,
        query: &dyn Fn(usize) -> Vec<f32>,
        scale: Option<Vec<f32>>,
    ) -> f64 {
        let hd = key(0).len();
        let zero = vec![0f32; hd];
        let mut s = RowStore::new(ty, 1, hd, n, Some(zero), None).scaled(scale);
        for p in 0..n {
            s.write(0, p, &key(p));
        }
        let mut total = 0f64;
        for j in 0..8 {
            let q = query(j);
            let mut qr = vec![0f32; hd];
            s.prepare_query(0, &q, &mut qr);
            let mut first = 0;
            for (codec, bytes, m) in s.runs(0, 0..n) {
                let mut out = vec![0f32; m];
                codec.dot_rows(hd, &qr, bytes, &mut out);
                for (r, got) in out.iter().enumerate() {
                    let want: f32 = q.iter().zip(key(first + r)).map(|(a, b)| a * b).sum();
                    total += ((got - want) as f64).powi(2);
                }
                first += m;
            }
        }
        total
    }
}

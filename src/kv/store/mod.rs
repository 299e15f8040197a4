//! Per-sequence, per-layer storage, allocated once for the whole context.

use anyhow::{Result, bail};

use super::calibration::{KvCalibration, LayerRows, QueryMoments, balance_blocks};
use super::{CacheType, KvPolicy};
use crate::arch::ModelArchitecture;

mod rows;

pub use rows::RowStore;

/// Positions that rotation-codec stores keep at f16 precision (in the codec's domain): the
/// attention sinks at the start of a sequence, which every later query attends to heavily.
pub const SINK_ROWS: usize = 4;
#[cfg(feature = "cuda")]
const _: () = assert!(
    SINK_ROWS <= super::device::MAX_SINK,
    "GPU stores keep these sink rows too"
);

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

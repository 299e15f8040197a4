//! Per-sequence, per-layer storage, allocated once for the whole context.

use anyhow::{Result, bail};

use super::{CacheType, KvCodec, KvPolicy};
use crate::model::arch::ModelArchitecture;

/// One of K or V for one layer: `n_kv_head` rings of `capacity` rows, head-major so a head's
/// rows are contiguous for the decode scan.
pub struct RowStore {
    pub ty: CacheType,
    pub codec: Box<dyn KvCodec>,
    pub row_bytes: usize,
    pub capacity: usize,
    pub n_kv_head: usize,
    // u64 words keep f32/f16 rows aligned for zero-copy casts.
    data: Vec<u64>,
}

impl RowStore {
    fn new(ty: CacheType, n_kv_head: usize, head_dim: usize, capacity: usize) -> Self {
        let codec = ty.codec();
        let row_bytes = codec.bytes_per_row(head_dim);
        let bytes = n_kv_head * capacity * row_bytes;
        Self {
            ty,
            codec,
            row_bytes,
            capacity,
            n_kv_head,
            data: vec![0u64; bytes.div_ceil(8)],
        }
    }

    /// Bytes the rows occupy (the theoretical size; the allocation rounds up to 8 bytes at most).
    pub fn bytes(&self) -> usize {
        self.n_kv_head * self.capacity * self.row_bytes
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

    pub fn write(&mut self, head: usize, pos: usize, values: &[f32]) {
        let slot = pos % self.capacity;
        let start = (head * self.capacity + slot) * self.row_bytes;
        let rb = self.row_bytes;
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut self.data);
        self.codec
            .quantize_row(values, &mut bytes[start..start + rb]);
    }
}

pub struct LayerCache {
    pub k: RowStore,
    pub v: RowStore,
    pub head_dim: usize,
    pub sliding_window: Option<usize>,
}

/// The KV cache of one sequence: every layer, sized for `n_ctx` tokens.
pub struct KvCache {
    pub layers: Vec<LayerCache>,
    pub n_ctx: usize,
    /// Tokens whose K/V are stored (the next position to write).
    pub len: usize,
}

impl KvCache {
    pub fn new(arch: &ModelArchitecture, policy: &KvPolicy, n_ctx: usize) -> Result<Self> {
        if policy.layers.len() != arch.n_layer {
            bail!(
                "KV policy covers {} layers, model has {}",
                policy.layers.len(),
                arch.n_layer
            );
        }
        for (il, g) in arch.layers.iter().enumerate() {
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
                let rows = arch.kv_rows(il, n_ctx);
                let (tk, tv) = policy.layers[il];
                LayerCache {
                    k: RowStore::new(tk, g.n_kv_head, g.head_dim, rows),
                    v: RowStore::new(tv, g.n_kv_head, g.head_dim, rows),
                    head_dim: g.head_dim,
                    sliding_window: g.sliding_window,
                }
            })
            .collect();
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

    /// One line per cache in llama.cpp's style, for the load report.
    pub fn describe(&self) -> String {
        let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
        let kinds = |f: fn(&LayerCache) -> CacheType| KvPolicy::summary(self.layers.iter().map(f));
        format!(
            "kv cache: size = {:.2} MiB ({} cells, {} layers), K ({}): {:.2} MiB, V ({}): {:.2} MiB",
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
        let mut s = RowStore::new(CacheType::F16, 2, 8, 4);
        for p in 0..6 {
            s.write(1, p, &[p as f32; 8]);
        }
        // positions 2..6 live in slots 2,3,0,1 of head 1
        let [(a, na), (b, nb)] = s.segments(1, 2..6);
        assert_eq!((na, nb), (2, 2));
        let mut got = vec![0f32; 4];
        let q = [1f32; 8];
        s.codec.dot_rows(8, &q, a, &mut got[..2]);
        s.codec.dot_rows(8, &q, b, &mut got[2..]);
        assert_eq!(got, vec![16.0, 24.0, 32.0, 40.0]);
        // an empty range casts like any other run
        let [(e, 0), _] = s.segments(0, 3..3) else {
            panic!()
        };
        s.codec.dot_rows(8, &q, e, &mut []);
    }
}

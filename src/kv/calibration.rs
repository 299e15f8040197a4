//! Per-layer, per-KV-head mean of K and V, measured once at load on a short built-in text.
//!
//! Keys of real models share a large common component (a per-channel offset that RoPE leaves
//! in its slow pairs). Rotation codecs spend their bits on the whole vector, so they store
//! `k − μ` instead, and attention adds it back exactly: `<q, k̂> = <q, μ> + <q, (k − μ)^>`, and
//! for values `Σ p v̂ = (Σ p) μ_v + Σ p (v − μ_v)^`. On SmolLM2 this halves turbo K's error
//! (docs/QUALITY.md). The row layout is unchanged; μ is n_kv_head × head_dim floats per layer.

use super::store::KvCache;

/// Original prose (written for this project) that the model reads to measure its K/V means.
pub const CALIBRATION_TEXT: &str = "The harbour town woke slowly on the morning of the fair. \
Fishermen hauled their nets onto the quay while the baker's children carried trays of bread \
up the hill to the square, where merchants were already arguing over the best places for their \
stalls. A schoolteacher had promised her class a lesson on the old lighthouse, which had guided \
ships past the northern rocks for nearly two hundred years before an automatic beacon replaced \
its keeper. The children wanted to know why the light turned, how far it could be seen, and \
whether the keeper had been lonely in winter. She explained that a lens of glass prisms bent the \
light into a narrow beam, that on a clear night sailors could see it from thirty kilometres \
away, and that the keeper's diary, kept in the town museum, described storms, shipwrecks and \
long evenings spent repairing clocks. In the afternoon the council met to discuss the budget. \
The new bridge would cost more than expected because the river bed was softer than the \
engineers had measured, and the library needed a roof before the autumn rains. One councillor \
proposed a small tax on visitors; another argued that visitors already paid for parking and \
would simply stop coming. They agreed to ask the engineers for a second estimate and to \
publish the accounts online, so that residents could see where the money went. By evening \
the square was full of music. A string quartet played in front of the church, a man sold \
roasted chestnuts from a cart, and the smell of grilled fish drifted up from the harbour. \
Table 3 lists the results: 42 stalls, 1,250 visitors, and receipts of 18,400 euros, up 12% \
on the previous year. def total(items): return sum(item.price for item in items) \
Somewhere a dog barked, a door closed, and the first stars appeared over the sea.";

/// K and V means per layer, each `n_kv_head × head_dim` values.
#[derive(Debug, Clone, PartialEq)]
pub struct KvCalibration {
    pub tokens: usize,
    pub k_mean: Vec<Vec<f32>>,
    pub v_mean: Vec<Vec<f32>>,
}

impl KvCalibration {
    /// Means over the positions stored in `cache` (an f32 cache that has read the calibration
    /// text), leaving out position 0: the first token is an attention sink whose K/V are unlike
    /// the rest. Sliding-window layers use the rows they still hold.
    pub fn from_cache(cache: &KvCache) -> Self {
        let n = cache.len;
        let mut k_mean = Vec::new();
        let mut v_mean = Vec::new();
        for layer in &cache.layers {
            let hd = layer.head_dim;
            let lo = layer
                .sliding_window
                .map_or(1, |w| n.saturating_sub(w).max(1));
            for (store, out) in [(&layer.k, &mut k_mean), (&layer.v, &mut v_mean)] {
                let mut mean = vec![0f32; store.n_kv_head * hd];
                // Shared-KV layers store nothing: their mean stays zero and unused.
                if store.capacity == 0 {
                    out.push(mean);
                    continue;
                }
                for (h, m) in mean.chunks_exact_mut(hd).enumerate() {
                    let mut count = 0usize;
                    store.read_rows(h, lo.min(n)..n, |row| {
                        for (a, b) in m.iter_mut().zip(row) {
                            *a += b;
                        }
                        count += 1;
                    });
                    for a in m.iter_mut() {
                        *a /= count.max(1) as f32;
                    }
                }
                out.push(mean);
            }
        }
        Self {
            tokens: n,
            k_mean,
            v_mean,
        }
    }
}

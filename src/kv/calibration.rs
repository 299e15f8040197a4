//! Per-layer, per-KV-head mean of K and V, measured once at load on a short built-in text.
//!
//! Keys of real models share a large common component (a per-channel offset that RoPE leaves
//! in its slow pairs). Rotation codecs spend their bits on the whole vector, so they store
//! `k − μ` instead, and attention adds it back exactly: `<q, k̂> = <q, μ> + <q, (k − μ)^>`, and
//! for values `Σ p v̂ = (Σ p) μ_v + Σ p (v − μ_v)^`. On SmolLM2 this halves turbo K's error
//! (docs/QUALITY.md). The row layout is unchanged; μ is n_kv_head × head_dim floats per layer.
//!
//! SpectralQuant also needs each head's covariance spectrum (eigenvalues and eigenvectors of
//! the centered rows' covariance), measured on the same rows when a spectral type is in use.

use std::sync::Arc;

use nalgebra::DMatrix;

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

/// One head's covariance spectrum: eigenvalues in descending order and the matching unit
/// eigenvectors as the rows of `vt` [head_dim, head_dim] (an orthogonal matrix).
#[derive(Debug, Clone, PartialEq)]
pub struct Spectrum {
    pub eigenvalues: Vec<f32>,
    pub vt: Arc<Vec<f32>>,
}

impl Spectrum {
    /// Eigen-decomposition of a symmetric `cov` [d, d].
    pub fn of_covariance(d: usize, cov: &[f64]) -> Self {
        let eig = DMatrix::from_row_slice(d, d, cov).symmetric_eigen();
        let mut order: Vec<usize> = (0..d).collect();
        order.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]));
        let eigenvalues = order
            .iter()
            .map(|&j| eig.eigenvalues[j].max(0.0) as f32)
            .collect();
        let mut vt = Vec::with_capacity(d * d);
        for &j in &order {
            vt.extend(eig.eigenvectors.column(j).iter().map(|&x| x as f32));
        }
        Self {
            eigenvalues,
            vt: Arc::new(vt),
        }
    }
}

/// K and V means per layer, each `n_kv_head × head_dim` values, and optionally per-head spectra.
#[derive(Debug, Clone, PartialEq)]
pub struct KvCalibration {
    pub tokens: usize,
    pub k_mean: Vec<Vec<f32>>,
    pub v_mean: Vec<Vec<f32>>,
    /// Per layer, one [`Spectrum`] per KV head (empty for layers that store nothing); empty when
    /// no spectral cache type asked for them.
    pub k_spectra: Vec<Vec<Spectrum>>,
    pub v_spectra: Vec<Vec<Spectrum>>,
    /// Whether rotation codecs center rows on the means (`--no-kv-centering` turns it off;
    /// SpectralQuant always centers, its basis being the centered rows' covariance).
    pub center: bool,
}

impl KvCalibration {
    /// Means (and with `spectra`, covariance spectra) over the positions stored in `cache` (an
    /// f32 cache that has read the calibration text), leaving out position 0: the first token is
    /// an attention sink whose K/V are unlike the rest. Sliding-window layers use the rows they
    /// still hold.
    pub fn from_cache(cache: &KvCache, spectra: bool) -> Self {
        let n = cache.len;
        let mut out = Self {
            tokens: n,
            k_mean: Vec::new(),
            v_mean: Vec::new(),
            k_spectra: Vec::new(),
            v_spectra: Vec::new(),
            center: true,
        };
        for layer in &cache.layers {
            let hd = layer.head_dim;
            let lo = layer
                .sliding_window
                .map_or(1, |w| n.saturating_sub(w).max(1))
                .min(n);
            for (store, means, specs) in [
                (&layer.k, &mut out.k_mean, &mut out.k_spectra),
                (&layer.v, &mut out.v_mean, &mut out.v_spectra),
            ] {
                let mut mean = vec![0f32; store.n_kv_head * hd];
                let mut layer_spectra = Vec::new();
                // Shared-KV layers store nothing: their mean stays zero and unused.
                if store.capacity > 0 {
                    for (h, m) in mean.chunks_exact_mut(hd).enumerate() {
                        let mut rows = Vec::new();
                        store.read_rows(h, lo..n, |row| rows.extend_from_slice(row));
                        let count = (rows.len() / hd).max(1);
                        for row in rows.chunks_exact(hd) {
                            for (a, b) in m.iter_mut().zip(row) {
                                *a += b / count as f32;
                            }
                        }
                        if spectra {
                            layer_spectra.push(Spectrum::of_covariance(hd, &covariance(&rows, m)));
                        }
                    }
                }
                means.push(mean);
                if spectra {
                    specs.push(layer_spectra);
                }
            }
        }
        out
    }
}

/// Covariance [d, d] of `rows` [n, d] around `mean`.
fn covariance(rows: &[f32], mean: &[f32]) -> Vec<f64> {
    let d = mean.len();
    let n = (rows.len() / d).max(1);
    let mut cov = vec![0f64; d * d];
    let mut c = vec![0f64; d];
    for row in rows.chunks_exact(d) {
        for ((c, x), m) in c.iter_mut().zip(row).zip(mean) {
            *c = (x - m) as f64;
        }
        for (i, ci) in c.iter().enumerate() {
            for (o, cj) in cov[i * d..(i + 1) * d].iter_mut().zip(&c).skip(i) {
                *o += ci * cj;
            }
        }
    }
    for i in 0..d {
        for j in i..d {
            let v = cov[i * d + j] / n as f64;
            cov[i * d + j] = v;
            cov[j * d + i] = v;
        }
    }
    cov
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows drawn along known axes with known variances: the spectrum recovers them, and the
    /// eigenvectors are orthonormal.
    #[test]
    fn spectrum_recovers_principal_axes() {
        let d = 8;
        let sd = [3.0f32, 2.0, 1.0, 0.5, 0.25, 0.1, 0.05, 0.01];
        let mut rng = super::super::codec::turbo::SplitMix(7);
        let mut rows = Vec::new();
        for _ in 0..20_000 {
            for s in sd {
                // sum of 12 uniforms − 6: close enough to N(0, 1)
                let g: f64 = (0..12).map(|_| rng.next_f64()).sum::<f64>() - 6.0;
                rows.push(g as f32 * s);
            }
        }
        let mean = vec![0f32; d];
        let sp = Spectrum::of_covariance(d, &covariance(&rows, &mean));
        for (i, (l, s)) in sp.eigenvalues.iter().zip(sd).enumerate() {
            assert!((l / (s * s) - 1.0).abs() < 0.05, "λ{i} = {l} vs {}", s * s);
            let axis = sp.vt[i * d + i].abs();
            assert!(axis > 0.99, "eigenvector {i} not on axis {i}: {axis}");
        }
        for a in 0..d {
            for b in 0..d {
                let dot: f32 = (0..d).map(|c| sp.vt[a * d + c] * sp.vt[b * d + c]).sum();
                let want = if a == b { 1.0 } else { 0.0 };
                assert!((dot - want).abs() < 1e-5);
            }
        }
    }
}

//! Per-layer, per-KV-head mean of K and V, measured once at load on a short built-in text.
//!
//! Keys of real models share a large common component (a per-channel offset that RoPE leaves
//! in its slow pairs). Rotation codecs spend their bits on the whole vector, so they store
//! `k − μ` instead, and attention adds it back exactly: `<q, k̂> = <q, μ> + <q, (k − μ)^>`, and
//! for values `Σ p v̂ = (Σ p) μ_v + Σ p (v − μ_v)^`. On SmolLM2 this halves turbo K's error
//! (docs/QUALITY.md). The row layout is unchanged; μ is n_kv_head × head_dim floats per layer.
//!
//! The same pass measures how much energy queries put in each channel, so K can be stored with
//! channel weights (InnerQ): `s ⊙ (k − μ)` quantized, queries scored as `q ⊘ s`
//! ([`KvCalibration::k_scale`]). Scores are unchanged; the codec's error lands where queries
//! look least. Codecs that rotate small blocks (RotorQuant's family) also get K's weights, and
//! V weights, evened out over their blocks ([`balance_blocks`]): their codebook is scaled by the
//! whole row's norm, and a block louder than the rest would overload it.
//!
//! K's centre and weights are for the whole context the cache serves, not the calibration
//! text's few hundred positions: RoPE turns each channel pair of a key by `θ·p`, so an offset
//! or an uneven split of energy between a pair's two channels measured near position 0 points
//! elsewhere thousands of positions on. The pass turns K rows and queries back to position 0
//! and averages their moments over RoPE's angles at positions `0..n_ctx` in closed form
//! ([`QueryMoments`]). Pairs that turn little keep their offset and their split; pairs that
//! turn a lot lose the offset and share one weight. Keys' positions are weighted as attention
//! reads them while a sequence grows to `n_ctx` (position p for `n_ctx − p` steps), so early
//! positions, which every sequence holds, count most; queries' are weighted evenly.
//!
//! SpectralQuant also needs each head's covariance spectrum (eigenvalues and eigenvectors of
//! the centered rows' covariance), measured on the same rows when a spectral type is in use.

mod file;
mod phase;
mod spectrum;

pub use crate::kv::codec::spectrum::Spectrum;
pub use file::fingerprint;
pub use phase::{PairMoments, QueryMoments};
use spectrum::covariance;

use std::ops::Range;

use anyhow::Result;

use crate::arch::Rope;
use crate::arch::{LayerGeometry, ModelArchitecture};

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
    /// Per layer, K's channel weights `n_kv_head × head_dim` (empty when not measured): a
    /// codec's error on a key costs `q·δ` in its score, so storing `s ⊙ (k − μ)` and scoring
    /// with `q ⊘ s` moves the error to the channels queries weigh least. With the codec's error
    /// isotropic and proportional to ‖s ⊙ k‖², the expected squared score error
    /// `Σ q_c²/s_c² · Σ s_c² k_c²` is least at `s_c = (E q_c² / E k_c²)^¼` (InnerQ's idea).
    pub k_scale: Vec<Vec<f32>>,
    /// Per layer, the K centre rotation codecs store rows around, `n_kv_head × head_dim`: the
    /// mean K has over the served context (see the module notes), where `k_mean` is the mean
    /// over the calibration text's positions (SpectralQuant's, whose basis was fitted there).
    /// Empty when not measured (read from a file): `k_mean` serves.
    pub k_center: Vec<Vec<f32>>,
    /// Per layer, K's variance per channel around `k_center` over the served context,
    /// `n_kv_head × head_dim` (empty when not measured): what [`balance_blocks`] evens out.
    pub k_var: Vec<Vec<f32>>,
    /// Per layer, V's variance per channel around `v_mean`, `n_kv_head × head_dim` (empty when
    /// not measured).
    pub v_var: Vec<Vec<f32>>,
    /// Per layer, how much a codec's error in K moves attention scores: with channel weights, a
    /// codec of relative distortion D adds score noise of about `√D · k_noise` logits
    /// (`Σ_c √(E q_c² · Var k_c) / d` with the 1/√d attention scale, mean over KV heads; 0 where
    /// not measured).
    pub k_noise: Vec<f32>,
    /// Per layer, the moments `k_center`, `k_scale` and `k_var` are computed from for a context
    /// ([`serve`](Self::serve)); `None` where the layer stores nothing.
    pub moments: Vec<Option<PairMoments>>,
}

/// One layer's rows from the calibration pass, as [`KvCalibration::measure`] reads them: K's and
/// V's values [n_kv_head, positions, head_dim] at positions `first..` (`None` where the layer
/// stores nothing: shared-KV layers), and the queries' moments where the pass kept them.
pub struct LayerRows<'a> {
    pub head_dim: usize,
    pub n_kv_head: usize,
    pub first: usize,
    pub k: Option<Vec<f32>>,
    pub v: Option<Vec<f32>>,
    pub query_moments: Option<&'a QueryMoments>,
}

/// Channel weights are kept within this factor of 1, so a channel the calibration text barely
/// used is not starved.
const MAX_CHANNEL_SCALE: f32 = 8.0;

/// `s_c = (q2_c / k2_c)^¼` normalized to a geometric mean of 1, clamped to
/// [1/MAX_CHANNEL_SCALE, MAX_CHANNEL_SCALE].
pub(crate) fn channel_scales(q2: &[f64], k2: &[f64]) -> Vec<f32> {
    let logs: Vec<f64> = q2
        .iter()
        .zip(k2)
        .map(|(q, k)| 0.25 * (q.max(1e-12) / k.max(1e-12)).ln())
        .collect();
    let mid = logs.iter().sum::<f64>() / logs.len().max(1) as f64;
    let cap = MAX_CHANNEL_SCALE.ln() as f64;
    logs.iter()
        .map(|l| (l - mid).clamp(-cap, cap).exp() as f32)
        .collect()
}

/// `scale` [n_kv_head, head_dim] rebalanced for a codec that rotates each of `blocks` (channel
/// ranges of a row) on its own: such a codec scales one codebook by the row's norm, so a block
/// holding more than its share of the weighted row's energy overloads it while a WHT would
/// have spread that energy over the group. Each block's weights are multiplied by one factor
/// that gives every block the same energy per value, `Σ_b s_c² Var k_c / |b|`; within a block
/// the weights keep their ratios (where the block's rotation makes the error isotropic, those
/// are still the best ratios). Normalized and clamped as [`channel_scales`].
pub(crate) fn balance_blocks(
    scale: &[f32],
    var: &[f32],
    head_dim: usize,
    blocks: &[Range<usize>],
) -> Vec<f32> {
    let mut logs: Vec<f64> = scale.iter().map(|&s| (s as f64).ln()).collect();
    for (lh, vh) in logs
        .chunks_exact_mut(head_dim)
        .zip(var.chunks_exact(head_dim))
    {
        for b in blocks {
            let energy = b
                .clone()
                .map(|c| (2.0 * lh[c]).exp() * (vh[c] as f64).max(1e-12))
                .sum::<f64>()
                / b.len() as f64;
            for l in &mut lh[b.clone()] {
                *l -= 0.5 * energy.ln();
            }
        }
    }
    let cap = MAX_CHANNEL_SCALE.ln() as f64;
    logs.chunks_exact(head_dim)
        .flat_map(|lh| {
            let mid = lh.iter().sum::<f64>() / head_dim as f64;
            lh.iter()
                .map(move |l| (l - mid).clamp(-cap, cap).exp() as f32)
        })
        .collect()
}

impl KvCalibration {
    /// A calibration over `tokens` positions with nothing measured yet (rows centered).
    fn empty(tokens: usize) -> Self {
        Self {
            tokens,
            k_mean: Vec::new(),
            v_mean: Vec::new(),
            k_spectra: Vec::new(),
            v_spectra: Vec::new(),
            center: true,
            k_scale: Vec::new(),
            k_center: Vec::new(),
            k_var: Vec::new(),
            v_var: Vec::new(),
            k_noise: Vec::new(),
            moments: Vec::new(),
        }
    }

    /// Means (and with `spectra`, covariance spectra) over `tokens` positions of the calibration
    /// text, from each layer's rows as the pass stored them ([`LayerRows`], in layer order;
    /// `kv::store::KvCache::calibration` reads them). Where the pass kept [`QueryMoments`], K's
    /// and the queries' pair moments are kept for [`serve`](Self::serve).
    pub fn measure<'a>(
        tokens: usize,
        layers: impl Iterator<Item = Result<LayerRows<'a>>>,
        spectra: bool,
    ) -> Result<Self> {
        let mut out = Self::empty(tokens);
        for layer in layers {
            let layer = layer?;
            let hd = layer.head_dim;
            let (mut moments, mut v_var) = (None, Vec::new());
            for (k, rows, means, specs) in [
                (true, &layer.k, &mut out.k_mean, &mut out.k_spectra),
                (false, &layer.v, &mut out.v_mean, &mut out.v_spectra),
            ] {
                let mut mean = vec![0f32; layer.n_kv_head * hd];
                let mut layer_spectra = Vec::new();
                // Shared-KV layers store nothing: their mean stays zero and unused.
                if let Some(all) = rows {
                    let per_head = all.len() / layer.n_kv_head;
                    for (h, m) in mean.chunks_exact_mut(hd).enumerate() {
                        let rows = &all[h * per_head..(h + 1) * per_head];
                        let count = (rows.len() / hd).max(1);
                        for row in rows.chunks_exact(hd) {
                            for (a, b) in m.iter_mut().zip(row) {
                                *a += b / count as f32;
                            }
                        }
                        if spectra {
                            layer_spectra.push(Spectrum::of_covariance(hd, &covariance(rows, m)));
                        }
                        if !k {
                            v_var.extend((0..hd).map(|c| {
                                let dev = rows.chunks_exact(hd).map(|r| (r[c] - m[c]).powi(2));
                                dev.sum::<f32>() / count as f32
                            }));
                        }
                    }
                    if let Some(qm) = layer.query_moments.filter(|_| k) {
                        moments = Some(qm.pair_moments(all, layer.first));
                    }
                }
                means.push(mean);
                if spectra {
                    specs.push(layer_spectra);
                }
            }
            out.moments.push(moments);
            out.v_var.push(v_var);
        }
        Ok(out)
    }

    /// Fills K's centre, channel weights and variance for a cache serving positions
    /// `0..horizon` from the kept moments.
    pub fn serve(&mut self, arch: &ModelArchitecture, horizon: usize) {
        [self.k_center, self.k_scale, self.k_var] = Default::default();
        self.k_noise.clear();
        for (il, m) in self.moments.iter().enumerate() {
            let ([c, s, v], noise) = m
                .as_ref()
                .map(|m| m.centering(&Rope::for_layer(arch, il), horizon))
                .unwrap_or_default();
            self.k_center.push(c);
            self.k_scale.push(s);
            self.k_var.push(v);
            self.k_noise.push(noise);
        }
    }
}

impl KvCalibration {
    /// Whether K's centre over a context can be computed ([`serve`](Self::serve)): the file
    /// kept the moments of some layer.
    pub fn has_moments(&self) -> bool {
        self.moments.iter().any(Option::is_some)
    }

    /// Whether every layer's means, moments, variances and bases have `arch`'s shapes (a file
    /// from other weights that happened to share the fingerprint would not).
    pub fn fits(&self, arch: &ModelArchitecture) -> bool {
        let per_layer = |v: usize| v == arch.n_layer;
        if !per_layer(self.k_mean.len())
            || !per_layer(self.v_mean.len())
            || !per_layer(self.moments.len())
            || !per_layer(self.v_var.len())
        {
            return false;
        }
        let spectra_fit = |specs: &Vec<Vec<Spectrum>>, il: usize, g: &LayerGeometry| {
            specs.get(il).is_none_or(|s| {
                s.is_empty()
                    || (s.len() == g.n_kv_head
                        && s.iter().all(|x| {
                            x.eigenvalues.len() == g.head_dim
                                && x.vt.len() == g.head_dim * g.head_dim
                        }))
            })
        };
        arch.layers.iter().enumerate().all(|(il, g)| {
            let n = g.n_kv_head * g.head_dim;
            let pairs = n / 2;
            self.k_mean[il].len() == n
                && self.v_mean[il].len() == n
                && [0, n].contains(&self.v_var[il].len())
                && self.moments[il]
                    .as_ref()
                    .is_none_or(|m| m.k.len() == pairs && [0, pairs].contains(&m.q.len()))
                && spectra_fit(&self.k_spectra, il, g)
                && spectra_fit(&self.v_spectra, il, g)
        })
    }

    /// Whether SpectralQuant's per-head bases were measured.
    pub fn has_spectra(&self) -> bool {
        self.k_spectra
            .iter()
            .chain(&self.v_spectra)
            .any(|s| !s.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::phase::{mean_phase, read_phase};
    use super::*;

    #[test]
    fn saved_calibration_reads_back_and_refuses_another_model() {
        let d = 4;
        let spec = |k: f32| Spectrum {
            eigenvalues: vec![4.0 * k, 3.0, 2.0, 1.0],
            vt: Arc::new(
                (0..d * d)
                    .map(|i| (i % (d + 1) == 0) as u8 as f32)
                    .collect(),
            ),
        };
        let calib = KvCalibration {
            tokens: 99,
            k_mean: vec![vec![0.5; 2 * d], vec![]],
            v_mean: vec![vec![-0.5; 2 * d], vec![]],
            k_spectra: vec![vec![spec(1.0), spec(2.0)], vec![]],
            v_spectra: vec![vec![spec(3.0), spec(4.0)], vec![]],
            center: true,
            k_scale: Vec::new(),
            k_center: Vec::new(),
            k_var: Vec::new(),
            v_var: vec![vec![0.25; 2 * d], vec![]],
            k_noise: Vec::new(),
            moments: vec![
                Some(PairMoments {
                    k: (0..d).map(|i| [i as f64, 1.0, 2.0, 3.0, 1e-9]).collect(),
                    q: (0..d).map(|i| [i as f64 + 0.1, 2.0, -0.3]).collect(),
                }),
                None,
            ],
        };
        let dir = std::env::temp_dir().join(format!("dh-calib-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.kv-calibration.safetensors");
        calib.save(&path, "m.gguf:123").unwrap();
        let back = KvCalibration::load(&path, "m.gguf:123").unwrap().unwrap();
        assert_eq!(back, calib);
        assert!(KvCalibration::load(&path, "m.gguf:124").unwrap().is_none());
        std::fs::write(&path, b"not safetensors").unwrap();
        assert!(KvCalibration::load(&path, "m.gguf:123").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Evened weights give every block the same energy per value and keep the ratios within a
    /// block.
    #[test]
    fn balanced_blocks_hold_equal_energy() {
        let (hd, blocks) = (8, [0..4, 4..8]);
        let scale = [1.0f32, 2.0, 1.0, 1.0, 1.0, 1.0, 0.5, 1.0];
        let var = [9.0f32, 1.0, 1.0, 1.0, 0.1, 0.2, 0.1, 0.1];
        let s = balance_blocks(&scale, &var, hd, &blocks);
        let energy = |b: &Range<usize>| b.clone().map(|c| s[c] * s[c] * var[c]).sum::<f32>();
        let (e0, e1) = (energy(&blocks[0]), energy(&blocks[1]));
        assert!((e0 / e1 - 1.0).abs() < 1e-4, "{e0} vs {e1}");
        assert!((s[1] / s[0] - 2.0).abs() < 1e-5 && (s[6] / s[4] - 0.5).abs() < 1e-5);
    }

    /// `Σ weight(p) · (cos ωp, sin ωp)` over p = 0..n, summed one position at a time.
    fn brute_phase(omega: f64, n: usize, weight: impl Fn(usize) -> f64) -> (f64, f64) {
        (0..n).fold((0.0, 0.0), |(c, s), p| {
            let (sin, cos) = (omega * p as f64).sin_cos();
            (c + weight(p) * cos, s + weight(p) * sin)
        })
    }

    #[test]
    fn read_phase_weighs_each_position_by_the_steps_it_is_read() {
        for (omega, n) in [
            (0.0, 100),
            (1.0, 1),
            (1.0, 7),
            (0.3, 1000),
            (2e-5, 65536),
            (1e-3, 4096),
        ] {
            let (c, s) = read_phase(omega, n);
            let w = (n * (n + 1) / 2) as f64;
            let (bc, bs) = brute_phase(omega, n, |p| (n - p) as f64 / w);
            assert!(
                (c - bc).abs() < 1e-7 && (s - bs).abs() < 1e-7,
                "ω {omega} n {n}: {c} {s} vs {bc} {bs}"
            );
        }
    }

    #[test]
    fn mean_phase_is_the_mean_over_positions() {
        for (omega, n) in [(0.0, 100), (1.0, 1), (1.0, 7), (0.3, 1000), (2e-5, 65536)] {
            let (c, s) = mean_phase(omega, n);
            let (bc, bs) = brute_phase(omega, n, |_| 1.0 / n as f64);
            assert!(
                (c - bc).abs() < 1e-9 && (s - bs).abs() < 1e-9,
                "ω {omega} n {n}"
            );
        }
    }

    /// Keys with a fixed offset before RoPE, read at positions 1..257. Pair 0 turns a radian per
    /// position, pair 1 0.1 rad over those positions and 26 rad over 64K, pairs 2 and 3 hardly
    /// at all. Over the positions read, the centre is the rows' own mean; over 64K pair 1 loses
    /// its offset as pair 0 did, pairs 2 and 3 keep theirs, and pair 1's weights (queries put
    /// 16× the energy there) drop and come out equal on its two channels. The score noise
    /// follows the variances.
    #[test]
    fn k_centre_and_weights_follow_rope_over_the_context() {
        use crate::arch::RopeStyle;
        let hd = 8;
        let rope = Rope::new(3.9e13, hd, 1.0, RopeStyle::Interleaved, false);
        let mut rng = super::super::codec::turbo::SplitMix(3);
        let offset = [3.0f32, 1.0, 2.0, -1.5, 1.0, 0.0, 2.0, -1.0];
        let (pos0, n) = (1, 256);
        let mut keys = Vec::new();
        for j in 0..n {
            let mut k: Vec<f32> = offset
                .iter()
                .map(|o| o + (rng.next_f64() as f32 - 0.5))
                .collect();
            rope.apply(&mut k, pos0 + j, 1);
            keys.extend(k);
        }
        let mut qm = QueryMoments::new(rope.clone(), 1);
        let mut q = vec![0f32; n * hd];
        for (i, x) in q.iter_mut().enumerate() {
            let loud = matches!(i % hd, 2 | 3);
            *x = if loud { 4.0 } else { 1.0 } * (rng.next_f64() as f32 - 0.5);
        }
        qm.add(&q, 1);

        let moments = qm.pair_moments(&keys, pos0);
        let ([near, near_scale, near_var], near_noise) = moments.centering(&rope, pos0 + n);
        let mut mean = vec![0f32; hd];
        for row in keys.chunks_exact(hd) {
            for (m, x) in mean.iter_mut().zip(row) {
                *m += x / n as f32;
            }
        }
        for (c, m) in near.iter().zip(&mean) {
            assert!(
                (c - m).abs() < 0.05 * (1.0 + m.abs()),
                "{near:?} vs {mean:?}"
            );
        }
        assert!(
            near[2] > 1.8 && near_scale[2] > 1.5 * near_scale[6],
            "{near_scale:?}"
        );

        // Score noise Σ √(E q² · Var k) / d, queries putting 16/12 on channels 2 and 3 and 1/12
        // elsewhere.
        let q2 = |c: usize| {
            if matches!(c, 2 | 3) {
                16.0 / 12.0
            } else {
                1.0 / 12.0
            }
        };
        let want = (0..hd).map(|c| (q2(c) * near_var[c]).sqrt()).sum::<f32>() / hd as f32;
        assert!(
            (near_noise / want - 1.0).abs() < 0.1,
            "{near_noise} vs {want}"
        );

        let ([far, scale, _], far_noise) = moments.centering(&rope, 65536);
        // Far out the turning pairs' offsets become variance, so their keys move scores more.
        assert!(far_noise > 1.5 * near_noise, "{far_noise} vs {near_noise}");
        for c in 0..4 {
            assert!(far[c].abs() < 0.15, "channel {c}: {far:?}");
        }
        for c in 4..8 {
            assert!((far[c] - offset[c]).abs() < 0.05, "channel {c}: {far:?}");
        }
        assert!(
            scale[2] < near_scale[2] && (scale[2] / scale[3] - 1.0).abs() < 0.05,
            "{scale:?}"
        );
    }

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

//! RoPE-phase moments: keys and queries turned back to position 0, and their second moments
//! averaged over the angles RoPE gives a pair at the positions a context serves.

use crate::arch::Rope;

use super::*;

/// Queries' second moments per (KV head, RoPE pair), turned back to position 0, and the layer's
/// rotation: what K's centre and channel weights over a whole context are computed from. Kept
/// by the calibration pass only.
#[derive(Debug, Clone)]
pub struct QueryMoments {
    rope: Rope,
    n_kv_head: usize,
    /// Per (KV head, pair): Σ a², Σ b², Σ ab of the un-rotated queries.
    sums: Vec<[f64; 3]>,
    /// Queries per KV head so far.
    count: usize,
}

/// A pair `(a, b)` at position `p` turned back by RoPE's angle `freq·p` (computed as the model
/// computes it, in f32).
fn unrotate(a: f32, b: f32, freq: f32, p: usize) -> (f64, f64) {
    let (sin, cos) = ((p as f32 * freq) as f64).sin_cos();
    let (a, b) = (a as f64, b as f64);
    (a * cos + b * sin, b * cos - a * sin)
}

/// Means of cos(ωp) and sin(ωp) over the positions p = 0..n, in closed form:
/// Σ e^{iωp} = e^{iω(n−1)/2} · sin(nω/2) / sin(ω/2).
pub(super) fn mean_phase(omega: f64, n: usize) -> (f64, f64) {
    let half = 0.5 * omega;
    if n <= 1 || half.sin().abs() < 1e-12 {
        return (1.0, 0.0);
    }
    let amp = (n as f64 * half).sin() / (n as f64 * half.sin());
    let phase = half * (n - 1) as f64;
    (amp * phase.cos(), amp * phase.sin())
}

/// Means of cos(ωp) and sin(ωp) over the positions p = 0..n as attention reads them while a
/// sequence grows to n tokens: position p is in the cache for n − p of the n steps, so it is
/// weighted by n − p. In closed form, with z = e^{iω}:
/// Σ (n − p) z^p = (n − z(1 − zⁿ)/(1 − z)) / (1 − z), over the weights' sum n(n + 1)/2.
pub(super) fn read_phase(omega: f64, n: usize) -> (f64, f64) {
    if n <= 1 {
        return (1.0, 0.0);
    }
    let nf = n as f64;
    if (omega * nf).abs() < 1e-4 {
        // Too little turn for the closed form's differences: the phase at the mean position.
        let (s, c) = (omega * (nf - 1.0) / 3.0).sin_cos();
        return (c, s);
    }
    let mul = |(a, b): (f64, f64), (c, d): (f64, f64)| (a * c - b * d, a * d + b * c);
    let div = |x: (f64, f64), (c, d): (f64, f64)| {
        let m = c * c + d * d;
        mul(x, (c / m, -d / m))
    };
    let z = (omega.cos(), omega.sin());
    let zn = ((omega * nf).cos(), (omega * nf).sin());
    let one_minus_z = (1.0 - z.0, -z.1);
    let geo = div(mul(z, (1.0 - zn.0, -zn.1)), one_minus_z);
    let sum = div((nf - geo.0, -geo.1), one_minus_z);
    let w = nf * (nf + 1.0) / 2.0;
    (sum.0 / w, sum.1 / w)
}

/// E y_a², E y_b² of a pair whose un-rotated moments are `m` = (E a², E b², E ab), RoPE-turned
/// by `freq·p` with `phase` the positions' mean of (cos, sin) at an angle per position.
fn turned_energy(
    m: [f64; 3],
    freq: f32,
    horizon: usize,
    phase: fn(f64, usize) -> (f64, f64),
) -> [f64; 2] {
    let (c2, s2) = phase(2.0 * freq as f64, horizon);
    let (t, d) = ((m[0] + m[1]) / 2.0, (m[0] - m[1]) / 2.0);
    [t + d * c2 - m[2] * s2, t - d * c2 + m[2] * s2]
}

impl QueryMoments {
    pub fn new(rope: Rope, n_kv_head: usize) -> Self {
        let pairs = rope.inv_freq().len();
        Self {
            rope,
            n_kv_head,
            sums: vec![[0.0; 3]; n_kv_head * pairs],
            count: 0,
        }
    }

    /// Adds queries `q` [t, n_head, head_dim] at positions `pos..pos + t`, already rotated (the
    /// host attention's input).
    pub fn add_rotated(&mut self, q: &[f32], pos: usize, n_head: usize) {
        self.accumulate(q, n_head, Some(pos));
    }

    /// Adds queries `q` [t, n_head, head_dim] before RoPE (the GPU attention's input).
    pub fn add(&mut self, q: &[f32], n_head: usize) {
        self.accumulate(q, n_head, None);
    }

    fn accumulate(&mut self, q: &[f32], n_head: usize, pos: Option<usize>) {
        let freqs = self.rope.inv_freq();
        let pairs = freqs.len();
        let hd = 2 * pairs;
        let group = n_head / self.n_kv_head;
        for (r, qh) in q.chunks_exact(hd).enumerate() {
            let kvh = (r % n_head) / group;
            for (i, &f) in freqs.iter().enumerate() {
                let (a, b) = self.rope.pair(i);
                let (x, y) = match pos {
                    Some(p) => unrotate(qh[a], qh[b], f, p + r / n_head),
                    None => (qh[a] as f64, qh[b] as f64),
                };
                let s = &mut self.sums[kvh * pairs + i];
                s[0] += x * x;
                s[1] += y * y;
                s[2] += x * y;
            }
        }
        self.count += q.len() / (hd * self.n_kv_head);
    }

    /// The RoPE-pair moments of the layer's K rows `k_rows` [n_kv_head, n, head_dim], stored at
    /// positions `pos0..pos0 + n`, beside the queries' so far.
    pub(super) fn pair_moments(&self, k_rows: &[f32], pos0: usize) -> PairMoments {
        let freqs = self.rope.inv_freq();
        let pairs = freqs.len();
        let hd = 2 * pairs;
        let per_head = k_rows.len() / self.n_kv_head;
        let n = (per_head / hd).max(1) as f64;
        let mut k = Vec::with_capacity(self.n_kv_head * pairs);
        for rows in k_rows.chunks_exact(per_head.max(1)) {
            // Per pair: Σ a, Σ b, Σ a², Σ b², Σ ab of the un-rotated rows.
            let mut sums = vec![[0f64; 5]; pairs];
            for (j, row) in rows.chunks_exact(hd).enumerate() {
                for ((i, s), &f) in sums.iter_mut().enumerate().zip(freqs) {
                    let (a, b) = self.rope.pair(i);
                    let (x, y) = unrotate(row[a], row[b], f, pos0 + j);
                    for (acc, v) in s.iter_mut().zip([x, y, x * x, y * y, x * y]) {
                        *acc += v;
                    }
                }
            }
            k.extend(sums.iter().map(|s| s.map(|x| x / n)));
        }
        let q = if self.count > 0 {
            let count = self.count as f64;
            self.sums.iter().map(|s| s.map(|x| x / count)).collect()
        } else {
            Vec::new()
        };
        PairMoments { k, q }
    }
}

/// One layer's K and query moments per (KV head, RoPE pair), turned back to position 0: what K's
/// centre, channel weights and variance over a context of any length are computed from. They
/// are what the calibration file keeps, so one file serves every `-c`.
#[derive(Debug, Clone, PartialEq)]
pub struct PairMoments {
    /// E a, E b, E a², E b², E ab of the un-rotated K rows.
    pub k: Vec<[f64; 5]>,
    /// E a², E b², E ab of the un-rotated queries; empty when no query was seen.
    pub q: Vec<[f64; 3]>,
}

impl PairMoments {
    /// K's centre, channel weights and variance per channel for positions `0..horizon`, each
    /// `n_kv_head × head_dim`: the centre is the rows' mean as RoPE carries it over the context
    /// (positions weighted as they are read, [`read_phase`]), the weights (empty without
    /// queries) `(E q² / Var k)^¼` per channel over the same positions. Last, the score noise
    /// per unit of codec distortion, mean over the heads ([`KvCalibration::k_noise`]).
    pub(super) fn centering(&self, rope: &Rope, horizon: usize) -> ([Vec<f32>; 3], f32) {
        let freqs = rope.inv_freq();
        let pairs = freqs.len();
        let hd = 2 * pairs;
        let n_kv_head = self.k.len() / pairs.max(1);
        let mut centre = vec![0f32; n_kv_head * hd];
        let (mut scale, mut var, mut noise) = (Vec::new(), Vec::new(), 0f64);
        for h in 0..n_kv_head {
            let (mut k2, mut q2) = (vec![0f64; hd], vec![0f64; hd]);
            for (i, &f) in freqs.iter().enumerate() {
                let (a, b) = rope.pair(i);
                let m = self.k[h * pairs + i];
                let (c1, s1) = read_phase(f as f64, horizon);
                let (ca, cb) = (c1 * m[0] - s1 * m[1], s1 * m[0] + c1 * m[1]);
                centre[h * hd + a] = ca as f32;
                centre[h * hd + b] = cb as f32;
                let [ea, eb] = turned_energy([m[2], m[3], m[4]], f, horizon, read_phase);
                (k2[a], k2[b]) = (ea - ca * ca, eb - cb * cb);
                if let Some(&qm) = self.q.get(h * pairs + i) {
                    [q2[a], q2[b]] = turned_energy(qm, f, horizon, mean_phase);
                }
            }
            if !self.q.is_empty() {
                scale.extend(channel_scales(&q2, &k2));
                let sum: f64 = q2
                    .iter()
                    .zip(&k2)
                    .map(|(q, k)| (q * k.max(0.0)).sqrt())
                    .sum();
                noise += sum / hd as f64 / n_kv_head as f64;
            }
            var.extend(k2.iter().map(|&v| v as f32));
        }
        ([centre, scale, var], noise as f32)
    }
}

//! Lloyd–Max scalar codebooks for the coordinates of a rotated unit vector.
//!
//! After a random orthogonal rotation, each coordinate of a unit vector in d dimensions is close
//! to N(0, 1/d); the MSE-optimal scalar quantizer for that law is the Lloyd–Max fixed point:
//! every centroid is the conditional mean of its cell, every boundary the midpoint of its two
//! centroids. Both conditions have closed forms for a Gaussian, so the iteration is exact.

use std::sync::OnceLock;

/// Centroids (ascending) and the decision boundaries between them.
#[derive(Debug, Clone, PartialEq)]
pub struct Codebook {
    pub centroids: Vec<f32>,
    /// `mids[k]` separates centroid k from k + 1; a value's index is the number of mids ≤ it.
    pub mids: Vec<f32>,
}

impl Codebook {
    fn from_centroids(centroids: Vec<f32>) -> Self {
        let mids = centroids.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        Self { centroids, mids }
    }

    /// Index of the centroid nearest to `x` (ties go up, as the fork's `x < mid` chains do).
    #[inline]
    pub fn index(&self, x: f32) -> u8 {
        self.mids.partition_point(|&m| m <= x) as u8
    }
}

fn std_normal_pdf(x: f64) -> f64 {
    (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt()
}

fn std_normal_cdf(x: f64) -> f64 {
    0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)
}

/// Lloyd–Max codebook with `2^bits` levels for N(0, 1/d).
pub fn gaussian(d: usize, bits: u32) -> Codebook {
    let levels = 1usize << bits;
    let sigma = 1.0 / (d as f64).sqrt();
    // Start from equal-probability cells; the fixed point is unique for a log-concave density.
    let mut c: Vec<f64> = (0..levels)
        .map(|k| {
            let p = (k as f64 + 0.5) / levels as f64;
            inverse_cdf(p)
        })
        .collect();
    for _ in 0..10_000 {
        let mut bounds = vec![f64::NEG_INFINITY];
        bounds.extend(c.windows(2).map(|w| (w[0] + w[1]) / 2.0));
        bounds.push(f64::INFINITY);
        let mut delta = 0f64;
        for (k, ck) in c.iter_mut().enumerate() {
            let (a, b) = (bounds[k], bounds[k + 1]);
            let mass = std_normal_cdf(b) - std_normal_cdf(a);
            let next = (std_normal_pdf(a) - std_normal_pdf(b)) / mass;
            delta = delta.max((next - *ck).abs());
            *ck = next;
        }
        if delta < 1e-12 {
            break;
        }
    }
    Codebook::from_centroids(c.iter().map(|&x| (x * sigma) as f32).collect())
}

/// Standard normal quantile by bisection (only used to seed the iteration).
fn inverse_cdf(p: f64) -> f64 {
    let (mut lo, mut hi) = (-10.0, 10.0);
    for _ in 0..100 {
        let mid = (lo + hi) / 2.0;
        if std_normal_cdf(mid) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    (lo + hi) / 2.0
}

/// The TurboQuant fork's hard-coded tables for 128-wide groups (`ggml-cuda/turbo-quant.cuh`):
/// centroids and the midpoints its quantizer compares against, kept verbatim so our indices
/// equal its indices. Its 2- and 3-bit tables are close to [`gaussian`]`(128, b)`; its 4-bit
/// table is narrower than the Gaussian optimum (outermost 0.174 vs 0.242).
pub fn fork_128(bits: u32) -> Codebook {
    let (c, m): (&[f32], &[f32]) = match bits {
        2 => (
            &[-0.133462, -0.039994, 0.039994, 0.133462],
            &[-0.086728, 0.0, 0.086728],
        ),
        3 => (
            &[
                -0.190685, -0.117832, -0.065717, -0.021460, 0.021460, 0.065717, 0.117832, 0.190685,
            ],
            &[
                -0.154259, -0.091775, -0.043589, 0.0, 0.043589, 0.091775, 0.154259,
            ],
        ),
        4 => (
            &[
                -0.173926, -0.117195, -0.089527, -0.068756, -0.051262, -0.035597, -0.020989,
                -0.006938, 0.006938, 0.020989, 0.035597, 0.051262, 0.068756, 0.089527, 0.117195,
                0.173926,
            ],
            &[
                -0.145561, -0.103361, -0.079142, -0.060009, -0.043430, -0.028293, -0.013964, 0.0,
                0.013964, 0.028293, 0.043430, 0.060009, 0.079142, 0.103361, 0.145561,
            ],
        ),
        _ => unreachable!("turbo codecs use 2, 3 or 4 bits"),
    };
    Codebook {
        centroids: c.to_vec(),
        mids: m.to_vec(),
    }
}

/// The codebook a turbo codec uses for groups of `d` values. At d = 128 the fork's 2- and 3-bit
/// tables (Lloyd–Max up to rounding) so stored indices match the fork's; everything else,
/// including 4 bits at d = 128, the Gaussian Lloyd–Max: the fork's 4-bit table has twice the
/// MSE on rotated unit vectors (0.018 vs 0.009 relative, `turbo4` tests).
pub fn turbo(d: usize, bits: u32) -> &'static Codebook {
    static CACHE: OnceLock<Vec<((usize, u32), Codebook)>> = OnceLock::new();
    let all = CACHE.get_or_init(|| {
        let mut v = Vec::new();
        for bits in 2..=4 {
            let at_128 = if bits < 4 {
                fork_128(bits)
            } else {
                gaussian(128, bits)
            };
            v.push(((128, bits), at_128));
            v.push(((64, bits), gaussian(64, bits)));
        }
        v
    });
    &all.iter()
        .find(|(key, _)| *key == (d, bits))
        .unwrap_or_else(|| panic!("no turbo codebook for groups of {d} at {bits} bits"))
        .1
}

/// Widest codebook [`normal`] serves: 128 levels (at 256 the iteration below stops short of the
/// fixed point).
pub const MAX_BITS: u32 = 7;

/// Lloyd–Max codebook for N(0, 1) with `2^bits` levels, `bits` in 1..=[`MAX_BITS`], built once.
pub fn normal(bits: u32) -> &'static Codebook {
    static CACHE: OnceLock<Vec<Codebook>> = OnceLock::new();
    let all = CACHE.get_or_init(|| (1..=MAX_BITS).map(|b| gaussian(1, b)).collect());
    &all[bits as usize - 1]
}

/// Mean squared error of [`normal`]`(bits)` on N(0, 1); 1 at 0 bits (everything reads as 0).
/// At a Lloyd–Max fixed point every centroid is its cell's mean, so D = 1 − Σ_k P(cell k)·c_k².
pub fn normal_mse(bits: u32) -> f64 {
    static CACHE: OnceLock<Vec<f64>> = OnceLock::new();
    let all = CACHE.get_or_init(|| {
        (0..=MAX_BITS)
            .map(|b| {
                if b == 0 {
                    return 1.0;
                }
                let cb = normal(b);
                let mut bounds = vec![f64::NEG_INFINITY];
                bounds.extend(cb.mids.iter().map(|&m| m as f64));
                bounds.push(f64::INFINITY);
                let energy: f64 = cb
                    .centroids
                    .iter()
                    .enumerate()
                    .map(|(k, &c)| {
                        let mass = std_normal_cdf(bounds[k + 1]) - std_normal_cdf(bounds[k]);
                        mass * (c as f64).powi(2)
                    })
                    .sum();
                1.0 - energy
            })
            .collect()
    });
    all[bits as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The classic Lloyd–Max table for N(0, 1), 8 levels (Max 1960): ±0.2451, 0.7560, 1.3439, 2.1519.
    #[test]
    fn solver_reproduces_max_1960() {
        let cb = gaussian(1, 3);
        let want = [0.2451, 0.7560, 1.3439, 2.1519];
        for (c, w) in cb.centroids[4..].iter().zip(want) {
            assert!((c - w).abs() < 2e-4, "{c} vs {w}");
        }
        assert_eq!(cb.centroids.len(), 8);
    }

    /// The fork's 2- and 3-bit tables are the N(0, 1/128) Lloyd–Max solution to within 1.2e-3
    /// (they were rounded from a slightly different law); its 4-bit table is not (see `fork_128`).
    #[test]
    fn fork_tables_against_solver() {
        for (bits, tol) in [(2, 1e-4), (3, 1.2e-3)] {
            let ours = gaussian(128, bits);
            let fork = fork_128(bits);
            let err = ours
                .centroids
                .iter()
                .zip(&fork.centroids)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err < tol, "{bits}-bit: max |Δ| {err}");
        }
        let ours = gaussian(128, 4);
        assert!((ours.centroids[15] - 0.2415).abs() < 1e-3);
        assert!((fork_128(4).centroids[15] - 0.173926).abs() < 1e-6);
    }

    /// Max (1960) and later tables: N(0, 1) Lloyd–Max MSE 0.3634 (1 bit), 0.1175 (2), 0.03454 (3),
    /// 0.009497 (4); each extra bit divides the error by about four.
    #[test]
    fn normal_mse_matches_published_values() {
        for (bits, want) in [
            (0, 1.0),
            (1, 0.3634),
            (2, 0.1175),
            (3, 0.03454),
            (4, 0.009497),
        ] {
            let got = normal_mse(bits);
            assert!(
                (got - want).abs() / want < 2e-3,
                "{bits} bits: {got} vs {want}"
            );
        }
        for b in 4..MAX_BITS {
            let ratio = normal_mse(b) / normal_mse(b + 1);
            assert!((3.3..4.2).contains(&ratio), "{b}→{}: {ratio}", b + 1);
        }
    }

    #[test]
    fn index_follows_midpoints() {
        let cb = turbo(128, 3);
        assert_eq!(cb.index(-1.0), 0);
        assert_eq!(cb.index(0.0), 4);
        assert_eq!(cb.index(-1e-9), 3);
        assert_eq!(cb.index(0.16), 7);
        let cb64 = turbo(64, 4);
        assert_eq!(cb64.centroids.len(), 16);
        assert_eq!(cb64.mids.len(), 15);
    }
}

//! Per-head covariance spectra (SpectralQuant's bases).

use std::sync::Arc;

use nalgebra::DMatrix;

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

/// Covariance [d, d] of `rows` [n, d] around `mean`.
pub(super) fn covariance(rows: &[f32], mean: &[f32]) -> Vec<f64> {
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

//! A head's covariance spectrum: what SpectralQuant fits its basis and bit allocation to
//! (measured by `kv::calibration`).

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

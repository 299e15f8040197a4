//! Covariance of a head's centered rows, whose spectrum SpectralQuant fits to.

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

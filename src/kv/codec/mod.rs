//! One codec per file behind [`KvCodec`]: how a K or V row is stored and read back.

pub mod f16;
pub mod f32;
pub mod lloyd_max;
pub mod q4_0;
pub mod q8_0;
pub mod turbo;
pub mod turbo2;
pub mod turbo3;
pub mod turbo4;
pub mod wht;

/// Stores one head's row (`head_dim` values) in `bytes_per_row` bytes and computes attention on it.
///
/// Rotation codecs work in their own domain: [`KvCodec::prepare_query`] maps a query into it once
/// per head, `dot`/`axpy` stay there, and [`KvCodec::finish_output`] maps the accumulated V back.
pub trait KvCodec: Send + Sync {
    /// Values per block; a head_dim must be a multiple of it.
    fn block_size(&self) -> usize {
        1
    }
    fn bytes_per_row(&self, head_dim: usize) -> usize;
    fn quantize_row(&self, src: &[f32], dst: &mut [u8]);
    fn dequantize_row(&self, src: &[u8], dst: &mut [f32]);
    /// `q` already passed through `prepare_query`.
    fn dot(&self, q: &[f32], row: &[u8]) -> f32;
    /// `acc += w * row`, in the codec's domain.
    fn axpy(&self, w: f32, row: &[u8], acc: &mut [f32]);
    /// `out[i] = dot(q, row i)` for consecutive rows; codecs override this with their SIMD loop.
    fn dot_rows(&self, q: &[f32], rows: &[u8], out: &mut [f32]) {
        let rb = self.bytes_per_row(q.len());
        for (o, row) in out.iter_mut().zip(rows.chunks_exact(rb)) {
            *o = self.dot(q, row);
        }
    }
    /// `acc += Σ w[i] · row i` for consecutive rows.
    fn axpy_rows(&self, w: &[f32], rows: &[u8], acc: &mut [f32]) {
        let rb = self.bytes_per_row(acc.len());
        for (&wi, row) in w.iter().zip(rows.chunks_exact(rb)) {
            self.axpy(wi, row, acc);
        }
    }
    fn prepare_query(&self, q: &[f32], out: &mut [f32]) {
        out.copy_from_slice(q);
    }
    fn finish_output(&self, _acc: &mut [f32]) {}
}

/// Plain f32 dot product, written so LLVM vectorizes it (8 independent accumulators).
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let chunks = n / 8;
    for c in 0..chunks {
        for i in 0..8 {
            acc[i] += a[c * 8 + i] * b[c * 8 + i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..n {
        s += a[i] * b[i];
    }
    s
}

#[inline]
pub fn axpy_f32(w: f32, x: &[f32], acc: &mut [f32]) {
    for (a, x) in acc.iter_mut().zip(x) {
        *a += w * x;
    }
}

#[cfg(test)]
pub(crate) mod test_vectors {
    /// 64 values shared by the ggml compatibility tests: sin(0.7·i)·3 + (i mod 5)·0.1.
    pub fn ggml_test_row() -> Vec<f32> {
        (0..64)
            .map(|i| ((i as f64 * 0.7).sin() * 3.0 + (i % 5) as f64 * 0.1) as f32)
            .collect()
    }

    pub fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
}

//! One codec per file behind [`KvCodec`]: how a K or V row is stored and read back.

pub mod f16;
pub mod f32;
pub mod isa;
pub mod iso;
pub mod lloyd_max;
pub mod planar;
pub mod q4_0;
pub mod q8_0;
pub mod rotor;
pub mod spectral;
pub mod spectrum;
pub mod turbo;
pub mod turbo2;
pub mod turbo3;
pub mod turbo4;
#[cfg(target_arch = "x86_64")]
pub mod turbo4_avx2;
pub mod wht;

use spectrum::Spectrum;

/// Widest head the stores take (Gemma's global layers use 512).
pub const MAX_HEAD_DIM: usize = 512;

/// Stores one head's row (`head_dim` values) in `bytes_per_row` bytes and computes attention on it.
///
/// Rotation codecs work in their own domain: [`KvCodec::prepare_query`] maps a query into it once
/// per head, rows are decoded into that domain, and [`KvCodec::finish_output`] maps the
/// accumulated V back. Attention reads rows only through the fused [`KvCodec::dot_rows`] /
/// [`KvCodec::axpy_rows`], which decode each row once into an L1-sized tile and use it for every
/// query of a GQA group (or prefill block): the cache is never dequantized as a whole.
pub trait KvCodec: Send + Sync {
    /// Values per block; a head_dim must be a multiple of it.
    fn block_size(&self) -> usize {
        1
    }
    fn bytes_per_row(&self, head_dim: usize) -> usize;
    /// Rows live in a rotated domain quantized against a codebook: such stores center rows on
    /// calibrated means and keep the first positions at f16 (`kv::calibration`).
    fn rotates(&self) -> bool {
        false
    }
    /// The channel ranges of a row that one rotation block mixes, for codecs whose rotation
    /// turns small blocks rather than the whole group (RotorQuant's family); empty otherwise.
    fn mixed_blocks(&self, _head_dim: usize) -> Vec<std::ops::Range<usize>> {
        Vec::new()
    }
    /// The codec a centered store runs for this type, where it differs: plain TurboQuant rows
    /// keep the fork's quantizer, centered turbo3/turbo4 rows (already off the fork's rows)
    /// index each group at its best scale (`turbo::best_scale`). `None` where nothing changes.
    fn for_centered_rows(&self) -> Option<Box<dyn KvCodec>> {
        None
    }
    /// Whether the quantizer searches each group's scale (the GPU kernels must then search too).
    fn searches_scale(&self) -> bool {
        false
    }
    /// Bits per code where rows are codes into `lloyd_max::turbo`'s codebook of the rotation
    /// group's width (the TurboQuant layouts, whatever their rotation); `None` otherwise.
    fn codebook_bits(&self) -> Option<u32> {
        None
    }
    /// Codecs that store a turbo layout under a rotation of small blocks: what the GPU kernels
    /// need to run them as that layout; `None` otherwise.
    fn block_rotation(&self) -> Option<turbo::BlockRotation> {
        None
    }
    /// Codecs fitted to each head's statistics (SpectralQuant) need its covariance spectrum
    /// from calibration; they always center rows.
    fn needs_spectrum(&self) -> bool {
        false
    }
    /// This codec fitted to one head's spectrum; `None` for codecs that store every head alike.
    fn fit(&self, _spectrum: &Spectrum) -> Option<Box<dyn KvCodec>> {
        None
    }
    /// Expected slope of a decoded value against the true one, E[x̂·x] / E[x²]: below 1 for
    /// codes rescaled to their row's length (turbo's norm correction keeps ‖x̂‖ = ‖x‖ while a
    /// Lloyd–Max code correlates with its value only as √(1 − D) of it, D the codebook's
    /// relative error), 1 where rounding is unbiased. Attention divides the scores and V sums
    /// it reads through the codec by it, so that `<q, k̂>` and `Σ w·v̂` are unbiased.
    fn shrink(&self) -> f32 {
        1.0
    }
    /// Codecs with a per-head basis (SpectralQuant): the basis and tables the GPU kernels read
    /// for a head of `head_dim` values; `None` otherwise.
    fn head_basis(&self, _head_dim: usize) -> Option<spectral::HeadBasis> {
        None
    }
    /// Bytes of per-head state beside the rows (a fitted basis); 0 for most codecs.
    fn state_bytes(&self) -> usize {
        0
    }
    fn quantize_row(&self, src: &[f32], dst: &mut [u8]);
    /// Back to the original domain (inverse rotation included).
    fn dequantize_row(&self, src: &[u8], dst: &mut [f32]);
    /// Consecutive rows into `out` [n, head_dim], in the attention domain (rotated, for rotation
    /// codecs). Codecs override this with their SIMD decoder.
    fn decode_rows(&self, head_dim: usize, rows: &[u8], out: &mut [f32]) {
        let rb = self.bytes_per_row(head_dim);
        for (row, o) in rows.chunks_exact(rb).zip(out.chunks_exact_mut(head_dim)) {
            self.dequantize_row(row, o);
        }
    }
    fn prepare_query(&self, q: &[f32], out: &mut [f32]) {
        out.copy_from_slice(q);
    }
    fn finish_output(&self, _acc: &mut [f32]) {}

    /// `scores[i·n + j] = <qs[i], row j>` for queries `qs` [m, head_dim] (already through
    /// `prepare_query`) and `n` consecutive rows.
    fn dot_rows(&self, head_dim: usize, qs: &[f32], rows: &[u8], scores: &mut [f32]) {
        tiled_dot_rows(self, head_dim, qs, rows, scores);
    }

    /// `acc[i] += Σ_j w[i·n + j] · row j`, in the codec's domain, for `m` accumulators
    /// `acc` [m, head_dim] and `n` consecutive rows.
    fn axpy_rows(&self, head_dim: usize, w: &[f32], rows: &[u8], acc: &mut [f32]) {
        tiled_axpy_rows(self, head_dim, w, rows, acc);
    }

    /// One query, one row: `dot_rows` for a single pair (tests and the codecs report).
    fn dot(&self, q: &[f32], row: &[u8]) -> f32 {
        let mut s = [0f32];
        self.dot_rows(q.len(), q, row, &mut s);
        s[0]
    }

    fn axpy(&self, w: f32, row: &[u8], acc: &mut [f32]) {
        self.axpy_rows(acc.len(), &[w], row, acc);
    }
}

/// [`KvCodec::dot_rows`] through [`KvCodec::decode_rows`]: a tile of rows decoded to f32, then
/// dotted with every query.
pub fn tiled_dot_rows<C: KvCodec + ?Sized>(
    codec: &C,
    head_dim: usize,
    qs: &[f32],
    rows: &[u8],
    scores: &mut [f32],
) {
    let n = rows.len() / codec.bytes_per_row(head_dim);
    for_each_tile(codec, head_dim, rows, |col, tile| {
        tile_scores(head_dim, qs, tile, scores, n, col);
    });
}

/// [`KvCodec::axpy_rows`] through [`KvCodec::decode_rows`], a tile at a time.
pub fn tiled_axpy_rows<C: KvCodec + ?Sized>(
    codec: &C,
    head_dim: usize,
    w: &[f32],
    rows: &[u8],
    acc: &mut [f32],
) {
    let n = rows.len() / codec.bytes_per_row(head_dim);
    for_each_tile(codec, head_dim, rows, |col, tile| {
        let nt = tile.len() / head_dim;
        for (i, a) in acc.chunks_exact_mut(head_dim).enumerate() {
            tile_axpy(&w[i * n + col..][..nt], tile, a);
        }
    });
}

/// Rows decoded per tile in the fused paths: 32 rows of 128 f32 are 16 KiB, inside L1.
pub const TILE: usize = 32;

/// Decodes `rows` a tile at a time and hands each tile [nt, head_dim] to `f` with the index of
/// its first row.
fn for_each_tile<C: KvCodec + ?Sized>(
    codec: &C,
    head_dim: usize,
    rows: &[u8],
    mut f: impl FnMut(usize, &[f32]),
) {
    let rb = codec.bytes_per_row(head_dim);
    let mut tile = vec![0f32; TILE * head_dim];
    for (t, chunk) in rows.chunks(TILE * rb).enumerate() {
        let tile = &mut tile[..chunk.len() / rb * head_dim];
        codec.decode_rows(head_dim, chunk, tile);
        f(t * TILE, tile);
    }
}

/// `scores[i·n + col + j] = <qs[i], tile row j>`: four queries per pass over a row, so each
/// decoded value is loaded once for four FMAs.
fn tile_scores(d: usize, qs: &[f32], tile: &[f32], scores: &mut [f32], n: usize, col: usize) {
    let m = qs.len() / d;
    let mut i = 0;
    #[cfg(target_arch = "x86_64")]
    if simd::available() && d.is_multiple_of(8) {
        while i + 4 <= m {
            for (j, k) in tile.chunks_exact(d).enumerate() {
                // SAFETY: AVX2+FMA present; four query rows of d values start at i·d.
                let s4 = unsafe { simd::dot4(&qs[i * d..(i + 4) * d], k) };
                for (r, v) in s4.into_iter().enumerate() {
                    scores[(i + r) * n + col + j] = v;
                }
            }
            i += 4;
        }
        for i in i..m {
            let q = &qs[i * d..(i + 1) * d];
            for (j, k) in tile.chunks_exact(d).enumerate() {
                // SAFETY: AVX2+FMA present; q and k hold d values.
                scores[i * n + col + j] = unsafe { simd::dot1(q, k) };
            }
        }
        return;
    }
    for i in i..m {
        let q = &qs[i * d..(i + 1) * d];
        for (j, k) in tile.chunks_exact(d).enumerate() {
            scores[i * n + col + j] = dot_f32(q, k);
        }
    }
}

/// `acc += Σ_j w[j] · tile row j`, with `acc` held in registers across the rows.
fn tile_axpy(w: &[f32], tile: &[f32], acc: &mut [f32]) {
    let d = acc.len();
    #[cfg(target_arch = "x86_64")]
    if simd::available() && d.is_multiple_of(32) {
        // SAFETY: AVX2+FMA present; tile holds w.len() rows of d values.
        unsafe { simd::axpy_tile(w, tile, acc) };
        return;
    }
    for (&wj, v) in w.iter().zip(tile.chunks_exact(d)) {
        if wj != 0.0 {
            axpy_f32(wj, v, acc);
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod simd {
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        super::isa::isa() >= super::isa::Isa::Avx2
    }

    /// The sum of a vector's eight lanes.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Dots of four consecutive query rows `qs` [4, d] with `k` [d]; d a multiple of 8.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot4(qs: &[f32], k: &[f32]) -> [f32; 4] {
        let d = k.len();
        let (q, kp) = (qs.as_ptr(), k.as_ptr());
        let mut a = [_mm256_setzero_ps(); 4];
        let mut c = 0;
        // SAFETY: c + 8 <= d for every load; qs holds 4·d values.
        unsafe {
            while c < d {
                let kv = _mm256_loadu_ps(kp.add(c));
                for (r, ar) in a.iter_mut().enumerate() {
                    *ar = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(r * d + c)), kv, *ar);
                }
                c += 8;
            }
        }
        [hsum(a[0]), hsum(a[1]), hsum(a[2]), hsum(a[3])]
    }

    /// `<q, k>` for d a multiple of 8.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot1(q: &[f32], k: &[f32]) -> f32 {
        let d = k.len();
        let (qp, kp) = (q.as_ptr(), k.as_ptr());
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut c = 0;
        // SAFETY: c + 8 <= d for every load.
        unsafe {
            while c + 16 <= d {
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(c)), _mm256_loadu_ps(kp.add(c)), a0);
                a1 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(qp.add(c + 8)),
                    _mm256_loadu_ps(kp.add(c + 8)),
                    a1,
                );
                c += 16;
            }
            if c < d {
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(c)), _mm256_loadu_ps(kp.add(c)), a0);
            }
        }
        hsum(_mm256_add_ps(a0, a1))
    }

    /// `acc += Σ_j w[j] · rows[j]`, 32 lanes of `acc` in registers at a time; d a multiple of 32.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy_tile(w: &[f32], rows: &[f32], acc: &mut [f32]) {
        let d = acc.len();
        let (rp, ap) = (rows.as_ptr(), acc.as_mut_ptr());
        // SAFETY: c + 32 <= d; row j spans j·d..(j+1)·d of rows.
        unsafe {
            for c in (0..d).step_by(32) {
                let mut a = [
                    _mm256_loadu_ps(ap.add(c)),
                    _mm256_loadu_ps(ap.add(c + 8)),
                    _mm256_loadu_ps(ap.add(c + 16)),
                    _mm256_loadu_ps(ap.add(c + 24)),
                ];
                for (j, &wj) in w.iter().enumerate() {
                    if wj == 0.0 {
                        continue;
                    }
                    let wv = _mm256_set1_ps(wj);
                    let r = rp.add(j * d + c);
                    for (l, al) in a.iter_mut().enumerate() {
                        *al = _mm256_fmadd_ps(wv, _mm256_loadu_ps(r.add(8 * l)), *al);
                    }
                }
                for (l, al) in a.iter().enumerate() {
                    _mm256_storeu_ps(ap.add(c + 8 * l), *al);
                }
            }
        }
    }
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

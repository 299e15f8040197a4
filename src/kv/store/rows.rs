//! One of K or V for one layer: the rings of rows, their centering (mean, channel weights, sink
//! rows) and how attention reads them back.

use anyhow::Result;

use super::sink_count;
use crate::kv::codec::f16::F16Codec;
use crate::kv::codec::spectrum::Spectrum;
use crate::kv::codec::{MAX_HEAD_DIM, axpy_f32};
use crate::kv::{CacheType, KvCodec};

static SINK_CODEC: F16Codec = F16Codec;

/// One of K or V for one layer: `n_kv_head` rings of `capacity` rows, head-major so a head's
/// rows are contiguous for the decode scan.
pub struct RowStore {
    pub ty: CacheType,
    /// One codec per KV head: the same for most types, fitted per head for SpectralQuant.
    codecs: Vec<Box<dyn KvCodec>>,
    pub row_bytes: usize,
    pub capacity: usize,
    pub n_kv_head: usize,
    /// Per-head mean subtracted before quantizing (rotation codecs; see `calibration`),
    /// `n_kv_head × head_dim` values.
    pub mean: Option<Vec<f32>>,
    /// Per-head, per-channel weights the centered rows are multiplied by before quantizing
    /// (`n_kv_head × head_dim`; K only, see `calibration`): queries are divided by them, so
    /// scores are unchanged while the codec's error moves to the channels queries weigh least.
    pub scale: Option<Vec<f32>>,
    /// Leading positions kept in `sink_rows` instead of the ring ([`SINK_ROWS`] or 0).
    pub sink: usize,
    sink_rows: Vec<half::f16>,
    head_dim: usize,
    // u64 words keep f32/f16 rows aligned for zero-copy casts.
    data: Vec<u64>,
    /// The rows in GPU memory instead of `data` (`kv::device`).
    #[cfg(feature = "cuda")]
    pub gpu: Option<crate::kv::device::DeviceRows>,
}

impl RowStore {
    pub(super) fn new(
        ty: CacheType,
        n_kv_head: usize,
        head_dim: usize,
        capacity: usize,
        mean: Option<Vec<f32>>,
        spectra: Option<&[Spectrum]>,
    ) -> Self {
        let codec = ty.codec();
        let row_bytes = codec.bytes_per_row(head_dim);
        let centered = mean.is_some();
        let codecs = (0..n_kv_head)
            .map(|h| {
                spectra
                    .and_then(|s| s.get(h))
                    .and_then(|s| codec.fit(s))
                    .unwrap_or_else(|| ty.codec_for(centered))
            })
            .collect();
        let bytes = n_kv_head * capacity * row_bytes;
        let sink = sink_count(centered, capacity);
        Self {
            ty,
            codecs,
            row_bytes,
            capacity,
            n_kv_head,
            mean,
            scale: None,
            sink,
            sink_rows: vec![half::f16::ZERO; n_kv_head * sink * head_dim],
            head_dim,
            data: vec![0u64; bytes.div_ceil(8)],
            #[cfg(feature = "cuda")]
            gpu: None,
        }
    }

    /// A store whose rows live in GPU memory, centered like a host store when given a mean
    /// (and channel weights): sink rows come with centering; SpectralQuant fitted per head to
    /// `spectra`.
    #[cfg(feature = "cuda")]
    pub fn on_gpu(
        dev: &candle_core::cuda_backend::CudaDevice,
        ty: CacheType,
        (n_kv_head, head_dim, capacity): (usize, usize, usize),
        (mean, scale): (Option<Vec<f32>>, Option<Vec<f32>>),
        spectra: Option<&[Spectrum]>,
    ) -> Result<Self> {
        let mut s = Self::new(ty, n_kv_head, head_dim, 0, mean, spectra).scaled(scale);
        let sink = sink_count(s.mean.is_some(), capacity);
        let centering = crate::kv::device::Centering {
            mean: s.mean.as_deref(),
            scale: s.scale.as_deref(),
            sink,
        };
        let rows = crate::kv::device::DeviceRows::new(
            dev,
            ty,
            (n_kv_head, head_dim, capacity),
            &centering,
            &s.codecs,
        )?;
        s.capacity = capacity;
        s.sink = sink;
        s.gpu = Some(rows);
        Ok(s)
    }

    /// This store with its rows scaled per channel (`scale`: n_kv_head × head_dim, or None).
    pub fn scaled(mut self, scale: Option<Vec<f32>>) -> Self {
        self.scale = scale;
        self
    }

    /// Head `head`'s query into the domain its rows are scored in: divided by the channel
    /// scales, then through the codec (rotated, for rotation codecs).
    pub fn prepare_query(&self, head: usize, q: &[f32], out: &mut [f32]) {
        let hd = q.len();
        match &self.scale {
            Some(s) => {
                let mut unscaled = [0f32; MAX_HEAD_DIM];
                for ((u, x), w) in unscaled.iter_mut().zip(q).zip(&s[head * hd..]) {
                    *u = x / w;
                }
                self.codec(head).prepare_query(&unscaled[..hd], out);
            }
            None => self.codec(head).prepare_query(q, out),
        }
    }

    /// Whether the rows live in GPU memory.
    pub fn on_device(&self) -> bool {
        #[cfg(feature = "cuda")]
        return self.gpu.is_some();
        #[cfg(not(feature = "cuda"))]
        false
    }

    /// Bytes of the codecs' per-head state (SpectralQuant's bases), beside [`bytes`](Self::bytes).
    pub fn state_bytes(&self) -> usize {
        self.codecs.iter().map(|c| c.state_bytes()).sum()
    }

    /// The codec that stores head `head`'s rows.
    pub fn codec(&self, head: usize) -> &dyn KvCodec {
        self.codecs[head].as_ref()
    }

    /// Bytes the rows occupy (the theoretical size: ring rows plus f16 sink rows; the
    /// allocation rounds up to 8 bytes at most).
    pub fn bytes(&self) -> usize {
        self.n_kv_head * (self.capacity * self.row_bytes + 2 * self.sink * self.head_dim)
    }

    /// The rows of positions `range` for one head, as runs of consecutive rows with the codec
    /// that reads them: the exact sink rows first, then at most two ring runs.
    pub fn runs(
        &self,
        head: usize,
        range: std::ops::Range<usize>,
    ) -> Vec<(&dyn KvCodec, &[u8], usize)> {
        let mut out: Vec<(&dyn KvCodec, &[u8], usize)> = Vec::with_capacity(3);
        let (hd, s) = (self.head_dim, self.sink);
        let sink_end = range.end.min(s);
        if range.start < sink_end {
            let rows = &self.sink_rows[(head * s + range.start) * hd..(head * s + sink_end) * hd];
            out.push((
                &SINK_CODEC,
                bytemuck::cast_slice(rows),
                sink_end - range.start,
            ));
        }
        let rest = range.start.max(s)..range.end;
        if !rest.is_empty() {
            for (bytes, n) in self.segments(head, rest) {
                if n > 0 {
                    out.push((self.codec(head), bytes, n));
                }
            }
        }
        out
    }

    /// The rows of positions `range` for one head as at most two contiguous byte runs (a ring
    /// wraps once), each with the number of rows it holds.
    pub fn segments(&self, head: usize, range: std::ops::Range<usize>) -> [(&[u8], usize); 2] {
        let n = range.len();
        let bytes: &[u8] = bytemuck::cast_slice(&self.data);
        let base = head * self.capacity * self.row_bytes;
        if n == 0 {
            // Empty runs still point into the store, so they keep its alignment for casts.
            let empty = &bytes[base..base];
            return [(empty, 0), (empty, 0)];
        }
        let slot = range.start % self.capacity;
        let first = n.min(self.capacity - slot);
        let a = &bytes[base + slot * self.row_bytes..][..first * self.row_bytes];
        let b = &bytes[base..][..(n - first) * self.row_bytes];
        [(a, first), (b, n - first)]
    }

    /// Reads positions `range` of one head back as values (sinks and ring rows alike, rotation
    /// undone, mean added back), calling `f` with each row.
    pub fn read_rows(&self, head: usize, range: std::ops::Range<usize>, mut f: impl FnMut(&[f32])) {
        let hd = self.head_dim;
        let mut emit = |row: &mut [f32]| {
            self.unweight(head, row, 1.0);
            f(row);
        };
        let mut row = vec![0f32; hd];
        for pos in range.start..range.end.min(self.sink) {
            let stored = &self.sink_rows[(head * self.sink + pos) * hd..][..hd];
            SINK_CODEC.dequantize_row(bytemuck::cast_slice(stored), &mut row);
            // sinks hold the codec's domain
            self.codec(head).finish_output(&mut row);
            emit(&mut row);
        }
        let rest = range.start.max(self.sink)..range.end;
        if !rest.is_empty() {
            for (bytes, n) in self.segments(head, rest) {
                for r in bytes.chunks_exact(self.row_bytes).take(n) {
                    self.codec(head).dequantize_row(r, &mut row);
                    emit(&mut row);
                }
            }
        }
    }

    /// Positions `range` of every head as values `[n_kv_head, range.len(), head_dim]`, as
    /// [`read_rows`](Self::read_rows) gives them (a GPU store's read back from the device).
    pub fn values(&self, range: std::ops::Range<usize>) -> Result<Vec<f32>> {
        #[cfg(feature = "cuda")]
        if let Some(rows) = &self.gpu {
            return rows.values((self.n_kv_head, self.head_dim), self.capacity, range);
        }
        let mut out = Vec::with_capacity(self.n_kv_head * range.len() * self.head_dim);
        for h in 0..self.n_kv_head {
            self.read_rows(h, range.clone(), |row| out.extend_from_slice(row));
        }
        Ok(out)
    }

    pub fn write(&mut self, head: usize, pos: usize, values: &[f32]) {
        let hd = values.len();
        // Row buffers on the stack: this runs once per head, layer and token.
        let mut centered = [0f32; MAX_HEAD_DIM];
        let values = match &self.mean {
            Some(mean) => {
                let c = &mut centered[..hd];
                for ((c, v), m) in c
                    .iter_mut()
                    .zip(values)
                    .zip(&mean[head * hd..(head + 1) * hd])
                {
                    *c = v - m;
                }
                if let Some(s) = &self.scale {
                    for (c, w) in c.iter_mut().zip(&s[head * hd..(head + 1) * hd]) {
                        *c *= w;
                    }
                }
                &centered[..hd]
            }
            None => values,
        };
        if pos < self.sink {
            let mut domain = [0f32; MAX_HEAD_DIM];
            self.codec(head).prepare_query(values, &mut domain[..hd]);
            let dst = &mut self.sink_rows[(head * self.sink + pos) * hd..][..hd];
            SINK_CODEC.quantize_row(&domain[..hd], bytemuck::cast_slice_mut(dst));
            return;
        }
        let slot = pos % self.capacity;
        let start = (head * self.capacity + slot) * self.row_bytes;
        let rb = self.row_bytes;
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut self.data);
        self.codecs[head].quantize_row(values, &mut bytes[start..start + rb]);
    }

    /// Head `head`'s stored mean, if this store centers its rows.
    /// A sum `acc` of this (V) store's rows of head `head` in its stored domain, with weights
    /// summing to `weight`, back into values: rotation undone, channel weights divided out,
    /// `weight` times the mean added.
    pub fn finish_values(&self, head: usize, acc: &mut [f32], weight: f32) {
        self.codec(head).finish_output(acc);
        self.unweight(head, acc, weight);
    }

    /// A row (or a sum of rows with weights summing to `weight`) of head `head`, rotation
    /// already undone, back into values: channel weights divided out, the mean added.
    fn unweight(&self, head: usize, acc: &mut [f32], weight: f32) {
        let hd = acc.len();
        if let Some(s) = &self.scale {
            for (x, w) in acc.iter_mut().zip(&s[head * hd..(head + 1) * hd]) {
                *x /= w;
            }
        }
        if let Some(m) = self.head_mean(head, hd) {
            axpy_f32(weight, m, acc);
        }
    }

    pub fn head_mean(&self, head: usize, head_dim: usize) -> Option<&[f32]> {
        self.mean
            .as_deref()
            .map(|m| &m[head * head_dim..(head + 1) * head_dim])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::store::SINK_ROWS;

    #[test]
    fn ring_segments_wrap_and_stay_aligned() {
        let mut s = RowStore::new(CacheType::F16, 2, 8, 4, None, None);
        for p in 0..6 {
            s.write(1, p, &[p as f32; 8]);
        }
        // positions 2..6 live in slots 2,3,0,1 of head 1
        let [(a, na), (b, nb)] = s.segments(1, 2..6);
        assert_eq!((na, nb), (2, 2));
        let mut got = vec![0f32; 4];
        let q = [1f32; 8];
        s.codec(1).dot_rows(8, &q, a, &mut got[..2]);
        s.codec(1).dot_rows(8, &q, b, &mut got[2..]);
        assert_eq!(got, vec![16.0, 24.0, 32.0, 40.0]);
        // an empty range casts like any other run
        let [(e, 0), _] = s.segments(0, 3..3) else {
            panic!()
        };
        s.codec(1).dot_rows(8, &q, e, &mut []);
    }

    /// Turbo rows centered on a mean, with the first positions kept exact: scores read through
    /// `runs` plus the mean's dot equal the exact scores (sinks to rounding, the rest to the
    /// codec's error, which centering keeps small when rows sit near the mean).
    #[test]
    fn centered_turbo_rows_and_sinks_score_like_exact() {
        let hd = 64;
        let mean: Vec<f32> = (0..hd).map(|i| (i as f32 * 0.1).sin() * 3.0).collect();
        let weights: Vec<f32> = (0..hd).map(|i| 0.8 + (i % 5) as f32 * 0.1).collect();
        // Plain centering, then with channel weights (scores and read-back must not change).
        for scale in [None, Some(weights)] {
            let mut s =
                RowStore::new(CacheType::Turbo4, 1, hd, 16, Some(mean.clone()), None).scaled(scale);
            let rows: Vec<Vec<f32>> = (0..12)
                .map(|p| {
                    (0..hd)
                        .map(|i| mean[i] + 0.3 * ((p * 7 + i * 3) as f32 * 0.37).cos())
                        .collect()
                })
                .collect();
            for (p, r) in rows.iter().enumerate() {
                s.write(0, p, r);
            }
            let q: Vec<f32> = (0..hd).map(|i| (i as f32 * 0.21).cos()).collect();
            let mut qr = vec![0f32; hd];
            s.prepare_query(0, &q, &mut qr);
            let bias: f32 = q.iter().zip(&mean).map(|(a, b)| a * b).sum();
            let mut got = Vec::new();
            for (codec, bytes, n) in s.runs(0, 0..12) {
                let mut out = vec![0f32; n];
                codec.dot_rows(hd, &qr, bytes, &mut out);
                got.extend(out.iter().map(|x| x + bias));
            }
            assert_eq!(s.runs(0, 0..12).len(), 2);
            for (p, (g, r)) in got.iter().zip(&rows).enumerate() {
                let want: f32 = q.iter().zip(r).map(|(a, b)| a * b).sum();
                let tol = if p < SINK_ROWS { 2e-2 } else { 0.3 };
                assert!((g - want).abs() < tol, "position {p}: {g} vs {want}");
            }
            // Reading back undoes rotation, weights and centering: sinks to f16 rounding, the
            // rest to the codec.
            let mut p = 0;
            s.read_rows(0, 0..12, |got| {
                let err = got
                    .iter()
                    .zip(&rows[p])
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    err < if p < SINK_ROWS { 1e-2 } else { 0.3 },
                    "row {p}: max error {err}"
                );
                p += 1;
            });
            assert_eq!(p, 12);
        }
    }

    /// Keys whose energy sits in channels the queries barely use: the calibration's channel
    /// weights move turbo3's error there, and the score error drops.
    #[test]
    fn channel_weights_cut_score_error_where_queries_and_keys_disagree() {
        let hd = 64;
        let n = 200;
        let wave = |a: usize, b: usize| ((a * 31 + b * 17) as f32 * 0.713).sin();
        // keys: large in the upper half; queries: large in the lower half
        let key = |p: usize| -> Vec<f32> {
            (0..hd)
                .map(|i| wave(p, i) * if i >= hd / 2 { 4.0 } else { 0.5 })
                .collect()
        };
        let query = |j: usize| -> Vec<f32> {
            (0..hd)
                .map(|i| wave(j + 1000, i) * if i < hd / 2 { 4.0 } else { 0.5 })
                .collect()
        };
        let (q2, k2) = energies(n, &key, &query);
        let weights = crate::kv::calibration::channel_scales(&q2, &k2);
        let error = |scale| score_error(CacheType::Turbo3, n, &key, &query, scale);
        let (plain, weighted) = (error(None), error(Some(weights)));
        assert!(
            weighted < 0.5 * plain,
            "score error with channel weights {weighted} vs without {plain}"
        );
    }

    /// A V store with channel weights gives back the weighted sum of its values, weights and
    /// mean undone by `finish_values`.
    #[test]
    fn v_weights_come_out_of_the_weighted_sum() {
        let (hd, n) = (64, 24);
        let value = |p: usize| -> Vec<f32> {
            (0..hd)
                .map(|i| ((p * 7 + i * 3) as f32 * 0.37).sin() * if i < 8 { 6.0 } else { 0.5 })
                .collect()
        };
        let mean = vec![0.3f32; hd];
        let weights: Vec<f32> = (0..hd).map(|i| if i < 8 { 0.25 } else { 1.5 }).collect();
        let p: Vec<f32> = (0..n).map(|j| 1.0 / (1 + j) as f32).collect();
        let mut want = vec![0f32; hd];
        for (j, pj) in p.iter().enumerate() {
            axpy_f32(*pj, &value(j), &mut want);
        }
        for scale in [None, Some(weights)] {
            let mut s = RowStore::new(CacheType::Iso4, 1, hd, n, Some(mean.clone()), None)
                .scaled(scale.clone());
            for j in 0..n {
                s.write(0, j, &value(j));
            }
            let mut acc = vec![0f32; hd];
            let mut first = 0;
            for (codec, bytes, m) in s.runs(0, 0..n) {
                codec.axpy_rows(hd, &p[first..first + m], bytes, &mut acc);
                first += m;
            }
            s.finish_values(0, &mut acc, p.iter().sum());
            let err = acc
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).powi(2))
                .sum::<f32>();
            let norm = want.iter().map(|b| b * b).sum::<f32>();
            assert!(
                err < 0.05 * norm,
                "weights {scale:?}: error {err} of {norm}"
            );
        }
    }

    /// Per channel, E q² and E k² over the first `n` queries and keys.
    fn energies(
        n: usize,
        key: &dyn Fn(usize) -> Vec<f32>,
        query: &dyn Fn(usize) -> Vec<f32>,
    ) -> (Vec<f64>, Vec<f64>) {
        let hd = key(0).len();
        let (mut q2, mut k2) = (vec![0f64; hd], vec![0f64; hd]);
        for p in 0..n {
            for (i, (k, q)) in key(p).iter().zip(query(p)).enumerate() {
                k2[i] += (*k as f64).powi(2) / n as f64;
                q2[i] += (q as f64).powi(2) / n as f64;
            }
        }
        (q2, k2)
    }

    /// Σ over 8 queries and `n` keys of the squared error of the scores a one-head store of `ty`
    /// (centered on zero, K weights `scale`) gives against the exact `<q, k>`.
    fn score_error(
        ty: CacheType,
        n: usize,
        key: &dyn Fn(usize) -> Vec<f32>,
        query: &dyn Fn(usize) -> Vec<f32>,
        scale: Option<Vec<f32>>,
    ) -> f64 {
        let hd = key(0).len();
        let zero = vec![0f32; hd];
        let mut s = RowStore::new(ty, 1, hd, n, Some(zero), None).scaled(scale);
        for p in 0..n {
            s.write(0, p, &key(p));
        }
        let mut total = 0f64;
        for j in 0..8 {
            let q = query(j);
            let mut qr = vec![0f32; hd];
            s.prepare_query(0, &q, &mut qr);
            let mut first = 0;
            for (codec, bytes, m) in s.runs(0, 0..n) {
                let mut out = vec![0f32; m];
                codec.dot_rows(hd, &qr, bytes, &mut out);
                for (r, got) in out.iter().enumerate() {
                    let want: f32 = q.iter().zip(key(first + r)).map(|(a, b)| a * b).sum();
                    total += ((got - want) as f64).powi(2);
                }
                first += m;
            }
        }
        total
    }
}

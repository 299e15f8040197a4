//! TurboQuant rows (arXiv 2504.19874, as the TurboQuant llama.cpp fork builds it): per group of
//! 64 or 128 values, the L2 norm is taken out, the unit vector is rotated by the randomized WHT
//! ([`super::wht`]) and every coordinate is replaced by the index of its nearest Lloyd–Max
//! centroid. The stored norm is corrected to `‖x‖ / ‖c‖` so a row's reconstruction keeps its
//! length. Attention stays in the rotated domain: the query is rotated once, scores are
//! `norm · <q_rot, c[idx]>`, V accumulates rotated and is rotated back once per head.
//!
//! The three widths differ only in how a group's norm and indices are packed; each lives in its
//! own file as a [`TurboLayout`]. The rotation is a parameter too ([`Rotation`]): the WHT for
//! turbo, block rotations for the RotorQuant family (`planar`, `iso`, `rotor`), which keep the
//! same packing and attention path.
//!
//! (Over 600 lines with its tests, which check the bytes against the fork's own vectors and the
//! scale search against its plain loops: about 260 of them. Its SIMD is `turbo/simd.rs`.)

use std::marker::PhantomData;
use std::ops::Range;

use half::f16;

use super::lloyd_max::{self, Codebook};
use super::{KvCodec, wht};

/// How one group of `g` indices and its norm are laid out in bytes.
pub trait TurboLayout: Send + Sync + 'static {
    const BITS: u32;
    fn group_bytes(g: usize) -> usize;
    fn pack(norm: f16, codes: &[u8], dst: &mut [u8]);
    /// Writes the group's indices to `codes` and returns its norm.
    fn unpack(src: &[u8], codes: &mut [u8]) -> f32;
    /// Scores straight from packed rows (`KvCodec::dot_rows`, codebook `table`), where the
    /// layout has a reader for the running ISA that beats decoding a tile first; false where it
    /// has none and the tile path runs.
    fn dot_rows_in_place(
        _hd: usize,
        _table: &[f32; 16],
        _qs: &[f32],
        _rows: &[u8],
        _scores: &mut [f32],
    ) -> bool {
        false
    }
    /// `KvCodec::axpy_rows` straight from packed rows, as [`Self::dot_rows_in_place`].
    fn axpy_rows_in_place(
        _hd: usize,
        _table: &[f32; 16],
        _w: &[f32],
        _rows: &[u8],
        _acc: &mut [f32],
    ) -> bool {
        false
    }
    /// One group's values in the rotated domain, `norm · table[idx]`. Layouts with a faster
    /// path than unpack-then-lookup override this.
    fn decode(src: &[u8], table: &[f32; 16], out: &mut [f32]) {
        let mut codes = [0u8; 128];
        let g = out.len();
        let norm = Self::unpack(src, &mut codes[..g]);
        simd::lookup(&codes[..g], table, norm, Self::BITS == 4, out);
    }
}

/// An orthogonal map of one group of 64 or 128 values and its inverse.
pub trait Rotation: Send + Sync + 'static {
    /// Values one rotation block mixes; 0 for a rotation of the whole group.
    const BLOCK: usize = 0;
    fn forward(x: &mut [f32]);
    fn inverse(x: &mut [f32]);
    /// Each block's parameters in order, as the GPU kernels turn them (`kernels/cuda/kv.cu`'s
    /// `rotate_blocks`); empty for the WHT.
    fn params() -> Vec<f32> {
        Vec::new()
    }
}

/// A turbo layout stored under a rotation of small blocks (RotorQuant's family), as the GPU
/// kernels run it: the layout's bit width, the block width and every block's parameters.
pub struct BlockRotation {
    pub bits: u32,
    pub block: usize,
    pub params: Vec<f32>,
}

/// The fork's randomized Walsh–Hadamard transform.
pub struct Wht;

impl Rotation for Wht {
    fn forward(x: &mut [f32]) {
        wht::forward(x)
    }
    fn inverse(x: &mut [f32]) {
        wht::inverse(x)
    }
}

/// SplitMix64: the fixed pseudo-random stream block rotations draw their angles from, so a
/// stored cache reads back the same on every build.
pub struct SplitMix(pub u64);

impl SplitMix {
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) as f64 / 18_446_744_073_709_551_616.0
    }

    /// Approximately N(0, 1): a sum of twelve uniforms, centered.
    pub fn gaussian(&mut self) -> f64 {
        (0..12).map(|_| self.next_f64()).sum::<f64>() - 6.0
    }

    /// A uniformly random unit quaternion (Shoemake's method).
    pub fn unit_quaternion(&mut self) -> [f32; 4] {
        let (u1, u2, u3) = (self.next_f64(), self.next_f64(), self.next_f64());
        let tau = std::f64::consts::TAU;
        let (a, b) = ((1.0 - u1).sqrt(), u1.sqrt());
        [
            (a * (tau * u2).sin()) as f32,
            (a * (tau * u2).cos()) as f32,
            (b * (tau * u3).sin()) as f32,
            (b * (tau * u3).cos()) as f32,
        ]
    }
}

/// Rotation group width for a head: 128 where it divides the head (the fork's group), else 64.
pub fn group_width(head_dim: usize) -> usize {
    if head_dim.is_multiple_of(128) {
        128
    } else {
        64
    }
}

/// A turbo layout under rotation `R`. `search`: each group is indexed at its best scale
/// ([`best_scale`]) instead of the codebook's own (the fork's quantizer); block rotations
/// always search, the WHT at 3 and 4 bits where rows are centered
/// ([`KvCodec::for_centered_rows`]).
pub struct Turbo<L, R = Wht> {
    search: bool,
    layout: PhantomData<(L, R)>,
}

impl<L, R: Rotation> Default for Turbo<L, R> {
    fn default() -> Self {
        Self {
            search: R::BLOCK > 0,
            layout: PhantomData,
        }
    }
}

/// A codebook padded to 16 entries for the SIMD lookups.
fn table(cb: &Codebook) -> [f32; 16] {
    let mut t = [0f32; 16];
    t[..cb.centroids.len()].copy_from_slice(&cb.centroids);
    t
}

/// Scales the search tries on a unit group before indexing it: k/16 for k in this range
/// (exact in f32, 0.625 to 1.5625).
const SCALES: std::ops::RangeInclusive<u32> = 10..=25;

/// The scale of the rotated unit group `u` whose codes decode closest in direction to it
/// (highest cosine between `u` and its centroids). After a block rotation that mixes only 2–4
/// values the coordinates are not the N(0, 1/g) the codebook was fitted to and the codebook's
/// own scale is often not the best; after the WHT a group's empirical spread still differs
/// from the design's. The stored norm is corrected afterwards as always, so decoding is
/// unchanged. Each scale's sums run in index order with one rounding per step and the first
/// best wins: the GPU's `store_row` repeats this exactly, so both store the same bytes.
fn best_scale(cb: &Codebook, u: &[f32]) -> f32 {
    let (dots, ccs) = simd::scale_sums(cb, u);
    let mut best = (f32::NEG_INFINITY, 1.0);
    for (k, (dot, cc)) in SCALES.zip(dots.iter().zip(&ccs)) {
        let cos = dot / cc.sqrt().max(1e-10);
        if cos > best.0 {
            best = (cos, k as f32 / 16.0);
        }
    }
    best.1
}

impl<L: TurboLayout, R: Rotation> Turbo<L, R> {
    fn codebook(g: usize) -> &'static Codebook {
        lloyd_max::turbo(g, L::BITS)
    }

    /// Quantizes one group with codebook `cb` (the tests pass the fork's own tables), at the
    /// best scale with `search`.
    fn quantize_group(cb: &Codebook, x: &[f32], dst: &mut [u8], search: bool) {
        let g = x.len();
        let norm = x.iter().map(|v| v * v).sum::<f32>().sqrt();
        let inv = if norm > 1e-10 { 1.0 / norm } else { 0.0 };
        let mut buf = [0f32; 128];
        let buf = &mut buf[..g];
        for (b, v) in buf.iter_mut().zip(x) {
            *b = v * inv;
        }
        R::forward(buf);
        let scale = if search { best_scale(cb, buf) } else { 1.0 };
        let mut codes = [0u8; 128];
        let mut recon = 0f32;
        for (c, v) in codes.iter_mut().zip(buf.iter()) {
            *c = cb.index(*v * scale);
            let y = cb.centroids[*c as usize];
            recon += y * y;
        }
        let recon = recon.sqrt();
        let corrected = if recon > 1e-10 { norm / recon } else { norm };
        L::pack(f16::from_f32(corrected), &codes[..g], dst);
    }
}

impl<L: TurboLayout, R: Rotation> KvCodec for Turbo<L, R> {
    fn codebook_bits(&self) -> Option<u32> {
        Some(L::BITS)
    }
    fn block_size(&self) -> usize {
        64
    }

    fn rotates(&self) -> bool {
        true
    }

    fn mixed_blocks(&self, head_dim: usize) -> Vec<Range<usize>> {
        if R::BLOCK == 0 {
            return Vec::new();
        }
        let g = group_width(head_dim);
        (0..head_dim)
            .step_by(g)
            .flat_map(|start| {
                (start..start + g)
                    .step_by(R::BLOCK)
                    .map(move |b| b..(b + R::BLOCK).min(start + g))
            })
            .collect()
    }

    /// √(1 − D) of the b-bit codebook: at 2 bits 0.939, so uncorrected scores came out 6%
    /// flat (a softer softmax) and V sums 6% short.
    fn shrink(&self) -> f32 {
        (1.0 - lloyd_max::normal_mse(L::BITS)).sqrt() as f32
    }

    fn for_centered_rows(&self) -> Option<Box<dyn KvCodec>> {
        // At 2 bits the search lost needles on SmolLM2 (16 of 64 cells against 22 without it)
        // for no gain in perplexity, so turbo2 keeps the fork's quantizer everywhere.
        (!self.search && L::BITS >= 3).then(|| {
            Box::new(Self {
                search: true,
                layout: PhantomData,
            }) as Box<dyn KvCodec>
        })
    }

    fn searches_scale(&self) -> bool {
        self.search
    }

    fn block_rotation(&self) -> Option<BlockRotation> {
        (R::BLOCK > 0).then(|| BlockRotation {
            bits: L::BITS,
            block: R::BLOCK,
            params: R::params(),
        })
    }

    fn bytes_per_row(&self, head_dim: usize) -> usize {
        let g = group_width(head_dim);
        head_dim / g * L::group_bytes(g)
    }

    fn quantize_row(&self, src: &[f32], dst: &mut [u8]) {
        let g = group_width(src.len());
        for (x, d) in src
            .chunks_exact(g)
            .zip(dst.chunks_exact_mut(L::group_bytes(g)))
        {
            Self::quantize_group(Self::codebook(g), x, d, self.search);
        }
    }

    fn dequantize_row(&self, src: &[u8], dst: &mut [f32]) {
        let g = group_width(dst.len());
        let cb = Self::codebook(g);
        let mut codes = [0u8; 128];
        for (s, y) in src
            .chunks_exact(L::group_bytes(g))
            .zip(dst.chunks_exact_mut(g))
        {
            let norm = L::unpack(s, &mut codes[..g]);
            for (o, &c) in y.iter_mut().zip(&codes[..g]) {
                *o = norm * cb.centroids[c as usize];
            }
            R::inverse(y);
        }
    }

    fn prepare_query(&self, q: &[f32], out: &mut [f32]) {
        out.copy_from_slice(q);
        for grp in out.chunks_exact_mut(group_width(q.len())) {
            R::forward(grp);
        }
    }

    fn finish_output(&self, acc: &mut [f32]) {
        for grp in acc.chunks_exact_mut(group_width(acc.len())) {
            R::inverse(grp);
        }
    }

    fn dot_rows(&self, head_dim: usize, qs: &[f32], rows: &[u8], scores: &mut [f32]) {
        let t = table(Self::codebook(group_width(head_dim)));
        if !L::dot_rows_in_place(head_dim, &t, qs, rows, scores) {
            super::tiled_dot_rows(self, head_dim, qs, rows, scores);
        }
    }

    fn axpy_rows(&self, head_dim: usize, w: &[f32], rows: &[u8], acc: &mut [f32]) {
        let t = table(Self::codebook(group_width(head_dim)));
        if !L::axpy_rows_in_place(head_dim, &t, w, rows, acc) {
            super::tiled_axpy_rows(self, head_dim, w, rows, acc);
        }
    }

    fn decode_rows(&self, head_dim: usize, rows: &[u8], out: &mut [f32]) {
        let g = group_width(head_dim);
        let (gb, t) = (L::group_bytes(g), table(Self::codebook(g)));
        for (grp, o) in rows.chunks_exact(gb).zip(out.chunks_exact_mut(g)) {
            L::decode(grp, &t, o);
        }
    }
}

/// Reads the f16 norm at the start of a group.
pub fn read_norm(src: &[u8]) -> f32 {
    f16::from_le_bytes([src[0], src[1]]).to_f32()
}

/// 2-bit fields of a byte, low first, one per output byte.
pub const UNPACK2: [[u8; 4]; 256] = {
    let mut t = [[0u8; 4]; 256];
    let mut b = 0;
    while b < 256 {
        let mut k = 0;
        while k < 4 {
            t[b][k] = ((b >> (2 * k)) & 3) as u8;
            k += 1;
        }
        b += 1;
    }
    t
};

/// `out[i] = norm · table[codes[i]]` and the scale search's sums: AVX2 where the CPU has it.
pub(crate) mod simd;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A block rotation leaves a loud block loud, so at the codebook's own scale the row's codes
    /// clip; the scale `best_scale` picks points them closer to the row, and a row the codebook
    /// fits keeps a scale near 1.
    #[test]
    fn block_codecs_pick_the_scale_that_fits_the_row() {
        use super::super::iso::Quaternions;
        let cb = lloyd_max::turbo(64, 3);
        let unit = |loud: f32| {
            let mut u: Vec<f32> = (0..64)
                .map(|i| ((i * 29) as f32 * 0.617).sin() * if i < 2 { loud } else { 0.5 })
                .collect();
            let n = u.iter().map(|x| x * x).sum::<f32>().sqrt();
            u.iter_mut().for_each(|x| *x /= n);
            Quaternions::forward(&mut u);
            u
        };
        let cosine = |u: &[f32], sc: f32| {
            let c: Vec<f32> = u
                .iter()
                .map(|v| cb.centroids[cb.index(v * sc) as usize])
                .collect();
            let dot: f32 = c.iter().zip(u).map(|(a, b)| a * b).sum();
            dot / c.iter().map(|x| x * x).sum::<f32>().sqrt()
        };
        let loud = unit(10.0);
        let best = best_scale(cb, &loud);
        assert!(
            cosine(&loud, best) > cosine(&loud, 1.0) + 0.01,
            "scale {best}: cosine {} vs {} at 1",
            cosine(&loud, best),
            cosine(&loud, 1.0)
        );
        let even = unit(0.5);
        assert!((cosine(&even, best_scale(cb, &even)) - cosine(&even, 1.0)).abs() < 0.01);
    }

    /// The AVX2 sums of the scale search are the plain loop's to the bit (the GPU repeats the
    /// plain loop, so a stored byte may not depend on the CPU's instruction set).
    #[test]
    fn scale_search_sums_are_the_plain_loops() {
        let mut rng = SplitMix(3);
        for (g, bits) in [(64, 2), (64, 3), (64, 4), (128, 2), (128, 3), (128, 4)] {
            let cb = lloyd_max::turbo(g, bits);
            for _ in 0..200 {
                let mut u: Vec<f32> = (0..g).map(|_| rng.gaussian() as f32).collect();
                let n = u.iter().map(|x| x * x).sum::<f32>().sqrt();
                u.iter_mut().for_each(|x| *x /= n);
                let want = simd::scale_sums_portable(cb, &u);
                let bits_of =
                    |s: ([f32; 16], [f32; 16])| (s.0.map(f32::to_bits), s.1.map(f32::to_bits));
                let mut paths = vec![simd::scale_sums(cb, &u)];
                #[cfg(target_arch = "x86_64")]
                if is_x86_feature_detected!("avx2") {
                    // SAFETY: AVX2 is present (checked above).
                    paths.push(unsafe { simd::x86::scale_sums(&cb.centroids, &cb.mids, &u) });
                }
                for got in paths {
                    assert_eq!(bits_of(got), bits_of(want), "g {g}, {bits} bits");
                }
            }
        }
    }

    /// Centered stores run turbo3/turbo4 with the scale search (turbo2 keeps the fork's
    /// quantizer); its codes decode closer to heavy-tailed rows than the fork's quantizer at the
    /// codebook's own scale.
    #[test]
    fn centered_turbo_rows_search_the_scale() {
        use super::super::turbo3::Turbo3;
        let plain = Turbo::<Turbo3>::default();
        let searched = plain.for_centered_rows().unwrap();
        assert!(!plain.searches_scale() && searched.searches_scale());
        let turbo2 = Turbo::<super::super::turbo2::Turbo2>::default();
        assert!(turbo2.for_centered_rows().is_none());
        let error = |codec: &dyn KvCodec| {
            let mut row = vec![0u8; codec.bytes_per_row(128)];
            let mut y = vec![0f32; 128];
            rows(64, 128)
                .iter()
                .map(|x| {
                    codec.quantize_row(x, &mut row);
                    codec.dequantize_row(&row, &mut y);
                    x.iter()
                        .zip(&y)
                        .map(|(a, b)| (a - b) * (a - b))
                        .sum::<f32>()
                })
                .sum::<f32>()
        };
        let (e_plain, e_searched) = (error(&plain), error(searched.as_ref()));
        assert!(e_searched < 0.97 * e_plain, "{e_searched} vs {e_plain}");
    }

    /// Heavy-tailed test rows: a few large channels over a smooth background, like real K.
    pub fn rows(n: usize, d: usize) -> Vec<Vec<f32>> {
        (0..n)
            .map(|r| {
                (0..d)
                    .map(|i| {
                        let x = ((r * 31 + i * 17) as f32 * 0.37).sin();
                        if i % 29 == 3 {
                            6.0 * x
                        } else {
                            x + 0.1 * (r as f32)
                        }
                    })
                    .collect()
            })
            .collect()
    }

    /// Generic checks every turbo width must pass: bytes, reconstruction, fused paths agree with
    /// dequantize-then-dot, and the error shrinks with more bits.
    pub fn check<L: TurboLayout>(max_rel_mse: f32) {
        for d in [64, 128, 256] {
            let g = group_width(d);
            assert_eq!(
                Turbo::<L>::default().bytes_per_row(d),
                d / g * L::group_bytes(g)
            );
        }
        check_codec(&Turbo::<L>::default(), max_rel_mse);
    }

    /// Any codec: reconstruction within `max_rel_mse`, fused dot and axpy equal to working on
    /// the dequantized row.
    pub fn check_codec(codec: &dyn KvCodec, max_rel_mse: f32) {
        for d in [64, 128, 256] {
            let rb = codec.bytes_per_row(d);
            let mut mse = 0f32;
            let mut energy = 0f32;
            for x in rows(8, d) {
                let mut row = vec![0u8; rb];
                codec.quantize_row(&x, &mut row);
                let mut y = vec![0f32; d];
                codec.dequantize_row(&row, &mut y);
                mse += x
                    .iter()
                    .zip(&y)
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f32>();
                energy += x.iter().map(|a| a * a).sum::<f32>();
                // The fused paths read the row as `decode_rows` does (SpectralQuant's reading
                // differs from its stored values by each group's shrink), back in the original
                // domain.
                let mut y = vec![0f32; d];
                codec.decode_rows(d, &row, &mut y);
                codec.finish_output(&mut y);
                let q: Vec<f32> = (0..d).map(|i| ((i * 3) as f32 * 0.11).cos()).collect();
                let mut qr = vec![0f32; d];
                codec.prepare_query(&q, &mut qr);
                let want: f32 = q.iter().zip(&y).map(|(a, b)| a * b).sum();
                let got = codec.dot(&qr, &row);
                assert!(
                    (want - got).abs() < 1e-3 * (1.0 + want.abs()),
                    "{want} vs {got}"
                );
                let mut acc = vec![0f32; d];
                codec.axpy(0.5, &row, &mut acc);
                codec.finish_output(&mut acc);
                for (a, b) in acc.iter().zip(&y) {
                    assert!((a - 0.5 * b).abs() < 1e-4);
                }
            }
            let rel = mse / energy;
            assert!(rel < max_rel_mse, "d={d}: relative MSE {rel}");
        }
    }

    /// Decoded values correlate with the true ones with slope `shrink()` (on Gaussian rows, the
    /// codebooks' design distribution): dividing by it makes `<q, k̂>` unbiased.
    #[test]
    fn decoded_rows_shrink_as_the_codec_says() {
        let d = 128;
        let mut rng = SplitMix(9);
        for codec in [
            &Turbo::<super::super::turbo2::Turbo2>::default() as &dyn KvCodec,
            &Turbo::<super::super::turbo3::Turbo3>::default(),
            &Turbo::<super::super::turbo4::Turbo4>::default(),
        ] {
            let (mut xy, mut xx) = (0f64, 0f64);
            let mut row = vec![0u8; codec.bytes_per_row(d)];
            let mut y = vec![0f32; d];
            for _ in 0..2000 {
                let x: Vec<f32> = (0..d).map(|_| rng.gaussian() as f32).collect();
                codec.quantize_row(&x, &mut row);
                codec.dequantize_row(&row, &mut y);
                xy += x.iter().zip(&y).map(|(a, b)| (a * b) as f64).sum::<f64>();
                xx += x.iter().map(|a| (a * a) as f64).sum::<f64>();
            }
            let (slope, shrink) = (xy / xx, codec.shrink() as f64);
            assert!(
                shrink < 1.0 && (slope - shrink).abs() < 0.004,
                "{slope} vs {shrink}"
            );
        }
    }

    /// A rotation keeps lengths and its inverse undoes it, for both group widths.
    pub fn check_rotation<R: Rotation>() {
        for g in [64, 128] {
            let x: Vec<f32> = (0..g).map(|i| ((i * 7) as f32 * 0.3).sin() + 0.1).collect();
            let mut y = x.clone();
            R::forward(&mut y);
            let n = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
            assert!((n(&x) - n(&y)).abs() < 1e-4 * n(&x), "length changed");
            assert!(
                x.iter().zip(&y).any(|(a, b)| (a - b).abs() > 1e-3),
                "no rotation"
            );
            R::inverse(&mut y);
            for (a, b) in x.iter().zip(&y) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
        }
        // The GPU kernels index a 128-wide group's blocks into these (kv.cu's rotate_blocks).
        let per_block = match R::BLOCK {
            0 => 0,
            2 => 2,
            3 => 9,
            4 => 8,
            b => panic!("kv.cu has no {b}-value block rotation"),
        };
        assert_eq!(R::params().len(), 128 / R::BLOCK.max(1) * per_block);
    }

    /// Quantizing the fork's test vectors (scripts/turbo_vectors.sh) with the fork's codebook
    /// gives the fork's indices, and its norm to within one f16 step.
    pub fn fork_vectors<L: TurboLayout>(name: &str) {
        let all: serde_json::Value =
            serde_json::from_str(include_str!("../../../tests/data/turbo_fork_vectors.json"))
                .unwrap();
        let cb = lloyd_max::fork_128(L::BITS);
        let cases = all[name].as_array().unwrap();
        assert_eq!(cases.len(), 16);
        for case in cases {
            let x: Vec<f32> = case["x"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            let hex = case["bytes"].as_str().unwrap();
            let want: Vec<u8> = (0..hex.len() / 2)
                .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
                .collect();
            let mut got = vec![0u8; L::group_bytes(128)];
            Turbo::<L>::quantize_group(&cb, &x, &mut got, false);
            let (mut cw, mut cg) = ([0u8; 128], [0u8; 128]);
            let nw = L::unpack(&want, &mut cw);
            let ng = L::unpack(&got, &mut cg);
            assert_eq!(cw, cg, "{name}: indices differ");
            assert_eq!(want[2..], got[2..], "{name}: packed bytes differ");
            assert!(
                (nw - ng).abs() <= nw.abs() / 1024.0,
                "{name}: norm {nw} vs {ng}"
            );
        }
    }
}

//! spectral3 / spectral4 (SpectralQuant): each head's rows in its own PCA basis, with the bits
//! water-filled over the eigen-directions.
//!
//! Calibration (`kv::calibration`) measures the covariance of each head's centered K and V rows.
//! Its eigenvectors form an orthogonal basis, so dot products survive the change of basis; its
//! eigenvalues λ say how much each direction varies. Widths are reverse water-filling in whole
//! bits: each bit of the row's budget goes to the direction whose expected error λ_i·D(b_i) it
//! lowers most (D: the N(0, 1) Lloyd–Max error at b bits), within one bit of the nominal width.
//! Unbounded water-filling gives the top directions 6–7 bits and the flat half none, and on
//! SmolLM2 that tripled the mean KLD against f16: the calibration text's spectrum does not
//! transfer that finely to other text, and every extra group costs a norm (docs/QUALITY.md).
//!
//! Directions that got the same width form a group, quantized as turbo quantizes a row: turned
//! by a random rotation of the group, scaled by the group's own norm in this row, coded with the
//! Lloyd–Max codebook for N(0, 1/len). One direction's values across tokens are far from
//! Gaussian (a few tokens sit many σ out) and a token's energy need not split between groups as
//! the average does; the rotation and the per-row group norm absorb both (with one scale per
//! row and per-direction codebooks, SmolLM2's mean KLD was 3× worse). The group norms (f16)
//! come out of the same budget, so a row is always 2 + bits·head_dim/8 bytes — turbo's bytes
//! at head_dim 64 — laid out as the norms, widest group first, then the codes packed LSB first.
//! Without calibration (the codecs report on synthetic rows) the basis is the identity: one
//! group, a dense random rotation, i.e. turbo with a different rotation.
//!
//! (Just over 600 lines: 210 of them are its tests — fits, byte layout, the GPU's tables.)

use std::sync::{Arc, Mutex, OnceLock};

use half::f16;
use nalgebra::DMatrix;

use super::KvCodec;
use super::MAX_HEAD_DIM;
use super::lloyd_max::{self, MAX_BITS};
use super::spectrum::Spectrum;
use super::turbo::SplitMix;

pub type Spectral3Codec = Spectral<3>;
pub type Spectral4Codec = Spectral<4>;

#[derive(Default)]
pub struct Spectral<const BITS: u32> {
    fit: Option<Arc<Fit>>,
}

/// What a head's spectrum fixes: the basis and its groups.
struct Fit {
    /// [d, d] orthogonal: row j gives stored coordinate j. Groups are consecutive coordinates,
    /// widest first; coordinates past the last group get no bits.
    vt: Vec<f32>,
    groups: Vec<Group>,
}

struct Group {
    start: usize,
    len: usize,
    width: u8,
    /// The N(0, 1/len) Lloyd–Max centroids for `width` bits.
    lut: Vec<f32>,
    /// `lut` over the codebook's shrink √(1 − D): what attention reads, so that a group's share
    /// of a score or V sum comes out unbiased (see `KvCodec::shrink`; each group has its own
    /// width, so the correction lives here rather than in one factor for the row).
    read_lut: Vec<f32>,
}

impl Fit {
    fn new(bits: u32, eigenvalues: &[f32], vt: Option<&[f32]>) -> Self {
        let d = eigenvalues.len();
        let total: f64 = eigenvalues.iter().map(|&l| l.max(0.0) as f64).sum();
        // A head that never varied (or no calibration): every direction alike.
        let lambda: Vec<f64> = if total > 0.0 {
            eigenvalues
                .iter()
                .map(|&l| l.max(0.0) as f64 / total)
                .collect()
        } else {
            vec![1.0 / d as f64; d]
        };
        // Each group past the first spends 16 bits of the budget on its norm: shrink the budget
        // until the groups it makes fit in it.
        let row_bits = bits as usize * d;
        let (lo, hi) = (bits as u8 - 1, bits as u8 + 1);
        let mut widths = water_fill(row_bits, &lambda, lo, hi);
        for _ in 0..MAX_BITS {
            let n_groups = (1..=MAX_BITS as u8).filter(|w| widths.contains(w)).count();
            let budget = row_bits.saturating_sub(16 * n_groups.saturating_sub(1));
            if widths.iter().map(|&w| w as usize).sum::<usize>() <= budget {
                break;
            }
            widths = water_fill(budget, &lambda, lo, hi);
        }
        let groups_bits = 16 * (1..=MAX_BITS as u8).filter(|w| widths.contains(w)).count();
        if widths.iter().map(|&w| w as usize).sum::<usize>() + groups_bits > row_bits + 16 {
            // Never seen (the loop above settles in one or two rounds); one group always fits.
            widths = vec![bits as u8; d];
        }
        let basis_row = |i: usize| -> Vec<f32> {
            match vt {
                Some(vt) => vt[i * d..(i + 1) * d].to_vec(),
                None => (0..d).map(|j| if i == j { 1.0 } else { 0.0 }).collect(),
            }
        };
        let mut m = Vec::with_capacity(d * d);
        let mut groups = Vec::new();
        let mut rng = SplitMix(0x5350_4543 ^ d as u64); // "SPEC"
        for w in (0..=MAX_BITS as u8).rev() {
            let idx: Vec<usize> = (0..d).filter(|&i| widths[i] == w).collect();
            if idx.is_empty() {
                continue;
            }
            let g = idx.len();
            let rows: Vec<Vec<f32>> = idx.iter().map(|&i| basis_row(i)).collect();
            if w == 0 {
                // Unused directions keep their eigenvectors so the basis stays orthogonal.
                rows.iter().for_each(|r| m.extend_from_slice(r));
                continue;
            }
            let r = DMatrix::from_fn(g, g, |_, _| rng.gaussian()).qr().q();
            for a in 0..g {
                let mut out = vec![0f32; d];
                for (b, row) in rows.iter().enumerate() {
                    super::axpy_f32(r[(a, b)] as f32, row, &mut out);
                }
                m.extend_from_slice(&out);
            }
            let s = 1.0 / (g as f32).sqrt();
            let lut: Vec<f32> = lloyd_max::normal(w as u32)
                .centroids
                .iter()
                .map(|c| c * s)
                .collect();
            let gain = 1.0 / (1.0 - lloyd_max::normal_mse(w as u32)).sqrt() as f32;
            groups.push(Group {
                start: m.len() / d - g,
                len: g,
                width: w,
                read_lut: lut.iter().map(|c| c * gain).collect(),
                lut,
            });
        }
        Self { vt: m, groups }
    }

    /// The identity-basis, equal-width fit for head_dim `d`, built once per (bits, d) and kept
    /// for the process (a handful of small tables).
    fn uniform(bits: u32, d: usize) -> &'static Fit {
        type Fits = Vec<(u32, usize, &'static Fit)>;
        static CACHE: OnceLock<Mutex<Fits>> = OnceLock::new();
        let mut all = CACHE
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((_, _, f)) = all.iter().find(|(b, n, _)| (*b, *n) == (bits, d)) {
            return f;
        }
        let f: &'static Fit = Box::leak(Box::new(Fit::new(bits, &vec![1.0; d], None)));
        all.push((bits, d, f));
        f
    }

    /// `out = vt · x` (into the basis).
    fn forward(&self, x: &[f32], out: &mut [f32]) {
        for (o, v) in out.iter_mut().zip(self.vt.chunks_exact(x.len())) {
            *o = super::dot_f32(v, x);
        }
    }

    /// `x = vtᵀ · x` (back from the basis).
    fn inverse(&self, x: &mut [f32]) {
        let vt = &self.vt;
        let d = x.len();
        let mut out = [0f32; MAX_HEAD_DIM];
        let out = &mut out[..d];
        for (&y, v) in x.iter().zip(vt.chunks_exact(d)) {
            if y != 0.0 {
                super::axpy_f32(y, v, out);
            }
        }
        x.copy_from_slice(out);
    }

    /// One stored row to its coordinates in the basis: as stored (each group at its norm), or
    /// `unbiased` as attention reads it (`Group::read_lut`).
    fn decode(&self, src: &[u8], out: &mut [f32], unbiased: bool) {
        let n = self.groups.len();
        let mut bits = Bits::new(&src[2 * n..]);
        for (j, grp) in self.groups.iter().enumerate() {
            let alpha = f16::from_le_bytes([src[2 * j], src[2 * j + 1]]).to_f32();
            let lut = if unbiased { &grp.read_lut } else { &grp.lut };
            for o in &mut out[grp.start..grp.start + grp.len] {
                *o = alpha * lut[bits.take(grp.width as u32)];
            }
        }
        let coded = self.groups.last().map_or(0, |g| g.start + g.len);
        out[coded..].fill(0.0);
    }
}

/// Most groups a fit makes (widths bits − 1 ..= bits + 1), as the GPU kernels take them.
pub const MAX_GROUPS: usize = 3;

/// Floats of one head's GPU table at head dim `d` (codec.cuh's `spec_table`).
pub fn table_len(d: usize) -> usize {
    d + 32 * 2 * MAX_GROUPS + 4 * MAX_GROUPS + 4
}

/// One head's fit as the GPU kernels read it (kernels/cuda/codec.cuh, "SpectralQuant"): the
/// basis `vt` [d, d] and a table of [`table_len`] floats: per stored coordinate a descriptor
/// (u32 bits: bit position in the row, width << 16, group << 20), then per group its scaled
/// centroids (32 slots), then its N(0, 1) decision points (32 slots), then per group (start,
/// len, width, 0) and the group count (u32 bits). `read_table` is `table` with the groups'
/// centroids as attention reads them (`Group::read_lut`); quantizing takes `table`.
pub struct HeadBasis {
    pub vt: Vec<f32>,
    pub table: Vec<f32>,
    pub read_table: Vec<f32>,
}

impl Fit {
    fn head_basis(&self, d: usize) -> Option<HeadBasis> {
        if self.groups.len() > MAX_GROUPS {
            return None;
        }
        let mut table = vec![0f32; table_len(d)];
        let bits = |x: usize| f32::from_bits(x as u32);
        let mut bit = 16 * self.groups.len();
        for (j, g) in self.groups.iter().enumerate() {
            for desc in &mut table[g.start..g.start + g.len] {
                *desc = bits(bit | (g.width as usize) << 16 | j << 20);
                bit += g.width as usize;
            }
            let lut = d + 32 * j;
            table[lut..lut + g.lut.len()].copy_from_slice(&g.lut);
            let mids = &lloyd_max::normal(g.width as u32).mids;
            let at = d + 32 * (MAX_GROUPS + j);
            table[at..at + mids.len()].copy_from_slice(mids);
            let meta = d + 64 * MAX_GROUPS + 4 * j;
            table[meta] = bits(g.start);
            table[meta + 1] = bits(g.len);
            table[meta + 2] = bits(g.width as usize);
        }
        table[d + 64 * MAX_GROUPS + 4 * MAX_GROUPS] = bits(self.groups.len());
        let mut read_table = table.clone();
        for (j, g) in self.groups.iter().enumerate() {
            read_table[d + 32 * j..][..g.read_lut.len()].copy_from_slice(&g.read_lut);
        }
        Some(HeadBasis {
            vt: self.vt.clone(),
            table,
            read_table,
        })
    }
}

/// Starts every direction at `lo` bits and gives the rest of `budget` one bit at a time, up to
/// `hi`, to the direction whose expected squared error `λ_i · D(b_i)` drops most; D is the
/// N(0, 1) Lloyd–Max error at b bits.
fn water_fill(budget: usize, lambda: &[f64], lo: u8, hi: u8) -> Vec<u8> {
    let mut widths = vec![lo; lambda.len()];
    for _ in 0..budget.saturating_sub(lo as usize * lambda.len()) {
        let gain = |i: usize| {
            let b = widths[i] as u32;
            lambda[i] * (lloyd_max::normal_mse(b) - lloyd_max::normal_mse(b + 1))
        };
        let best = (0..lambda.len())
            .filter(|&i| widths[i] < hi)
            .max_by(|&a, &b| gain(a).total_cmp(&gain(b)));
        match best {
            Some(i) => widths[i] += 1,
            None => break,
        }
    }
    widths
}

/// LSB-first bit reader over packed codes.
struct Bits<'a> {
    src: &'a [u8],
    buf: u64,
    have: u32,
}

impl<'a> Bits<'a> {
    fn new(src: &'a [u8]) -> Self {
        Self {
            src,
            buf: 0,
            have: 0,
        }
    }

    #[inline]
    fn take(&mut self, n: u32) -> usize {
        while self.have < n {
            self.buf |= (self.src[0] as u64) << self.have;
            self.src = &self.src[1..];
            self.have += 8;
        }
        let v = self.buf & ((1u64 << n) - 1);
        self.buf >>= n;
        self.have -= n;
        v as usize
    }
}

impl<const BITS: u32> Spectral<BITS> {
    fn fitted(&self, d: usize) -> &Fit {
        match &self.fit {
            Some(f) => f,
            None => Fit::uniform(BITS, d),
        }
    }
}

impl<const BITS: u32> KvCodec for Spectral<BITS> {
    /// Whole bytes of codes for any bit width.
    fn block_size(&self) -> usize {
        8
    }

    fn bytes_per_row(&self, head_dim: usize) -> usize {
        2 + BITS as usize * head_dim / 8
    }

    fn rotates(&self) -> bool {
        true
    }

    fn needs_spectrum(&self) -> bool {
        true
    }

    fn fit(&self, spectrum: &Spectrum) -> Option<Box<dyn KvCodec>> {
        let fit = Fit::new(BITS, &spectrum.eigenvalues, Some(&spectrum.vt));
        Some(Box::new(Self {
            fit: Some(Arc::new(fit)),
        }))
    }

    /// The fitted basis and tables (the identity fit is shared by all, so counts nothing).
    fn state_bytes(&self) -> usize {
        self.fit.as_ref().map_or(0, |f| {
            4 * (f.vt.len() + f.groups.iter().map(|g| 2 * g.lut.len()).sum::<usize>())
        })
    }

    fn quantize_row(&self, src: &[f32], dst: &mut [u8]) {
        let d = src.len();
        let fit = self.fitted(d);
        let mut y = [0f32; MAX_HEAD_DIM];
        let y = &mut y[..d];
        fit.forward(src, y);
        dst.fill(0);
        let n = fit.groups.len();
        let (head, codes) = dst.split_at_mut(2 * n);
        let mut pos = 0usize;
        for (j, grp) in fit.groups.iter().enumerate() {
            let seg = &y[grp.start..grp.start + grp.len];
            let norm = seg.iter().map(|v| v * v).sum::<f32>().sqrt();
            let inv = if norm > 1e-10 { 1.0 / norm } else { 0.0 };
            let cb = lloyd_max::normal(grp.width as u32);
            let root = (grp.len as f32).sqrt();
            let mut energy = 0f32;
            for &v in seg {
                let k = cb.index(v * inv * root) as usize;
                energy += grp.lut[k] * grp.lut[k];
                for b in 0..grp.width as usize {
                    if k >> b & 1 == 1 {
                        codes[(pos + b) / 8] |= 1 << ((pos + b) % 8);
                    }
                }
                pos += grp.width as usize;
            }
            // The decoded unit group keeps the group's length, as turbo's norm correction.
            let alpha = if energy > 0.0 {
                norm / energy.sqrt()
            } else {
                0.0
            };
            head[2 * j..2 * j + 2].copy_from_slice(&f16::from_f32(alpha).to_le_bytes());
        }
    }

    fn dequantize_row(&self, src: &[u8], dst: &mut [f32]) {
        let fit = self.fitted(dst.len());
        fit.decode(src, dst, false);
        fit.inverse(dst);
    }

    fn decode_rows(&self, head_dim: usize, rows: &[u8], out: &mut [f32]) {
        let fit = self.fitted(head_dim);
        let rb = self.bytes_per_row(head_dim);
        for (row, o) in rows.chunks_exact(rb).zip(out.chunks_exact_mut(head_dim)) {
            fit.decode(row, o, true);
        }
    }

    fn head_basis(&self, head_dim: usize) -> Option<HeadBasis> {
        self.fitted(head_dim).head_basis(head_dim)
    }

    fn prepare_query(&self, q: &[f32], out: &mut [f32]) {
        self.fitted(q.len()).forward(q, out);
    }

    fn finish_output(&self, acc: &mut [f32]) {
        self.fitted(acc.len()).inverse(acc);
    }
}

#[cfg(test)]
mod tests {
    use super::super::turbo::tests::check_codec;
    use super::*;

    /// Uncalibrated, the codec is a plain scalar quantizer: no rotation spreads the outlier
    /// channels of these rows, so it is far behind turbo on them (4 bits: 0.08 vs 0.02).
    #[test]
    fn uniform_spectral_round_trips() {
        check_codec(&Spectral4Codec::default(), 0.08);
        check_codec(&Spectral3Codec::default(), 0.15);
    }

    #[test]
    fn equal_eigenvalues_make_one_group_and_skewed_ones_favour_the_top() {
        let flat = Fit::new(4, &[1.0; 64], None);
        assert_eq!(flat.groups.len(), 1);
        assert_eq!((flat.groups[0].len, flat.groups[0].width), (64, 4));
        let skewed: Vec<f32> = (0..128).map(|i| 0.8f32.powi(i)).collect();
        let fit = Fit::new(3, &skewed, None);
        let code_bits: usize = fit.groups.iter().map(|g| g.len * g.width as usize).sum();
        // codes and the extra group norms fill the row's budget, never more
        let norm_bits = 16 * (fit.groups.len() - 1);
        assert!(
            code_bits + norm_bits <= 3 * 128,
            "{code_bits} + {norm_bits}"
        );
        assert!(code_bits + norm_bits > 3 * 128 - 16);
        let widths: Vec<u8> = fit.groups.iter().map(|g| g.width).collect();
        assert_eq!(
            widths,
            [4, 3, 2],
            "top directions get a bit more, the flattest a bit less"
        );
    }

    /// The GPU's tables read a row as `decode` does, as stored and as attention reads it: each
    /// coordinate's descriptor finds its code, width and group scale, and the groups' ranges and
    /// decision points are the fit's.
    #[test]
    fn head_basis_table_reads_rows_as_decode_does() {
        let d = 128;
        let skewed: Vec<f32> = (0..d).map(|i| 0.8f32.powi(i as i32)).collect();
        let fit = Arc::new(Fit::new(3, &skewed, None));
        assert_eq!(fit.groups.len(), 3);
        let codec = Spectral3Codec {
            fit: Some(fit.clone()),
        };
        let basis = codec.head_basis(d).unwrap();
        let t = &basis.table;
        assert_eq!((basis.vt.len(), t.len()), (d * d, table_len(d)));
        let meta = d + 64 * MAX_GROUPS;
        assert_eq!(t[meta + 4 * MAX_GROUPS].to_bits(), 3);
        for (j, g) in fit.groups.iter().enumerate() {
            let m: Vec<u32> = t[meta + 4 * j..meta + 4 * j + 3]
                .iter()
                .map(|x| x.to_bits())
                .collect();
            assert_eq!(m, [g.start as u32, g.len as u32, g.width as u32]);
            let mids = &lloyd_max::normal(g.width as u32).mids;
            let at = d + 32 * (MAX_GROUPS + j);
            assert_eq!(&t[at..at + mids.len()], &mids[..]);
        }
        let mut rng = SplitMix(4);
        for _ in 0..20 {
            let x: Vec<f32> = (0..d).map(|_| rng.gaussian() as f32).collect();
            let mut row = vec![0u8; codec.bytes_per_row(d) + 1];
            codec.quantize_row(&x, &mut row[..codec.bytes_per_row(d)]);
            for (table, unbiased) in [(t, false), (&basis.read_table, true)] {
                let mut want = vec![0f32; d];
                fit.decode(&row, &mut want, unbiased);
                for (v, &w) in want.iter().enumerate() {
                    let desc = table[v].to_bits();
                    let (bit, width) = (desc & 0xffff, desc >> 16 & 15);
                    let grp = (desc >> 20) as usize;
                    let at = bit as usize / 8;
                    let code = ((row[at] as u32 | (row[at + 1] as u32) << 8) >> (bit % 8))
                        & ((1 << width) - 1);
                    let alpha = f16::from_le_bytes([row[2 * grp], row[2 * grp + 1]]).to_f32();
                    let got = alpha * table[d + 32 * grp + code as usize];
                    assert_eq!(got, w, "coordinate {v}, unbiased {unbiased}");
                }
            }
        }
    }

    /// Stored groups keep their norms, so they read back short of the true values by each
    /// group's shrink √(1 − D_w); attention's reading (`decode_rows`) divides it out per group:
    /// slope 1 against the true rows, where the stored reading's slope is below 1.
    #[test]
    fn attention_reads_each_group_unbiased() {
        let d = 128;
        let skewed: Vec<f32> = (0..d).map(|i| 0.97f32.powi(i as i32)).collect();
        let fit = Arc::new(Fit::new(3, &skewed, None));
        assert!(fit.groups.len() > 1);
        let codec = Spectral3Codec { fit: Some(fit) };
        let mut rng = SplitMix(21);
        let (mut read_xy, mut stored_xy, mut xx) = (0f64, 0f64, 0f64);
        let mut row = vec![0u8; codec.bytes_per_row(d)];
        let (mut read, mut stored) = (vec![0f32; d], vec![0f32; d]);
        for _ in 0..2000 {
            let x: Vec<f32> = skewed
                .iter()
                .map(|l| l.sqrt() * rng.gaussian() as f32)
                .collect();
            codec.quantize_row(&x, &mut row);
            codec.decode_rows(d, &row, &mut read);
            codec.finish_output(&mut read);
            codec.dequantize_row(&row, &mut stored);
            let dot = |y: &[f32]| x.iter().zip(y).map(|(a, b)| (a * b) as f64).sum::<f64>();
            read_xy += dot(&read);
            stored_xy += dot(&stored);
            xx += dot(&x);
        }
        let (read, stored) = (read_xy / xx, stored_xy / xx);
        assert!(
            (read - 1.0).abs() < 0.004,
            "attention's reading: slope {read}"
        );
        assert!(stored < 0.99, "stored reading: slope {stored}");
    }

    /// Rows with most of their energy in a few directions (a rotated, steeply decaying spectrum,
    /// as real keys have): fitted to their spectrum, spectral4 beats the uniform quantizer and
    /// its fused dot equals dequantize-then-dot.
    #[test]
    fn fitted_basis_beats_uniform_on_anisotropic_rows() {
        let d = 64;
        let mut rng = SplitMix(11);
        let mut gauss = |n: usize| -> Vec<Vec<f32>> {
            (0..n)
                .map(|_| {
                    (0..d)
                        .map(|_| ((0..12).map(|_| rng.next_f64()).sum::<f64>() - 6.0) as f32)
                        .collect()
                })
                .collect()
        };
        let data = gauss(4096);
        // A random orthogonal basis: Gram–Schmidt on pseudo-random rows.
        let mut basis = gauss(d);
        for i in 0..d {
            for j in 0..i {
                let p: f32 = (0..d).map(|c| basis[i][c] * basis[j][c]).sum();
                let bj = basis[j].clone();
                for (a, b) in basis[i].iter_mut().zip(bj) {
                    *a -= p * b;
                }
            }
            let n = basis[i].iter().map(|x| x * x).sum::<f32>().sqrt();
            basis[i].iter_mut().for_each(|x| *x /= n);
        }
        let sd: Vec<f32> = (0..d).map(|i| 0.85f32.powi(i as i32)).collect();
        let anis: Vec<Vec<f32>> = data
            .iter()
            .map(|r| {
                let mut x = vec![0f32; d];
                for (i, b) in basis.iter().enumerate() {
                    super::super::axpy_f32(r[i] * sd[i], b, &mut x);
                }
                x
            })
            .collect();
        let spectrum = Spectrum {
            eigenvalues: sd.iter().map(|s| s * s).collect(),
            vt: Arc::new(basis.concat()),
        };
        let fitted = Spectral4Codec::default().fit(&spectrum).unwrap();
        let uniform = Spectral4Codec::default();
        let nmse = |c: &dyn KvCodec| {
            let (mut err, mut tot) = (0f64, 0f64);
            let mut buf = vec![0u8; c.bytes_per_row(d)];
            let mut back = vec![0f32; d];
            for x in &anis {
                c.quantize_row(x, &mut buf);
                c.dequantize_row(&buf, &mut back);
                err += x
                    .iter()
                    .zip(&back)
                    .map(|(a, b)| ((a - b) as f64).powi(2))
                    .sum::<f64>();
                tot += x.iter().map(|a| (*a as f64).powi(2)).sum::<f64>();
            }
            err / tot
        };
        let (f, u) = (nmse(fitted.as_ref()), nmse(&uniform));
        assert!(f < 0.5 * u, "fitted {f} vs uniform {u}");
        // Fused paths work in the basis and read the row as `decode_rows` does, back through
        // the basis.
        let mut row = vec![0u8; fitted.bytes_per_row(d)];
        fitted.quantize_row(&anis[5], &mut row);
        let mut y = vec![0f32; d];
        fitted.decode_rows(d, &row, &mut y);
        fitted.finish_output(&mut y);
        let q = &anis[9];
        let mut qr = vec![0f32; d];
        fitted.prepare_query(q, &mut qr);
        let want: f32 = q.iter().zip(&y).map(|(a, b)| a * b).sum();
        let got = fitted.dot(&qr, &row);
        assert!(
            (want - got).abs() < 1e-3 * (1.0 + want.abs()),
            "{want} vs {got}"
        );
        let mut acc = vec![0f32; d];
        fitted.axpy(0.5, &row, &mut acc);
        fitted.finish_output(&mut acc);
        for (a, b) in acc.iter().zip(&y) {
            assert!((a - 0.5 * b).abs() < 1e-4);
        }
    }
}

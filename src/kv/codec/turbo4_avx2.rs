//! turbo4 rows read in place with AVX2 (hosts without AVX-512): scores and V sums straight from
//! the packed nibbles. Each 32 values are unpacked once into four 8-lane index vectors, looked
//! up in the 16-entry codebook (two 8-lane permutes and a blend on the index's top bit) and
//! used by up to four queries while in registers. The generic path decodes a tile of rows to
//! f32 first and reads it back once per query, which on AVX2 cost more than the lookups
//! themselves (docs/PERFORMANCE.md, "turbo4 at depth on AVX2").
//!
//! Rows: groups of `g` values (64 or 128), each an f16 norm, `header − 2` reserved bytes, then
//! g/2 index bytes, low nibble first ([`super::turbo4`]). Scores and sums are in the rotated
//! domain, like the tile path's; only the order of the float additions differs.

use std::arch::x86_64::*;

use half::f16;

/// Queries (or V accumulators) served by one pass over the rows.
const BLOCK: usize = 4;

/// Most queries for which reading in place beats the tile path, which decodes each row once
/// for any number of queries: a decode step's GQA group (up to 8 on the models we ship), not a
/// prefill block (16 positions × the group).
pub const MAX_QUERIES: usize = 2 * BLOCK;

/// Geometry of a turbo4 row of `hd` values in groups of `g`, `header` bytes before each group's
/// indices.
#[derive(Clone, Copy)]
pub struct Rows {
    pub hd: usize,
    pub g: usize,
    pub header: usize,
}

impl Rows {
    fn group_bytes(self) -> usize {
        self.header + self.g / 2
    }

    fn row_bytes(self) -> usize {
        self.hd / self.g * self.group_bytes()
    }
}

/// Indices of 32 consecutive values from their 16 packed bytes, as four vectors of 8 lanes.
#[inline(always)]
unsafe fn indices32(p: *const u8) -> [__m256i; 4] {
    // SAFETY: the caller guarantees 16 readable bytes at p.
    unsafe {
        let b = _mm_loadu_si128(p as *const __m128i);
        let m = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(b, m);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(b), m);
        // values 0..16 and 16..32: each byte's low nibble, then its high nibble
        let a = _mm_unpacklo_epi8(lo, hi);
        let c = _mm_unpackhi_epi8(lo, hi);
        [
            _mm256_cvtepu8_epi32(a),
            _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(a)),
            _mm256_cvtepu8_epi32(c),
            _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(c)),
        ]
    }
}

/// The codebook entries at `idx` (0..16): `lo` holds entries 0..8, `hi` 8..16; bit 3 of the
/// index, shifted to the sign bit, picks the half.
#[inline(always)]
unsafe fn lookup(lo: __m256, hi: __m256, idx: __m256i) -> __m256 {
    // SAFETY: register operations only; AVX2 is enabled by the callers.
    unsafe {
        let upper = _mm256_castsi256_ps(_mm256_slli_epi32::<28>(idx));
        _mm256_blendv_ps(
            _mm256_permutevar8x32_ps(lo, idx),
            _mm256_permutevar8x32_ps(hi, idx),
            upper,
        )
    }
}

#[inline(always)]
unsafe fn norm_at(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees 2 readable bytes at p.
    f16::from_bits(unsafe { (p as *const u16).read_unaligned() }).to_f32()
}

/// The horizontal sums of four vectors, in order.
#[inline(always)]
unsafe fn hsum4(a: &[__m256; BLOCK]) -> __m128 {
    // SAFETY: register operations only.
    unsafe {
        let t = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps::<1>(t))
    }
}

/// `scores[i·n + j] = <qs[i], row j>` for queries `qs` [m, hd] (rotated) and the `n` rows of
/// `rows`, with the codebook `table`.
///
/// # Safety
/// AVX2 and FMA must be present; `rows` holds whole rows of this geometry, `scores` m·n values.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_rows(geom: Rows, table: &[f32; 16], qs: &[f32], rows: &[u8], scores: &mut [f32]) {
    let m = qs.len() / geom.hd;
    let mut i = 0;
    while i < m {
        let qb = (m - i).min(BLOCK);
        let q = &qs[i * geom.hd..(i + qb) * geom.hd];
        // SAFETY: as this function's contract; q holds qb queries.
        unsafe {
            match qb {
                1 => dot_block::<1>(geom, table, q, rows, scores, i),
                2 => dot_block::<2>(geom, table, q, rows, scores, i),
                3 => dot_block::<3>(geom, table, q, rows, scores, i),
                _ => dot_block::<4>(geom, table, q, rows, scores, i),
            }
        }
        i += qb;
    }
}

/// [`dot_rows`] for `QB` queries `q` [QB, hd], the first being query `first` of `scores`.
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_block<const QB: usize>(
    geom: Rows,
    table: &[f32; 16],
    q: &[f32],
    rows: &[u8],
    scores: &mut [f32],
    first: usize,
) {
    let (rb, gb) = (geom.row_bytes(), geom.group_bytes());
    let n = rows.len() / rb;
    // SAFETY: every row read lies inside `rows` (n whole rows of rb bytes, groups of gb), every
    // query load inside `q` (QB rows of hd), every score store below (first + QB)·n.
    unsafe {
        let lo = _mm256_loadu_ps(table.as_ptr());
        let hi = _mm256_loadu_ps(table.as_ptr().add(8));
        let qp = q.as_ptr();
        for j in 0..n {
            let row = rows.as_ptr().add(j * rb);
            let mut total = [_mm256_setzero_ps(); BLOCK];
            for (grp, c0) in (0..geom.hd).step_by(geom.g).enumerate() {
                let gp = row.add(grp * gb);
                let mut acc = [_mm256_setzero_ps(); BLOCK];
                for piece in (0..geom.g).step_by(32) {
                    let idx = indices32(gp.add(geom.header + piece / 2));
                    for (l, ix) in idx.iter().enumerate() {
                        let v = lookup(lo, hi, *ix);
                        let c = c0 + piece + 8 * l;
                        for (r, a) in acc.iter_mut().enumerate().take(QB) {
                            *a = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(r * geom.hd + c)), v, *a);
                        }
                    }
                }
                let norm = _mm256_set1_ps(norm_at(gp));
                for (t, a) in total.iter_mut().zip(&acc).take(QB) {
                    *t = _mm256_fmadd_ps(*a, norm, *t);
                }
            }
            let mut s = [0f32; BLOCK];
            _mm_storeu_ps(s.as_mut_ptr(), hsum4(&total));
            for (r, v) in s.iter().enumerate().take(QB) {
                scores[(first + r) * n + j] = *v;
            }
        }
    }
}

/// `acc[i] += Σ_j w[i·n + j] · row j` for `m` accumulators `acc` [m, hd] (rotated domain) and
/// the `n` rows of `rows`, with the codebook `table`.
///
/// # Safety
/// AVX2 and FMA must be present; `rows` holds whole rows of this geometry, `w` m·n weights.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn axpy_rows(geom: Rows, table: &[f32; 16], w: &[f32], rows: &[u8], acc: &mut [f32]) {
    let m = acc.len() / geom.hd;
    let n = rows.len() / geom.row_bytes();
    let mut i = 0;
    while i < m {
        let qb = (m - i).min(BLOCK);
        let (wb, ab) = (
            &w[i * n..(i + qb) * n],
            &mut acc[i * geom.hd..(i + qb) * geom.hd],
        );
        // SAFETY: as this function's contract; wb and ab hold qb rows each.
        unsafe {
            match qb {
                1 => axpy_block::<1>(geom, table, wb, rows, ab),
                2 => axpy_block::<2>(geom, table, wb, rows, ab),
                3 => axpy_block::<3>(geom, table, wb, rows, ab),
                _ => axpy_block::<4>(geom, table, wb, rows, ab),
            }
        }
        i += qb;
    }
}

/// Rows per pass of [`axpy_block`]: its 16-column steps each walk the pass's rows again, so a
/// pass must stay in L1 (64 rows of head_dim 256 are 8.7 KiB). Walking a whole slice per step
/// read it from L2 or beyond once per 16 columns (gemma-3's 256-wide heads: 16 times).
const AXPY_ROWS: usize = 64;

/// [`axpy_rows`] for `QB` accumulators: for each pass of [`AXPY_ROWS`] rows, 16 columns at a
/// time, their `QB` accumulators held in registers over the pass's rows.
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_block<const QB: usize>(
    geom: Rows,
    table: &[f32; 16],
    w: &[f32],
    rows: &[u8],
    acc: &mut [f32],
) {
    let (rb, gb) = (geom.row_bytes(), geom.group_bytes());
    let n = rows.len() / rb;
    // SAFETY: row reads stay inside `rows` (8 index bytes at a 16-column step of a group), weight
    // reads below QB·n, accumulator loads and stores inside QB rows of hd.
    unsafe {
        let lo = _mm256_loadu_ps(table.as_ptr());
        let hi = _mm256_loadu_ps(table.as_ptr().add(8));
        let m4 = _mm_set1_epi8(0x0F);
        let ap = acc.as_mut_ptr();
        for j0 in (0..n).step_by(AXPY_ROWS) {
            for c in (0..geom.hd).step_by(16) {
                let (grp, in_grp) = (c / geom.g, c % geom.g);
                let mut a = [[_mm256_setzero_ps(); 2]; BLOCK];
                for (r, ar) in a.iter_mut().enumerate().take(QB) {
                    ar[0] = _mm256_loadu_ps(ap.add(r * geom.hd + c));
                    ar[1] = _mm256_loadu_ps(ap.add(r * geom.hd + c + 8));
                }
                for j in j0..(j0 + AXPY_ROWS).min(n) {
                    let gp = rows.as_ptr().add(j * rb + grp * gb);
                    let norm = norm_at(gp);
                    let b = _mm_loadl_epi64(gp.add(geom.header + in_grp / 2) as *const __m128i);
                    let x = _mm_unpacklo_epi8(
                        _mm_and_si128(b, m4),
                        _mm_and_si128(_mm_srli_epi16::<4>(b), m4),
                    );
                    let v0 = lookup(lo, hi, _mm256_cvtepu8_epi32(x));
                    let v1 = lookup(lo, hi, _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(x)));
                    for (r, ar) in a.iter_mut().enumerate().take(QB) {
                        let wj = _mm256_set1_ps(*w.get_unchecked(r * n + j) * norm);
                        ar[0] = _mm256_fmadd_ps(wj, v0, ar[0]);
                        ar[1] = _mm256_fmadd_ps(wj, v1, ar[1]);
                    }
                }
                for (r, ar) in a.iter().enumerate().take(QB) {
                    _mm256_storeu_ps(ap.add(r * geom.hd + c), ar[0]);
                    _mm256_storeu_ps(ap.add(r * geom.hd + c + 8), ar[1]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The in-place reads agree with unpack-then-lookup row by row, for every group width and
    /// query count up to two blocks.
    #[test]
    fn in_place_reads_match_decoded_rows() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            return;
        }
        let table: [f32; 16] = std::array::from_fn(|i| (i as f32 - 7.5) * 0.03);
        for (hd, g, header) in [(64, 64, 2), (128, 128, 4), (256, 128, 4)] {
            let geom = Rows { hd, g, header };
            let (n, rb) = (137, geom.row_bytes());
            let mut rows: Vec<u8> = (0..n * rb).map(|i| (i * 151 + 7) as u8).collect();
            for (k, grp) in rows.chunks_mut(geom.group_bytes()).enumerate() {
                grp[..2].copy_from_slice(&f16::from_f32(0.5 + 0.01 * k as f32).to_le_bytes());
            }
            // the decoded rows: norm · table[code], group by group
            let mut dec = vec![0f32; n * hd];
            for (row, out) in rows.chunks(rb).zip(dec.chunks_mut(hd)) {
                for (grp, o) in row.chunks(geom.group_bytes()).zip(out.chunks_mut(g)) {
                    let norm = f16::from_le_bytes([grp[0], grp[1]]).to_f32();
                    for (k, v) in o.iter_mut().enumerate() {
                        let b = grp[header + k / 2];
                        *v = norm * table[((b >> (4 * (k % 2))) & 15) as usize];
                    }
                }
            }
            for m in 1..=8 {
                let qs: Vec<f32> = (0..m * hd).map(|i| (i as f32 * 0.37).sin()).collect();
                let mut scores = vec![0f32; m * n];
                // SAFETY: AVX2 and FMA checked above; rows are whole.
                unsafe { dot_rows(geom, &table, &qs, &rows, &mut scores) };
                let w: Vec<f32> = (0..m * n).map(|i| (i as f32 * 0.05).cos()).collect();
                let mut acc = vec![0.25f32; m * hd];
                // SAFETY: as above.
                unsafe { axpy_rows(geom, &table, &w, &rows, &mut acc) };
                for i in 0..m {
                    let q = &qs[i * hd..(i + 1) * hd];
                    let mut want_acc = vec![0.25f32; hd];
                    for j in 0..n {
                        let k = &dec[j * hd..(j + 1) * hd];
                        let want: f32 = q.iter().zip(k).map(|(a, b)| a * b).sum();
                        let got = scores[i * n + j];
                        assert!(
                            (want - got).abs() < 1e-4 * (1.0 + want.abs()),
                            "{want} {got}"
                        );
                        for (a, v) in want_acc.iter_mut().zip(k) {
                            *a += w[i * n + j] * v;
                        }
                    }
                    for (a, b) in acc[i * hd..(i + 1) * hd].iter().zip(&want_acc) {
                        assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{a} {b}");
                    }
                }
            }
        }
    }
}

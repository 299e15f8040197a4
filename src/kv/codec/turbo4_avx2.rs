//! turbo4 rows read in place with AVX2 (hosts without AVX-512): scores and V sums straight from
//! the packed nibbles. Each 32 values' indices are looked up in the 16-entry codebook with
//! byte shuffles (`vpshufb` over the entries' four byte planes: 15 instructions for 32 values)
//! and used by up to four queries while in registers. The generic path decodes a tile of rows to
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

/// The codebook as four byte planes (byte k of each of the 16 entries), each in both 128-bit
/// lanes: `vpshufb` on a vector of indices gives byte k of every index's entry, so four
/// shuffles and two rounds of byte/word interleaves turn 32 indices into 32 entries.
struct Planes([__m256i; 4]);

impl Planes {
    #[inline(always)]
    unsafe fn new(table: &[f32; 16]) -> Self {
        let mut p = [[0u8; 16]; 4];
        for (i, v) in table.iter().enumerate() {
            for (k, b) in v.to_le_bytes().into_iter().enumerate() {
                p[k][i] = b;
            }
        }
        // SAFETY: 16 readable bytes per plane; register operations otherwise.
        Self(p.map(|x| unsafe {
            _mm256_broadcastsi128_si256(_mm_loadu_si128(x.as_ptr() as *const __m128i))
        }))
    }
}

/// The lane order of the vectors [`entries32`] and [`entries16`] give: lane e of each holds
/// value `PERM[e]` of its 8 (even values in the low half, odd in the high). As a
/// `vpermps` index it puts a vector in natural order into this one; `NATURAL` puts it back.
const PERM: [i32; 8] = [0, 2, 4, 6, 1, 3, 5, 7];
const NATURAL: [i32; 8] = [0, 4, 1, 5, 2, 6, 3, 7];

/// Index bytes in `b` (both lanes the same packed bytes) as the low lane's low nibbles (the
/// even values) and the high lane's high nibbles (the odd ones).
#[inline(always)]
unsafe fn split_nibbles(b: __m256i) -> __m256i {
    // SAFETY: register operations only.
    unsafe {
        _mm256_and_si256(
            _mm256_srlv_epi64(b, _mm256_set_epi64x(4, 4, 0, 0)),
            _mm256_set1_epi8(0x0F),
        )
    }
}

/// The entries of 32 consecutive values from their 16 packed bytes at `p`, 8 values a vector
/// in [`PERM`] order.
#[inline(always)]
unsafe fn entries32(pl: &Planes, p: *const u8) -> [__m256; 4] {
    // SAFETY: the caller guarantees 16 readable bytes at p; register operations otherwise.
    unsafe {
        let idx = split_nibbles(_mm256_broadcastsi128_si256(_mm_loadu_si128(
            p as *const __m128i,
        )));
        let [b0, b1, b2, b3] = pl.0.map(|t| _mm256_shuffle_epi8(t, idx));
        let (w01, w23) = (_mm256_unpacklo_epi8(b0, b1), _mm256_unpacklo_epi8(b2, b3));
        let (x01, x23) = (_mm256_unpackhi_epi8(b0, b1), _mm256_unpackhi_epi8(b2, b3));
        [
            _mm256_castsi256_ps(_mm256_unpacklo_epi16(w01, w23)),
            _mm256_castsi256_ps(_mm256_unpackhi_epi16(w01, w23)),
            _mm256_castsi256_ps(_mm256_unpacklo_epi16(x01, x23)),
            _mm256_castsi256_ps(_mm256_unpackhi_epi16(x01, x23)),
        ]
    }
}

/// The entries of 16 consecutive values from their 8 packed bytes at `p`, as [`entries32`].
#[inline(always)]
unsafe fn entries16(pl: &Planes, p: *const u8) -> [__m256; 2] {
    // SAFETY: the caller guarantees 8 readable bytes at p; register operations otherwise.
    unsafe {
        let idx = split_nibbles(_mm256_set1_epi64x((p as *const i64).read_unaligned()));
        let [b0, b1, b2, b3] = pl.0.map(|t| _mm256_shuffle_epi8(t, idx));
        let (w01, w23) = (_mm256_unpacklo_epi8(b0, b1), _mm256_unpacklo_epi8(b2, b3));
        [
            _mm256_castsi256_ps(_mm256_unpacklo_epi16(w01, w23)),
            _mm256_castsi256_ps(_mm256_unpackhi_epi16(w01, w23)),
        ]
    }
}

/// `x` with its lanes taken in the order `at` names.
#[inline(always)]
unsafe fn permute(x: __m256, at: &[i32; 8]) -> __m256 {
    // SAFETY: 8 readable lanes at `at`; register operations otherwise.
    unsafe { _mm256_permutevar8x32_ps(x, _mm256_loadu_si256(at.as_ptr() as *const __m256i)) }
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
    // the queries with each 8 values in the entries' lane order (PERM)
    let mut permuted = [0f32; BLOCK * super::MAX_HEAD_DIM];
    let mut i = 0;
    while i < m {
        let qb = (m - i).min(BLOCK);
        let q = &mut permuted[..qb * geom.hd];
        for (dst, src) in q
            .chunks_exact_mut(8)
            .zip(qs[i * geom.hd..(i + qb) * geom.hd].chunks_exact(8))
        {
            for (d, &at) in dst.iter_mut().zip(&PERM) {
                *d = src[at as usize];
            }
        }
        let q = &*q;
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

/// [`dot_rows`] for `QB` queries `q` [QB, hd] (each 8 values in [`PERM`] order), the first
/// being query `first` of `scores`. A lane sums the same products in the same order as it would
/// with both in natural order, and the row's totals are put back in natural order before their
/// horizontal sums: the scores are those of a natural-order walk, bit for bit.
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
        let planes = Planes::new(table);
        let qp = q.as_ptr();
        for j in 0..n {
            let row = rows.as_ptr().add(j * rb);
            let mut total = [_mm256_setzero_ps(); BLOCK];
            for (grp, c0) in (0..geom.hd).step_by(geom.g).enumerate() {
                let gp = row.add(grp * gb);
                let mut acc = [_mm256_setzero_ps(); BLOCK];
                for piece in (0..geom.g).step_by(32) {
                    let vs = entries32(&planes, gp.add(geom.header + piece / 2));
                    for (l, &v) in vs.iter().enumerate() {
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
            for t in total.iter_mut().take(QB) {
                *t = permute(*t, &NATURAL);
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

/// Most groups a row has (`MAX_HEAD_DIM` / 64).
const MAX_GROUPS: usize = super::MAX_HEAD_DIM / 64;

/// [`axpy_rows`] for `QB` accumulators: for each pass of [`AXPY_ROWS`] rows, first every
/// weight times its row's group norm (the products the column steps would otherwise each take
/// again), then 16 columns at a time, their `QB` accumulators held in registers over the pass's
/// rows.
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
    let groups = geom.hd / geom.g;
    assert!(groups <= MAX_GROUPS);
    // [group][accumulator][row of the pass]
    let mut wn = [0f32; MAX_GROUPS * BLOCK * AXPY_ROWS];
    // SAFETY: row reads stay inside `rows` (a group's norm; 8 index bytes at a 16-column step
    // of a group), weight reads below QB·n, `wn` indices below groups·BLOCK·AXPY_ROWS,
    // accumulator loads and stores inside QB rows of hd.
    unsafe {
        let planes = Planes::new(table);
        let ap = acc.as_mut_ptr();
        for j0 in (0..n).step_by(AXPY_ROWS) {
            let len = AXPY_ROWS.min(n - j0);
            for grp in 0..groups {
                for j in 0..len {
                    let norm = norm_at(rows.as_ptr().add((j0 + j) * rb + grp * gb));
                    for r in 0..QB {
                        *wn.get_unchecked_mut((grp * BLOCK + r) * AXPY_ROWS + j) =
                            *w.get_unchecked(r * n + j0 + j) * norm;
                    }
                }
            }
            for c in (0..geom.hd).step_by(16) {
                let (grp, in_grp) = (c / geom.g, c % geom.g);
                let mut a = [[_mm256_setzero_ps(); 2]; BLOCK];
                // in the entries' lane order over the pass (the same sums, lane for lane)
                for (r, ar) in a.iter_mut().enumerate().take(QB) {
                    ar[0] = permute(_mm256_loadu_ps(ap.add(r * geom.hd + c)), &PERM);
                    ar[1] = permute(_mm256_loadu_ps(ap.add(r * geom.hd + c + 8)), &PERM);
                }
                let wg = wn.as_ptr().add(grp * BLOCK * AXPY_ROWS);
                let mut gp = rows
                    .as_ptr()
                    .add(j0 * rb + grp * gb + geom.header + in_grp / 2);
                for j in 0..len {
                    let [v0, v1] = entries16(&planes, gp);
                    gp = gp.add(rb);
                    for (r, ar) in a.iter_mut().enumerate().take(QB) {
                        let wj = _mm256_broadcast_ss(&*wg.add(r * AXPY_ROWS + j));
                        ar[0] = _mm256_fmadd_ps(wj, v0, ar[0]);
                        ar[1] = _mm256_fmadd_ps(wj, v1, ar[1]);
                    }
                }
                for (r, ar) in a.iter().enumerate().take(QB) {
                    _mm256_storeu_ps(ap.add(r * geom.hd + c), permute(ar[0], &NATURAL));
                    _mm256_storeu_ps(ap.add(r * geom.hd + c + 8), permute(ar[1], &NATURAL));
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

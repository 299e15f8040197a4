// The KV cache in GPU memory: RoPE, quantize-on-append, the rotations (the WHT, RotorQuant's
// block rotations) for queries and outputs, the
// merge of flash-decoding partials (decode.cu computes them) and dequantization of a past range
// for prefill. Rows are the CPU codecs' bytes (src/kv/codec/*.rs, codec.cuh) in the CPU store's
// layout: head-major rings of `capacity` rows, position p in slot p % capacity.
#include <cuda_fp16.h>
#include <stdint.h>

#include "codec.cuh"

#define MAX_RD 512    // widest row the append/dequantize/WHT kernels take
#define MAX_SINK 4    // most sink rows a head keeps (kv::store::SINK_ROWS)

__constant__ float SIGNS1[128] = {
    -1, 1, 1, -1, -1, 1, -1, 1, -1, -1, 1, 1, 1, 1, 1, 1, 1, -1, 1, -1, 1, -1, -1, 1, 1, 1, -1, 1,
    1, -1, -1, -1, -1, 1, 1, -1, 1, 1, -1, 1, -1, 1, 1, -1, -1, 1, -1, 1, 1, 1, 1, -1, -1, -1, -1,
    -1, 1, -1, 1, 1, 1, 1, -1, 1, -1, -1, 1, -1, -1, -1, 1, -1, -1, -1, 1, -1, -1, -1, 1, 1, 1, -1,
    -1, 1, 1, 1, -1, -1, 1, 1, -1, 1, 1, -1, 1, -1, -1, 1, 1, -1, 1, -1, 1, -1, 1, 1, 1, 1, -1, 1,
    -1, 1, 1, -1, 1, 1, -1, -1, -1, -1, -1, 1, 1, -1, 1, 1, -1, 1};
__constant__ float SIGNS2[128] = {
    1, 1, 1, 1, -1, 1, 1, -1, 1, -1, -1, -1, 1, -1, -1, -1, 1, 1, -1, -1, 1, -1, 1, -1, 1, -1, -1,
    1, -1, 1, 1, 1, 1, 1, -1, -1, -1, 1, -1, -1, -1, -1, -1, -1, 1, 1, 1, -1, 1, -1, 1, 1, 1, -1,
    -1, 1, -1, -1, -1, -1, -1, -1, 1, 1, 1, -1, 1, -1, -1, -1, -1, 1, -1, 1, -1, 1, -1, -1, 1, 1,
    -1, 1, -1, 1, 1, -1, 1, -1, -1, -1, -1, 1, -1, -1, 1, -1, 1, -1, 1, 1, 1, -1, -1, 1, -1, 1, -1,
    1, 1, -1, -1, 1, -1, 1, -1, 1, 1, -1, 1, -1, 1, -1, -1, -1, -1, -1, 1, -1};

// Value v of a stored row, in the codec's domain (rotated for turbo, in its head's basis for
// spectral, whose head table `cb` is).
__device__ __forceinline__ float value_at(int codec, const uint8_t* row, int v, int d,
                                          const float* cb) {
    if (codec == C_F16) return half_at(row + 2 * v);
    if (codec == C_SPECTRAL4) return spectral_value(row, __float_as_uint(cb[v]), cb + SPEC_LUT(d));
    const int g = group_width(codec, d), o = v % g;
    const uint8_t* grp = row + (v / g) * group_bytes(codec, g);
    const float scale = half_at(grp);
    switch (codec) {
        case C_Q8_0: return scale * (float)(int8_t)grp[2 + o];
        case C_Q4_0: {
            // value j < 16 in the low nibble of byte j, j + 16 in its high nibble
            const uint8_t b = grp[2 + o % 16];
            return scale * (float)((o < 16 ? b & 15 : b >> 4) - 8);
        }
        case C_TURBO4: return scale * cb[(grp[(g == 128 ? 4 : 2) + o / 2] >> (4 * (o % 2))) & 15];
        default: {
            // turbo3/turbo2: low two bits four per byte; turbo3's high bits eight per byte after
            int c = (grp[2 + o / 4] >> (2 * (o % 4))) & 3;
            if (codec == C_TURBO3) c |= ((grp[2 + g / 4 + o / 8] >> (o % 8)) & 1) << 2;
            return scale * cb[c];
        }
    }
}

// In-place randomized WHT of the groups of a row held in shared memory `s` (d values, one per
// thread of the block): forward `D2·H/√g·D1`, inverse `D1·H/√g·D2`; same butterfly order as
// src/kv/codec/wht.rs.
__device__ void wht_shared(float* s, int d, bool inverse) {
    const int i = threadIdx.x, g = turbo_width(d), o = i % g;
    const float scale = g == 128 ? 0.088388350f : 0.125f;
    if (i < d) s[i] *= inverse ? SIGNS2[o] : SIGNS1[o];
    for (int h = 1; h < g; h *= 2) {
        __syncthreads();
        if (i < d && (o & h) == 0) {
            const float a = s[i], b = s[i + h];
            s[i] = a + b;
            s[i + h] = a - b;
        }
    }
    __syncthreads();
    if (i < d) s[i] *= scale * (inverse ? SIGNS1[o] : SIGNS2[o]);
    __syncthreads();
}

// Hamilton product a·b of quaternions (w, x, y, z), src/kv/codec/iso.rs's `mul` step by step.
__device__ __forceinline__ void quat_mul(const float* a, const float* b, float* o) {
    o[0] = __fsub_rn(__fsub_rn(__fsub_rn(__fmul_rn(a[0], b[0]), __fmul_rn(a[1], b[1])),
                               __fmul_rn(a[2], b[2])),
                     __fmul_rn(a[3], b[3]));
    o[1] = __fsub_rn(__fadd_rn(__fadd_rn(__fmul_rn(a[0], b[1]), __fmul_rn(a[1], b[0])),
                               __fmul_rn(a[2], b[3])),
                     __fmul_rn(a[3], b[2]));
    o[2] = __fadd_rn(__fadd_rn(__fsub_rn(__fmul_rn(a[0], b[2]), __fmul_rn(a[1], b[3])),
                               __fmul_rn(a[2], b[0])),
                     __fmul_rn(a[3], b[1]));
    o[3] = __fadd_rn(__fsub_rn(__fadd_rn(__fmul_rn(a[0], b[3]), __fmul_rn(a[1], b[2])),
                               __fmul_rn(a[2], b[1])),
                     __fmul_rn(a[3], b[0]));
}

// In-place rotation of the `blk`-value blocks of each group of a row in shared memory `s`, with
// the CPU codecs' float steps (src/kv/codec/{planar,iso,rotor}.rs) so stored bytes match:
// blk 2, Givens (cos, sin per pair); 3, a rotor's row-major 3×3 matrix (inverse: its
// transpose); 4, quaternions q_L, q_R (q_L·v·q_R; inverse conj(q_L)·v·conj(q_R)). A group's
// trailing values that fill no block stay as they are. The first thread of a block turns it.
__device__ void rotate_blocks(float* s, int d, bool inverse, int blk,
                              const float* __restrict__ rot) {
    const int i = threadIdx.x, g = turbo_width(d), o = i % g, b = o / blk;
    __syncthreads();
    if (i < d && o % blk == 0 && o + blk <= g) {
        float* v = s + i;
        if (blk == 2) {
            const float c = rot[2 * b], sn = inverse ? -rot[2 * b + 1] : rot[2 * b + 1];
            const float a0 = v[0], a1 = v[1];
            v[0] = __fsub_rn(__fmul_rn(c, a0), __fmul_rn(sn, a1));
            v[1] = __fadd_rn(__fmul_rn(sn, a0), __fmul_rn(c, a1));
        } else if (blk == 3) {
            const float* m = rot + 9 * b;
            const float a[3] = {v[0], v[1], v[2]};
            for (int r = 0; r < 3; r++) {
                float x[3];
                for (int j = 0; j < 3; j++)
                    x[j] = __fmul_rn(inverse ? m[3 * j + r] : m[3 * r + j], a[j]);
                v[r] = __fadd_rn(__fadd_rn(x[0], x[1]), x[2]);
            }
        } else {
            const float* l = rot + 8 * b;
            const float* r = l + 4;
            float ql[4] = {l[0], l[1], l[2], l[3]}, qr[4] = {r[0], r[1], r[2], r[3]};
            if (inverse)
                for (int j = 1; j < 4; j++) {
                    ql[j] = -ql[j];
                    qr[j] = -qr[j];
                }
            const float a[4] = {v[0], v[1], v[2], v[3]};
            float t[4], y[4];
            quat_mul(ql, a, t);
            quat_mul(t, qr, y);
            for (int j = 0; j < 4; j++) v[j] = y[j];
        }
    }
    __syncthreads();
}

// A turbo row's rotation in shared memory: the WHT (`blk` 0) or RotorQuant's block rotations.
__device__ __forceinline__ void rotate_shared(float* s, int d, bool inverse, int blk,
                                              const float* __restrict__ rot) {
    if (blk == 0)
        wht_shared(s, d, inverse);
    else
        rotate_blocks(s, d, inverse, blk, rot);
}

// A row in shared memory `s` (d values, one per thread of the block) into a head's basis `vt`
// [d, d] (y = vt·x) or back (x = vtᵀ·y), with spectral.rs's float steps so stored bytes match:
// forward as src/kv/codec/mod.rs's dot_f32 (eight running sums, then added in order), back as
// its Fit::inverse (each coordinate's basis row added in turn; the CPU skips zero coordinates,
// which changes nothing but a zero's sign). Basis values are loaded 32 at a time ahead of the
// sums, which would otherwise wait on one global load each (d is a multiple of 32).
__device__ void basis_shared(float* s, int d, bool inverse, const float* __restrict__ vt) {
    const int i = threadIdx.x;
    float y = 0.f;
    __syncthreads();
    if (i < d) {
        float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        for (int c0 = 0; c0 < d; c0 += 32) {
            float b[32];
#pragma unroll
            for (int l = 0; l < 32; l++)
                b[l] = inverse ? vt[(size_t)(c0 + l) * d + i] : vt[(size_t)i * d + c0 + l];
#pragma unroll
            for (int l = 0; l < 32; l++) {
                if (inverse)
                    y = __fadd_rn(y, __fmul_rn(s[c0 + l], b[l]));
                else
                    acc[l % 8] = __fadd_rn(acc[l % 8], __fmul_rn(b[l], s[c0 + l]));
            }
        }
        if (!inverse)
#pragma unroll
            for (int l = 0; l < 8; l++) y = __fadd_rn(y, acc[l]);
    }
    __syncthreads();
    if (i < d) s[i] = y;
    __syncthreads();
}

// Sum of `x` over each group of `g` threads (g = 64 or 128), the same value in every thread of
// the group. Warp sums are added in warp order, so the result does not depend on scheduling.
__device__ float group_sum(float x, float* warp_sums, int g) {
    for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffff, x, off);
    const int w = threadIdx.x >> 5;
    __syncthreads();
    if ((threadIdx.x & 31) == 0) warp_sums[w] = x;
    __syncthreads();
    const int per = g / 32, first = (w / per) * per;
    float s = 0.f;
    for (int k = 0; k < per; k++) s += warp_sums[first + k];
    return s;
}

// y [t, n_head, hd] = x rotated for positions pos..pos+t (`inv_freq` [hd/2]; interleaved pairs
// (2i, 2i+1) or NeoX halves (i, i + hd/2)). One block per (token, head), a thread per pair.
extern "C" __global__ void kv_rope(const float* __restrict__ x, float* __restrict__ y,
                                   const float* __restrict__ inv_freq, int n_head, int hd, int pos,
                                   int neox) {
    const int row = blockIdx.x, ti = row / n_head, i = threadIdx.x, half = hd / 2;
    if (i >= half) return;
    float sn, cs;
    sincosf((float)(pos + ti) * inv_freq[i], &sn, &cs);
    const int a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
    const float* xr = x + (size_t)row * hd;
    float* yr = y + (size_t)row * hd;
    const float x0 = xr[a], x1 = xr[b];
    yr[a] = x0 * cs - x1 * sn;
    yr[b] = x0 * sn + x1 * cs;
}

// ggml's q8_0 / q4_0 blocks of one row, value `val` in thread i < d (a warp per block; the
// float steps of src/kv/codec/{q8_0,q4_0}.rs, unfused, so the bytes are the CPU's).
__device__ void store_block(float val, uint8_t* __restrict__ row, float* __restrict__ own,
                            int codec, int d) {
    const int i = threadIdx.x, lane = i & 31;
    if (i >= d) return;
    if (own) own[i] = val;
    if (!row) return;
    uint8_t* b = row + (i / 32) * group_bytes(codec, 32);
    if (codec == C_Q8_0) {
        float amax = fabsf(val);
        for (int off = 16; off > 0; off >>= 1)
            amax = fmaxf(amax, __shfl_xor_sync(0xffffffff, amax, off));
        const float scale = amax / 127.f;
        const float inv = scale != 0.f ? 1.f / scale : 0.f;
        if (lane == 0) put_half(b, scale);
        b[2 + lane] = (uint8_t)(int8_t)(int)roundf(__fmul_rn(val, inv));
        return;
    }
    // q4_0 scales by the first value of largest magnitude (mapped to −8 exactly).
    float m = val;
    int at = lane;
    for (int off = 16; off > 0; off >>= 1) {
        const float om = __shfl_xor_sync(0xffffffff, m, off);
        const int oa = __shfl_xor_sync(0xffffffff, at, off);
        if (fabsf(om) > fabsf(m) || (fabsf(om) == fabsf(m) && oa < at)) {
            m = om;
            at = oa;
        }
    }
    if (m == 0.f) m = 0.f;  // the CPU's fold starts from +0
    const float scale = m / -8.f;
    const float inv = scale != 0.f ? 1.f / scale : 0.f;
    const int q = min(15, max(0, (int)__fadd_rn(__fmul_rn(val, inv), 8.5f)));
    const int q_hi = __shfl_down_sync(0xffffffff, q, 16);
    if (lane == 0) put_half(b, scale);
    if (lane < 16) b[2 + lane] = (uint8_t)(q | (q_hi << 4));
}

// Scales the search tries on a unit group: k/16 for k in BLOCK_SCALE_LO.. (16 of them).
#define BLOCK_SCALE_LO 10
#define BLOCK_SCALES 16

// The scale for thread i's group of the rotated unit row `s` (d values, groups of g) whose codes
// point closest to it, as src/kv/codec/turbo.rs's best_scale picks it. First every thread finds
// its value's code at each of the 16 scales (independent, so all d threads at once), then one
// thread per (group, scale) sums over the group in index order, one rounding per step (no fused
// multiply-adds), and the first best scale wins, so the bytes are the CPU's. The sums are the
// one serial part: 16 threads that also searched the codebook for every value, one global load
// per decision point, cost a centered decode step ~1.8 ms on the 8B shape (docs/CUDA.md).
// Every thread of the block must call it.
__device__ float block_scale(const float* s, int d, int g, const float* __restrict__ cb,
                             const float* __restrict__ mids, int n_mids) {
    __shared__ float cosines[MAX_RD / 64 * BLOCK_SCALES];
    __shared__ float best[MAX_RD / 64];
    // value j's code at scale k in byte k of codes[j]
    __shared__ uint4 codes[MAX_RD];
    __shared__ float table[16];
    const int i = threadIdx.x, n_groups = d / g;
    if (i < 16) table[i] = cb[i];
    if (i < d) {
        float m[15];
#pragma unroll
        for (int k = 0; k < 15; k++) m[k] = k < n_mids ? mids[k] : INFINITY;
        const float u = s[i];
        uint32_t w[4] = {0, 0, 0, 0};
#pragma unroll
        for (int k = 0; k < BLOCK_SCALES; k++) {
            const float x = __fmul_rn(u, (float)(BLOCK_SCALE_LO + k) / 16.f);
            uint32_t c = 0;
#pragma unroll
            for (int t = 0; t < 15; t++) c += m[t] <= x;
            w[k / 4] |= c << (8 * (k % 4));
        }
        codes[i] = make_uint4(w[0], w[1], w[2], w[3]);
    }
    __syncthreads();
    if (i < n_groups * BLOCK_SCALES) {
        const int grp = i / BLOCK_SCALES, k = i % BLOCK_SCALES;
        const float* u = s + grp * g;
        const uint8_t* c = reinterpret_cast<const uint8_t*>(codes + grp * g) + k;
        float dot = 0.f, cc = 0.f;
        for (int j = 0; j < g; j++) {
            const float yc = table[c[16 * j]];
            dot = __fadd_rn(dot, __fmul_rn(yc, u[j]));
            cc = __fadd_rn(cc, __fmul_rn(yc, yc));
        }
        cosines[i] = dot / fmaxf(sqrtf(cc), 1e-10f);
    }
    __syncthreads();
    if (i < n_groups) {
        float top = -INFINITY;
        for (int k = 0; k < BLOCK_SCALES; k++) {
            if (cosines[i * BLOCK_SCALES + k] > top) {
                top = cosines[i * BLOCK_SCALES + k];
                best[i] = (float)(BLOCK_SCALE_LO + k) / 16.f;
            }
        }
    }
    __syncthreads();
    return i < d ? best[i / g] : 1.f;
}

// Quantizes one row, value `val` in thread i < d of a block of ≥ d threads, into `row` (null:
// nowhere, for `own` alone) with
// `codec` (turbo: codebook `cb` and its decision points `mids`, rotation `rot_blk`/`rot` as in
// rotate_shared; src/kv/codec/turbo.rs's quantize_group; `search`: each group at its best
// scale, block_scale). With `own` non-null also writes the row in the codec's domain at full
// precision (for the decode step's own position). Every thread of the block must call it.
__device__ void store_row(float val, uint8_t* __restrict__ row, float* __restrict__ own,
                          int codec, int d, const float* __restrict__ cb,
                          const float* __restrict__ mids, int n_mids, int rot_blk,
                          const float* __restrict__ rot, bool search) {
    __shared__ float s[MAX_RD];
    __shared__ float warp_sums[MAX_RD / 32];
    __shared__ uint8_t codes[MAX_RD];
    const int i = threadIdx.x;
    if (codec == C_F16) {
        if (i < d) {
            if (row) put_half(row + 2 * i, val);
            if (own) own[i] = val;
        }
        return;
    }
    if (!is_turbo(codec)) return store_block(val, row, own, codec, d);
    const int g = turbo_width(d), o = i % g, gb = group_bytes(codec, g);
    const float norm = sqrtf(group_sum(val * val, warp_sums, g));
    const float inv = norm > 1e-10f ? 1.f / norm : 0.f;
    if (i < d) s[i] = val * inv;
    rotate_shared(s, d, false, rot_blk, rot);
    const float y = i < d ? s[i] : 0.f;
    const float x = search ? __fmul_rn(y, block_scale(s, d, g, cb, mids, n_mids)) : y;
    int c = 0;
    for (int k = 0; k < n_mids; k++) c += mids[k] <= x;
    const float r = cb[c];
    const float recon = sqrtf(group_sum(r * r, warp_sums, g));
    const float corrected = recon > 1e-10f ? norm / recon : norm;
    if (i < d) {
        codes[i] = (uint8_t)c;
        if (own) own[i] = norm * y;
    }
    __syncthreads();
    if (i >= d || !row) return;
    uint8_t* grp = row + (i / g) * gb;
    if (o == 0) put_half(grp, corrected);
    if (codec == C_TURBO4) {
        const int hb = g == 128 ? 4 : 2;
        if (o == 0 && hb == 4) grp[2] = grp[3] = 0;
        if (o % 2 == 0) grp[hb + o / 2] = codes[i] | (codes[i + 1] << 4);
    } else {
        if (o % 4 == 0)
            grp[2 + o / 4] = (codes[i] & 3) | (codes[i + 1] & 3) << 2 | (codes[i + 2] & 3) << 4 |
                             (codes[i + 3] & 3) << 6;
        if (codec == C_TURBO3 && o % 8 == 0) {
            uint8_t b = 0;
            for (int k = 0; k < 8; k++) b |= ((codes[i + k] >> 2) & 1) << k;
            grp[2 + g / 4 + o / 8] = b;
        }
    }
}

// Quantizes one spectral row (spectral.rs's quantize_row, same float steps), value `val` in
// thread i < d of a block of ≥ d threads, into `row` (rb bytes; null: nowhere) with its head's
// table `tab` and basis `vt`; `own` (nullable) gets the row in the basis at full precision.
// Every thread of the block must call it.
__device__ void store_spectral(float val, uint8_t* __restrict__ row, float* __restrict__ own,
                               int d, int rb, const float* __restrict__ tab,
                               const float* __restrict__ vt) {
    __shared__ float y[MAX_RD];
    __shared__ float g_norm[SPEC_GROUPS], g_inv[SPEC_GROUPS];
    __shared__ uint8_t codes[MAX_RD];
    __shared__ uint32_t words[(MAX_RD * 5 + 16 * SPEC_GROUPS) / 32 + 2];
    const int i = threadIdx.x;
    const uint32_t* meta = reinterpret_cast<const uint32_t*>(tab + SPEC_META(d));
    const int n_groups = (int)meta[4 * SPEC_GROUPS];
    if (i < d) y[i] = val;
    basis_shared(y, d, false, vt);
    if (i < d && own) own[i] = y[i];
    // Group norms summed in order by one thread each, as the CPU does.
    if (i < n_groups) {
        const int start = meta[4 * i], len = meta[4 * i + 1];
        float e = 0.f;
#pragma unroll 8
        for (int c = start; c < start + len; c++) e = __fadd_rn(e, __fmul_rn(y[c], y[c]));
        const float norm = sqrtf(e);
        g_norm[i] = norm;
        g_inv[i] = norm > 1e-10f ? 1.f / norm : 0.f;
    }
    const int n_words = (rb + 3) / 4;
    for (int k = i; k < n_words; k += blockDim.x) words[k] = 0;
    __syncthreads();
    if (i < d) {
        const uint32_t desc = __float_as_uint(tab[i]);
        const int w = (desc >> 16) & 15, grp = desc >> 20, bit = desc & 0xffff;
        int c = 0;
        if (w > 0) {
            const float root = sqrtf((float)meta[4 * grp + 1]);
            const float x = __fmul_rn(__fmul_rn(y[i], g_inv[grp]), root);
            const float* mids = tab + SPEC_MIDS(d) + 32 * grp;
            for (int k = 0; k < (1 << w) - 1; k++) c += mids[k] <= x;
            atomicOr(&words[bit >> 5], (uint32_t)c << (bit & 31));
            if ((bit & 31) + w > 32) atomicOr(&words[(bit >> 5) + 1], (uint32_t)c >> (32 - (bit & 31)));
        }
        codes[i] = (uint8_t)c;
    }
    __syncthreads();
    if (!row) return;
    // Scales: the decoded unit group keeps the group's length (turbo's norm correction).
    if (i < n_groups) {
        const int start = meta[4 * i], len = meta[4 * i + 1];
        const float* lut = tab + SPEC_LUT(d) + 32 * i;
        float e = 0.f;
#pragma unroll 8
        for (int c = start; c < start + len; c++)
            e = __fadd_rn(e, __fmul_rn(lut[codes[c]], lut[codes[c]]));
        put_half(row + 2 * i, e > 0.f ? g_norm[i] / sqrtf(e) : 0.f);
    }
    for (int b = 2 * n_groups + i; b < rb; b += blockDim.x)
        row[b] = (uint8_t)(words[b >> 2] >> (8 * (b & 3)));
}

// One of K or V of a layer as the kernels take it (src/kv/device.rs's DeviceRows): the ring of
// `capacity` rows per head, the codec (codebook `cb` and decision points `mids` for turbo),
// for centered stores the per-head mean and channel weights (nullable) and the f16 sink rows
// (`n_sink` leading positions per head kept in the codec's domain, d values each), and turbo
// rows' rotation (`rot_blk`, `rot`: rotate_shared) and whether their quantizer searches each
// group's scale (`search`: block rotations, and centered turbo3/turbo4 stores). Spectral stores
// keep per-head tables in `cb` (n_kv × spec_table(d) floats) and per-head bases [d, d] in `rot`.
struct Store {
    uint8_t* rows;
    int codec, rb;
    const float *cb, *mids;
    int n_mids;
    const float *mean, *cscale;
    uint8_t* sinks;
    int n_sink;
    int rot_blk;
    const float* rot;
    int search;
    // Head h's row in shared memory into the codec's domain (or back).
    __device__ __forceinline__ void rotate(float* s, int d, bool inverse, int h) const {
        if (codec == C_SPECTRAL4)
            basis_shared(s, d, inverse, rot + (size_t)h * d * d);
        else if (is_turbo(codec))
            rotate_shared(s, d, inverse, rot_blk, rot);
    }
    // The codebook (turbo) or head h's table (spectral) value_at reads.
    __device__ __forceinline__ const float* table(int h, int d) const {
        return codec == C_SPECTRAL4 ? cb + (size_t)h * spec_table(d) : cb;
    }
    // Where head h's value v at sink position p, and its ring row for position p, live.
    __device__ __forceinline__ uint8_t* sink_at(int h, long long p, int v, int d) const {
        return sinks + 2 * (((size_t)h * n_sink + p) * d + v);
    }
    __device__ __forceinline__ uint8_t* ring_row(int h, long long p, long long capacity) const {
        return rows + ((size_t)h * capacity + (size_t)(p % capacity)) * rb;
    }
};
#define STORE_PARAMS(p)                                                                    \
    uint8_t *p##_rows, uint8_t *p##_sinks, int p##_codec, int p##_rb, const float *p##_cb,   \
        const float *p##_mids, int p##_n_mids, const float *p##_mean, const float *p##_cscale, \
        int p##_n_sink, int p##_rot_blk, const float *p##_rot, int p##_search
#define STORE(p)                                                                           \
    Store { p##_rows, p##_codec, p##_rb, p##_cb, p##_mids, p##_n_mids, p##_mean, p##_cscale, \
            p##_sinks, p##_n_sink, p##_rot_blk, p##_rot, p##_search }

// Stores head h's row for position p, value `val` in thread i < d of a block of d threads:
// centered on the store's mean and weighted by its channel scales where it has them (the CPU
// store's `write`, same float steps), then a sink row for p < n_sink, else quantized into the
// ring (store_row). `own` (nullable) gets the row in the codec's domain at full precision;
// with `store` false only `own` is written. Every thread of the block must call it.
__device__ void put_row(const Store& st, float val, int h, long long p, long long capacity,
                        int d, float* __restrict__ own, bool store) {
    __shared__ float s[MAX_RD];
    const int i = threadIdx.x;
    const size_t c = (size_t)h * d + i;
    if (i < d && st.mean) val = val - st.mean[c];
    if (i < d && st.cscale) val = val * st.cscale[c];
    if (p < st.n_sink) {
        if (i < d) s[i] = val;
        __syncthreads();
        st.rotate(s, d, false, h);
        if (i < d) {
            if (store) put_half(st.sink_at(h, p, i, d), s[i]);
            if (own) own[i] = s[i];
        }
        return;
    }
    uint8_t* row = store ? st.ring_row(h, p, capacity) : nullptr;
    if (st.codec == C_SPECTRAL4)
        return store_spectral(val, row, own, d, st.rb, st.table(h, d),
                              st.rot + (size_t)h * d * d);
    store_row(val, row, own, st.codec, d, st.cb,
              st.mids, st.n_mids, st.rot_blk, st.rot, st.search != 0);
}

// Value v of head h's row for position p in the store's domain: its sink row or ring row.
__device__ __forceinline__ float stored_value(const Store& st, int h, long long p,
                                              long long capacity, int v, int d) {
    if (p < st.n_sink) return half_at(st.sink_at(h, p, v, d));
    return value_at(st.codec, st.ring_row(h, p, capacity), v, d, st.table(h, d));
}

// Stores rows x [t, n_kv, d] at positions pos..pos+t (put_row); with `own` non-null also
// writes them at full precision in the codec's domain. One block of d threads per (KV head,
// token).
extern "C" __global__ void kv_append(const float* __restrict__ x, float* __restrict__ own,
                                     long long capacity, int pos, int n_kv, int d,
                                     STORE_PARAMS(st)) {
    const int h = blockIdx.x, ti = blockIdx.y, i = threadIdx.x;
    // A chunk longer than a sliding-window ring wraps onto itself: only its last `capacity`
    // rows survive, so earlier ones are not written (blocks run in no particular order).
    if ((long long)ti + capacity < (long long)gridDim.y) return;
    const size_t src = ((size_t)ti * n_kv + h) * d;
    put_row(STORE(st), i < d ? x[src + i] : 0.f, h, (long long)pos + ti, capacity, d,
            own ? own + src : nullptr, true);
}

// RoPE of one head held in shared memory `s` (hd values) at position p, as kv_rope computes it.
__device__ void rope_shared(float* s, const float* __restrict__ inv_freq, int hd, int p,
                            bool neox) {
    const int i = threadIdx.x, half = hd / 2;
    const int a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
    float y0 = 0.f, y1 = 0.f;
    if (i < half) {
        float sn, cs;
        sincosf((float)p * inv_freq[i], &sn, &cs);
        const float x0 = s[a], x1 = s[b];
        y0 = x0 * cs - x1 * sn;
        y1 = x0 * sn + x1 * cs;
    }
    __syncthreads();
    if (i < half) {
        s[a] = y0;
        s[b] = y1;
    }
    __syncthreads();
}

// Everything a decode step does before attention, in one launch (blocks of d threads): blocks
// 0..n_head-1 rope the query heads (q [n_head, d]), divide them by K's channel weights, rotate
// them into K's domain when K's codec rotates, scale them into q_out; the next n_kv blocks rope
// K (k [n_kv, d]) and store it at `pos`, the last n_kv store V (put_row); own_k / own_v get the
// step's rows at full precision in the stores' domains. `inv_freq` null: q and k come roped.
// `store` 0: the stores are only read (a shared-KV layer, or the layer whose store it reads,
// which stores the step after them), own_k / own_v are still written.
// (Centering shifts every score of a query by the same q·μ, the step's own included, so the
// softmax needs no correction; V's mean is added back after the merge.)
extern "C" __global__ void kv_step(
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    const float* __restrict__ inv_freq, int neox, int pos, float* __restrict__ q_out,
    float scale, int n_head, int n_kv, int d, long long capacity, float* __restrict__ own_k,
    float* __restrict__ own_v, int store, STORE_PARAMS(k), STORE_PARAMS(v)) {
    __shared__ float x[MAX_RD];
    const int blk = blockIdx.x, i = threadIdx.x;
    const bool is_q = blk < n_head, is_k = !is_q && blk < n_head + n_kv;
    const int h = is_q ? blk : is_k ? blk - n_head : blk - n_head - n_kv;
    const float* src = (is_q ? q : is_k ? k : v) + (size_t)h * d;
    if (i < d) x[i] = src[i];
    __syncthreads();
    if (!is_q && !is_k) {
        put_row(STORE(v), i < d ? x[i] : 0.f, h, pos, capacity, d, own_v + (size_t)h * d,
                store != 0);
        return;
    }
    if (inv_freq) rope_shared(x, inv_freq, d, pos, neox != 0);
    if (is_k) {
        put_row(STORE(k), i < d ? x[i] : 0.f, h, pos, capacity, d, own_k + (size_t)h * d,
                store != 0);
        return;
    }
    if (i < d && k_cscale) x[i] = x[i] / k_cscale[(size_t)(h / (n_head / n_kv)) * d + i];
    __syncthreads();
    STORE(k).rotate(x, d, false, h / (n_head / n_kv));
    if (i < d) q_out[(size_t)h * d + i] = x[i] * scale;
}

// out [n_kv, n, d] = positions first..first+n of every head, decoded to values (sink rows or
// ring rows, rotation undone, channel weights divided out, mean added back). One block of d
// threads per (position, head).
extern "C" __global__ void kv_dequant(float* __restrict__ out, long long capacity, int first,
                                      int n, int d, STORE_PARAMS(st)) {
    __shared__ float s[MAX_RD];
    const int r = blockIdx.x, h = blockIdx.y, i = threadIdx.x;
    const long long p = (long long)first + r;
    const size_t c = (size_t)h * d + i;
    if (i < d) s[i] = stored_value(STORE(st), h, p, capacity, i, d);
    __syncthreads();
    STORE(st).rotate(s, d, true, h);
    if (i < d) {
        float x = s[i];
        if (st_cscale) x = x / st_cscale[c];
        if (st_mean) x = x + st_mean[c];
        out[((size_t)h * n + r) * d + i] = x;
    }
}

// Block-wide max / sum (blockDim a multiple of 32, ≤ 1024); every thread gets the result.
__device__ float block_reduce(float x, float* red, bool is_max) {
    for (int off = 16; off > 0; off >>= 1) {
        const float y = __shfl_xor_sync(0xffffffff, x, off);
        x = is_max ? fmaxf(x, y) : x + y;
    }
    const int w = threadIdx.x >> 5, warps = blockDim.x >> 5;
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[w] = x;
    __syncthreads();
    float r = is_max ? -INFINITY : 0.f;
    for (int k = 0; k < warps; k++) r = is_max ? fmaxf(r, red[k]) : r + red[k];
    return r;
}

// out [n_kv, n_q, d] = Σ_s e^{m_s − M} acc_s / Σ_s e^{m_s − M} sum_s over the `slots` partials,
// the positions x_lo..x_hi (≤ MAX_SINK of them: where a store keeps sink rows, which the
// partials skip; each store's sink or ring row) and the step's own position (its score
// q·own_k, its row own_v; q [n_kv, n_q, d] as the partials took it, own_k/own_v [n_kv, d] in
// the stores' domains), rotated back out of V's domain, V's channel weights divided out and its
// mean added where V is centered; one
// block per (KV head, query): slot weights in shared memory (`slots` floats, dynamic), then
// (value × phase) threads sum over the slots.
extern "C" __global__ void kv_attn_merge(const float* __restrict__ part_max,
                                         const float* __restrict__ part_sum,
                                         const float* __restrict__ part_acc,
                                         const float* __restrict__ q,
                                         const float* __restrict__ own_k,
                                         const float* __restrict__ own_v,
                                         float* __restrict__ out, int n_q, int d, int slots,
                                         long long capacity, int x_lo, int x_hi,
                                         STORE_PARAMS(k), STORE_PARAMS(v)) {
    extern __shared__ float weight[];
    __shared__ float red[32];
    __shared__ float sums[1024];
    const Store ks = STORE(k), vs = STORE(v);
    const int kvh = blockIdx.x, qi = blockIdx.y, tid = threadIdx.x, n_x = x_hi - x_lo;
    const size_t base = (size_t)kvh * slots;
    const float* qr = q + ((size_t)kvh * n_q + qi) * d;
    // Scores of positions x_lo.. (warp j) and of the own position (warp n_x), a warp each.
    __shared__ float exact[MAX_SINK + 1];
    const int warp = tid >> 5, lane = tid & 31;
    if (warp <= n_x) {
        float x = 0.f;
        for (int v = lane; v < d; v += 32)
            x += qr[v] * (warp < n_x ? stored_value(ks, kvh, x_lo + warp, capacity, v, d)
                                     : own_k[(size_t)kvh * d + v]);
        for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffff, x, off);
        if (lane == 0) exact[warp] = x;
    }
    __syncthreads();
    const float own = exact[n_x];
    float x_score[MAX_SINK];
    float m = own;
    for (int j = 0; j < n_x; j++) {
        x_score[j] = exact[j];
        m = fmaxf(m, x_score[j]);
    }
    for (int s = tid; s < slots; s += blockDim.x) m = fmaxf(m, part_max[(base + s) * n_q + qi]);
    m = block_reduce(m, red, true);
    const float w_own = __expf(own - m);
    float den = 0.f;
    for (int s = tid; s < slots; s += blockDim.x) {
        const float pm = part_max[(base + s) * n_q + qi];
        const float w = pm == -INFINITY ? 0.f : __expf(pm - m);
        weight[s] = w;
        den += w * part_sum[(base + s) * n_q + qi];
    }
    den = block_reduce(den, red, false) + w_own;
    for (int j = 0; j < n_x; j++) {
        x_score[j] = __expf(x_score[j] - m);
        den += x_score[j];
    }
    __syncthreads();
    const int phases = blockDim.x / d, v = tid % d, phase = tid / d;
    float num = 0.f;
    if (phase < phases)
        for (int s = phase; s < slots; s += phases)
            num += weight[s] * part_acc[((base + s) * n_q + qi) * d + v];
    sums[tid] = num;
    __syncthreads();
    if (phase == 0) {
        num += w_own * own_v[(size_t)kvh * d + v];
        for (int j = 0; j < n_x; j++)
            num += x_score[j] * stored_value(vs, kvh, x_lo + j, capacity, v, d);
        for (int p = 1; p < phases; p++) num += sums[p * d + v];
        sums[v] = num / den;
    }
    __syncthreads();
    vs.rotate(sums, d, true, kvh);
    if (tid < d) {
        const size_t c = (size_t)kvh * d + tid;
        float x = sums[tid];
        if (vs.cscale) x = x / vs.cscale[c];
        if (vs.mean) x = x + vs.mean[c];
        out[((size_t)kvh * n_q + qi) * d + tid] = x;
    }
}

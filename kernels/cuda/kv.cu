// The KV cache in GPU memory: RoPE, quantize-on-append, the WHT for queries and outputs,
// flash-decoding attention over stored rows, and dequantization of a past range for prefill.
// Rows are the CPU codecs' bytes (src/kv/codec/{f16,turbo4,turbo3}.rs) in the CPU store's
// layout: head-major rings of `capacity` rows, position p in slot p % capacity.
#include <cuda_fp16.h>
#include <stdint.h>

#define MAX_Q 8       // queries per KV head the attention kernel holds (a GQA group)
#define MAX_AD 256    // widest head the attention kernel takes
#define MAX_RD 512    // widest row the append/dequantize/WHT kernels take

// Codec ids, as src/kv/device.rs passes them.
#define C_F16 0
#define C_TURBO4 1
#define C_TURBO3 2
#define C_F32 3  // full-precision rows (the chunk's own K/V)

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

__device__ __forceinline__ int group_width(int d) { return (d % 128 == 0) ? 128 : 64; }

__device__ __forceinline__ int group_bytes(int codec, int g) {
    switch (codec) {
        case C_TURBO4: return (g == 128 ? 4 : 2) + g / 2;
        case C_TURBO3: return 2 + g / 4 + g / 8;
        case C_F32: return 4 * g;
        default: return 2 * g;
    }
}

// f16 values sit at even offsets of rows whose sizes are even (f16 rows, turbo group norms),
// so they are read and written as aligned 16-bit words. (Two byte stores of the converted half
// lost its low byte once JIT-compiled on the H100; `cuda-check -m` compares stored bytes.)
__device__ __forceinline__ float half_at(const uint8_t* p) {
    return __half2float(__ushort_as_half(*reinterpret_cast<const unsigned short*>(p)));
}

__device__ __forceinline__ void put_half(uint8_t* p, float x) {
    *reinterpret_cast<unsigned short*>(p) = __half_as_ushort(__float2half_rn(x));
}

// Values v and v+1 (v even) of a stored row, in the codec's domain (rotated for turbo).
__device__ __forceinline__ float2 read_pair(int codec, const uint8_t* row, int v, int d,
                                            const float* cb) {
    if (codec == C_F16) return make_float2(half_at(row + 2 * v), half_at(row + 2 * v + 2));
    if (codec == C_F32) {
        const float* r = reinterpret_cast<const float*>(row);
        return make_float2(r[v], r[v + 1]);
    }
    const int g = group_width(d);
    const uint8_t* grp = row + (v / g) * group_bytes(codec, g);
    const int o = v % g;
    const float norm = half_at(grp);
    int c0, c1;
    if (codec == C_TURBO4) {
        const uint8_t b = grp[(g == 128 ? 4 : 2) + o / 2];
        c0 = b & 15;
        c1 = b >> 4;
    } else {
        // turbo3: low two bits four per byte, then the high bits eight per byte
        const uint8_t q = grp[2 + o / 4], s = grp[2 + g / 4 + o / 8];
        const int sh = 2 * (o % 4), sb = o % 8;
        c0 = ((q >> sh) & 3) | (((s >> sb) & 1) << 2);
        c1 = ((q >> (sh + 2)) & 3) | (((s >> (sb + 1)) & 1) << 2);
    }
    return make_float2(norm * cb[c0], norm * cb[c1]);
}

// In-place randomized WHT of the groups of a row held in shared memory `s` (d values, one per
// thread of the block): forward `D2·H/√g·D1`, inverse `D1·H/√g·D2`; same butterfly order as
// src/kv/codec/wht.rs.
__device__ void wht_shared(float* s, int d, bool inverse) {
    const int i = threadIdx.x, g = group_width(d), o = i % g;
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

// Quantizes one row, value `val` in thread i < d of a block of ≥ d threads, into `row` with
// `codec` (turbo: codebook `cb` and its decision points `mids`, src/kv/codec/turbo.rs's
// quantize_group). With `own` non-null also writes the row in the codec's domain at full
// precision (for the decode step's own position). Every thread of the block must call it.
__device__ void store_row(float val, uint8_t* __restrict__ row, float* __restrict__ own,
                          int codec, int d, const float* __restrict__ cb,
                          const float* __restrict__ mids, int n_mids) {
    __shared__ float s[MAX_RD];
    __shared__ float warp_sums[MAX_RD / 32];
    __shared__ uint8_t codes[MAX_RD];
    const int i = threadIdx.x;
    if (codec == C_F16) {
        if (i < d) {
            put_half(row + 2 * i, val);
            if (own) own[i] = val;
        }
        return;
    }
    const int g = group_width(d), o = i % g, gb = group_bytes(codec, g);
    const float norm = sqrtf(group_sum(val * val, warp_sums, g));
    const float inv = norm > 1e-10f ? 1.f / norm : 0.f;
    if (i < d) s[i] = val * inv;
    wht_shared(s, d, false);
    const float y = i < d ? s[i] : 0.f;
    int c = 0;
    for (int k = 0; k < n_mids; k++) c += mids[k] <= y;
    const float r = cb[c];
    const float recon = sqrtf(group_sum(r * r, warp_sums, g));
    const float corrected = recon > 1e-10f ? norm / recon : norm;
    if (i < d) {
        codes[i] = (uint8_t)c;
        if (own) own[i] = norm * y;
    }
    __syncthreads();
    if (i >= d) return;
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
        if (o % 8 == 0) {
            uint8_t b = 0;
            for (int k = 0; k < 8; k++) b |= ((codes[i + k] >> 2) & 1) << k;
            grp[2 + g / 4 + o / 8] = b;
        }
    }
}

// Stores rows x [t, n_kv, d] at positions pos..pos+t with `codec` (store_row); with `own`
// non-null also writes them at full precision in the codec's domain. One block of d threads
// per (KV head, token).
extern "C" __global__ void kv_append(const float* __restrict__ x, uint8_t* __restrict__ rows,
                                     float* __restrict__ own, int codec, int row_bytes,
                                     long long capacity, int pos, int n_kv, int d,
                                     const float* __restrict__ cb, const float* __restrict__ mids,
                                     int n_mids) {
    const int h = blockIdx.x, ti = blockIdx.y, i = threadIdx.x;
    // A chunk longer than a sliding-window ring wraps onto itself: only its last `capacity`
    // rows survive, so earlier ones are not written (blocks run in no particular order).
    if ((long long)ti + capacity < (long long)gridDim.y) return;
    const size_t src = ((size_t)ti * n_kv + h) * d;
    uint8_t* row = rows + ((size_t)h * capacity + (size_t)(pos + ti) % capacity) * row_bytes;
    store_row(i < d ? x[src + i] : 0.f, row, own ? own + src : nullptr, codec, d, cb, mids,
              n_mids);
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
// 0..n_head-1 rope the query heads (q [n_head, d]), rotate them into K's domain when K's codec
// rotates, scale them into q_out; the next n_kv blocks rope K (k [n_kv, d]) and store it at
// `pos`, the last n_kv store V; own_k / own_v get the step's rows at full precision in the
// codecs' domains. `inv_freq` null: q and k come roped.
extern "C" __global__ void kv_step(
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    const float* __restrict__ inv_freq, int neox, int pos, float* __restrict__ q_out,
    float scale, int n_head, int n_kv, int d, long long capacity, uint8_t* __restrict__ k_rows,
    float* __restrict__ own_k, int k_codec, int k_rb, const float* __restrict__ k_cb,
    const float* __restrict__ k_mids, int k_n_mids, uint8_t* __restrict__ v_rows,
    float* __restrict__ own_v, int v_codec, int v_rb, const float* __restrict__ v_cb,
    const float* __restrict__ v_mids, int v_n_mids) {
    __shared__ float x[MAX_RD];
    const int blk = blockIdx.x, i = threadIdx.x;
    const bool is_q = blk < n_head, is_k = !is_q && blk < n_head + n_kv;
    const int h = is_q ? blk : is_k ? blk - n_head : blk - n_head - n_kv;
    const float* src = (is_q ? q : is_k ? k : v) + (size_t)h * d;
    if (i < d) x[i] = src[i];
    __syncthreads();
    if (!is_q && !is_k) {
        store_row(i < d ? x[i] : 0.f,
                  v_rows + ((size_t)h * capacity + (size_t)pos % capacity) * v_rb,
                  own_v + (size_t)h * d, v_codec, d, v_cb, v_mids, v_n_mids);
        return;
    }
    if (inv_freq) rope_shared(x, inv_freq, d, pos, neox != 0);
    if (is_k) {
        store_row(i < d ? x[i] : 0.f,
                  k_rows + ((size_t)h * capacity + (size_t)pos % capacity) * k_rb,
                  own_k + (size_t)h * d, k_codec, d, k_cb, k_mids, k_n_mids);
        return;
    }
    if (k_codec != C_F16) wht_shared(x, d, false);
    if (i < d) q_out[(size_t)h * d + i] = x[i] * scale;
}

// out [n_kv, n, d] = positions first..first+n of every head, decoded to values (rotation
// undone). One block of d threads per (position, head).
extern "C" __global__ void kv_dequant(const uint8_t* __restrict__ rows, float* __restrict__ out,
                                      int codec, int row_bytes, long long capacity, int first,
                                      int n, int d, const float* __restrict__ cb) {
    __shared__ float s[MAX_RD];
    const int r = blockIdx.x, h = blockIdx.y, i = threadIdx.x;
    const uint8_t* row = rows + ((size_t)h * capacity + (size_t)(first + r) % capacity) * row_bytes;
    if (2 * i < d) {
        const float2 p = read_pair(codec, row, 2 * i, d, cb);
        s[2 * i] = p.x;
        s[2 * i + 1] = p.y;
    }
    __syncthreads();
    if (codec == C_TURBO4 || codec == C_TURBO3) wht_shared(s, d, true);
    if (i < d) out[((size_t)h * n + r) * d + i] = s[i];
}

// Values v..v+8 (v a multiple of 8) of a stored row in the codec's domain, before the group's
// norm: turbo rows give raw centroids and their norm separately (one multiply per score or
// weight instead of eight). f16 and f32 rows give the values and a norm of 1.
template <int C>
__device__ __forceinline__ float read_oct(const uint8_t* __restrict__ row, int v, int d,
                                          const float* cb, float* x) {
    if (C == C_F16) {
        const uint4 w = *reinterpret_cast<const uint4*>(row + 2 * v);
        const unsigned int ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int k = 0; k < 4; k++) {
            x[2 * k] = __half2float(__ushort_as_half((unsigned short)(ws[k] & 0xffff)));
            x[2 * k + 1] = __half2float(__ushort_as_half((unsigned short)(ws[k] >> 16)));
        }
        return 1.f;
    }
    if (C == C_F32) {
        const float4* r = reinterpret_cast<const float4*>(row) + v / 4;
        const float4 a = r[0], b = r[1];
        x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w;
        x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
        return 1.f;
    }
    const int g = group_width(d), o = v % g;
    const uint8_t* grp = row + (v / g) * group_bytes(C, g);
    if (C == C_TURBO4) {
        // indices two per byte, low nibble first; 16-bit loads (64-wide groups are 34 bytes)
        const unsigned short* p =
            reinterpret_cast<const unsigned short*>(grp + (g == 128 ? 4 : 2) + o / 2);
        const unsigned int w = p[0] | ((unsigned int)p[1] << 16);
#pragma unroll
        for (int k = 0; k < 8; k++) x[k] = cb[(w >> (4 * k)) & 15];
    } else {
        // turbo3: low two bits four per byte, then the high bits eight per byte
        const unsigned int lo = *reinterpret_cast<const unsigned short*>(grp + 2 + o / 4);
        const unsigned int hi = grp[2 + g / 4 + o / 8];
#pragma unroll
        for (int k = 0; k < 8; k++) x[k] = cb[((lo >> (2 * k)) & 3) | (((hi >> k) & 1) << 2)];
    }
    return half_at(grp);
}

#define DEC_MAX_WARPS 8  // warps a flash-decoding block may have
#define DEC_SPLIT 256    // most rows a flash-decoding slice may have

// A decoding block's shared memory, declared once per kernel for both of its inlined copies.
template <int Q>
struct DecodeShared {
    float kcb[16], vcb[16];
    __align__(16) float q[Q * MAX_AD];
    float p[DEC_SPLIT * Q];  // [row][query]: scores, then weights
    float acc[Q * MAX_AD];
};

// Flash-decoding partials, one block per (KV head, slice): slices 0..n_split-1 cover the past
// positions first..first+n (`split` each), slice n_split (when own_k is given) the step's own
// position from full-precision rows. Queries q [n_kv, n_q, d] are in K's domain and already
// scaled; V accumulates in V's domain. Three passes over the slice, so that no running max
// rescales the accumulators and few values live in registers: scores (a row read by d/8 lanes,
// eight values each, the queries from shared memory), then per query the slice max and the
// weights, then V weighted by them. Partials: max, sum of weights, weighted V sum relative to
// that max.
template <int Q, int KC, int VC>
__device__ __forceinline__ void attn_partial(
    const float* __restrict__ q, const uint8_t* __restrict__ k_rows,
    const uint8_t* __restrict__ v_rows, int k_rb, int v_rb, const float* __restrict__ k_cb,
    const float* __restrict__ v_cb, long long capacity, int first, int n, int n_split,
    const float* __restrict__ own_k, const float* __restrict__ own_v, float* __restrict__ part_max,
    float* __restrict__ part_sum, float* __restrict__ part_acc, int n_q, int d, int split,
    DecodeShared<Q>& sh) {
    float *kcb = sh.kcb, *vcb = sh.vcb, *sq = sh.q, *sp = sh.p, *sacc = sh.acc;
    const int kvh = blockIdx.x, part = blockIdx.y, slots = gridDim.y;
    const bool is_own = part == n_split;
    const int lo = is_own ? 0 : part * split;
    const int len = is_own ? 1 : max(0, min(n, lo + split) - lo);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;
    if (tid < 16) {
        kcb[tid] = k_cb[tid];
        vcb[tid] = v_cb[tid];
    }
    for (int i = tid; i < n_q * d; i += blockDim.x) {
        sq[i] = q[(size_t)kvh * n_q * d + i];
        sacc[i] = 0.f;
    }
    __syncthreads();
    const int L = d / 8, R = 32 / L, sub = lane / L, v0 = 8 * (lane % L);
    const int stride = warps * R;
    auto row_of = [&](const uint8_t* rows, const float* own, int rb, int r) {
        const size_t slot = (size_t)(first + lo + r) % capacity;
        return is_own ? reinterpret_cast<const uint8_t*>(own + (size_t)kvh * d)
                      : rows + ((size_t)kvh * capacity + slot) * rb;
    };
    // Scores. The loop bound is the same for the whole warp, so the shuffles see every lane.
    for (int r0 = warp * R; r0 < len; r0 += stride) {
        const int r = r0 + sub;
        float kx[8];
        const float kn = read_oct<KC>(row_of(k_rows, own_k, k_rb, r < len ? r : 0), v0, d, kcb, kx);
#pragma unroll
        for (int qi = 0; qi < Q; qi++) {
            if (qi >= n_q) break;
            const float4 a = *reinterpret_cast<const float4*>(sq + qi * d + v0);
            const float4 b = *reinterpret_cast<const float4*>(sq + qi * d + v0 + 4);
            float s = a.x * kx[0] + a.y * kx[1] + a.z * kx[2] + a.w * kx[3] + b.x * kx[4] +
                      b.y * kx[5] + b.z * kx[6] + b.w * kx[7];
            for (int off = L / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffff, s, off);
            if (r < len && lane % L == 0) sp[r * Q + qi] = s * kn;
        }
    }
    __syncthreads();
    // Per query (a warp each): the slice max, the weights in place of the scores, their sum.
    for (int qi = warp; qi < n_q; qi += warps) {
        float m = -INFINITY;
        for (int r = lane; r < len; r += 32) m = fmaxf(m, sp[r * Q + qi]);
        for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, off));
        float l = 0.f;
        for (int r = lane; r < len; r += 32) {
            const float p = __expf(sp[r * Q + qi] - m);
            sp[r * Q + qi] = p;
            l += p;
        }
        for (int off = 16; off > 0; off >>= 1) l += __shfl_xor_sync(0xffffffff, l, off);
        if (lane == 0) {
            const size_t o = ((size_t)kvh * slots + part) * n_q + qi;
            part_max[o] = m;
            part_sum[o] = l;
        }
    }
    __syncthreads();
    // V weighted by the weights: no shuffles inside, so lanes past the slice may leave early.
    float acc[Q][8];
#pragma unroll
    for (int qi = 0; qi < Q; qi++)
#pragma unroll
        for (int k = 0; k < 8; k++) acc[qi][k] = 0.f;
    for (int r = warp * R + sub; r < len; r += stride) {
        float vx[8];
        const float vn = read_oct<VC>(row_of(v_rows, own_v, v_rb, r), v0, d, vcb, vx);
#pragma unroll
        for (int qi = 0; qi < Q; qi++) {
            if (qi >= n_q) break;
            const float w = sp[r * Q + qi] * vn;
#pragma unroll
            for (int k = 0; k < 8; k++) acc[qi][k] += w * vx[k];
        }
    }
    // Lane groups of a warp hold the same values of different rows; warps add in shared memory.
#pragma unroll
    for (int qi = 0; qi < Q; qi++) {
        if (qi >= n_q) break;
#pragma unroll
        for (int k = 0; k < 8; k++) {
            for (int off = L; off < 32; off <<= 1)
                acc[qi][k] += __shfl_xor_sync(0xffffffff, acc[qi][k], off);
            if (sub == 0) atomicAdd(sacc + qi * d + v0 + k, acc[qi][k]);
        }
    }
    __syncthreads();
    const size_t slot = (size_t)kvh * slots + part;
    for (int i = tid; i < n_q * d; i += blockDim.x) part_acc[slot * n_q * d + i] = sacc[i];
}

// One instance per (GQA group bound, K codec, V codec): with the codecs known at compile time
// the row decoding is straight-line code. The own position (full-precision rows)
// takes the second inlined copy.
#define ATTN_PARTIAL(NAME, Q, KC, VC)                                                          \
    extern "C" __global__ void __launch_bounds__(32 * DEC_MAX_WARPS) NAME(                     \
        const float* q, const uint8_t* k_rows, const uint8_t* v_rows, int k_rb, int v_rb,      \
        const float* k_cb, const float* v_cb, long long capacity, int first, int n,            \
        int n_split, const float* own_k, const float* own_v, float* part_max,                  \
        float* part_sum, float* part_acc, int n_q, int d, int split) {                         \
        __shared__ DecodeShared<Q> sh;                                                         \
        if (blockIdx.y == n_split)                                                             \
            attn_partial<Q, C_F32, C_F32>(q, k_rows, v_rows, k_rb, v_rb, k_cb, v_cb, capacity, \
                                          first, n, n_split, own_k, own_v, part_max, part_sum, \
                                          part_acc, n_q, d, split, sh);                        \
        else                                                                                   \
            attn_partial<Q, KC, VC>(q, k_rows, v_rows, k_rb, v_rb, k_cb, v_cb, capacity,       \
                                    first, n, n_split, own_k, own_v, part_max, part_sum,       \
                                    part_acc, n_q, d, split, sh);                              \
    }

#define ATTN_PARTIAL_V(PREFIX, Q, KN, KC)                   \
    ATTN_PARTIAL(PREFIX##_##KN##_f16, Q, KC, C_F16)         \
    ATTN_PARTIAL(PREFIX##_##KN##_turbo4, Q, KC, C_TURBO4)   \
    ATTN_PARTIAL(PREFIX##_##KN##_turbo3, Q, KC, C_TURBO3)

#define ATTN_PARTIAL_KV(PREFIX, Q)                      \
    ATTN_PARTIAL_V(PREFIX, Q, f16, C_F16)               \
    ATTN_PARTIAL_V(PREFIX, Q, turbo4, C_TURBO4)         \
    ATTN_PARTIAL_V(PREFIX, Q, turbo3, C_TURBO3)

// GQA groups up to 4 (llama 8B, SmolLM2), and up to 8.
ATTN_PARTIAL_KV(kv_attn_partial_q4, 4)
ATTN_PARTIAL_KV(kv_attn_partial_q8, MAX_Q)

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
// rotated back out of V's domain when `inverse`; one block per (KV head, query): slot weights
// in shared memory (`slots` floats, dynamic), then (value × phase) threads sum over the slots.
extern "C" __global__ void kv_attn_merge(const float* __restrict__ part_max,
                                         const float* __restrict__ part_sum,
                                         const float* __restrict__ part_acc,
                                         float* __restrict__ out, int n_q, int d, int slots,
                                         int inverse) {
    extern __shared__ float weight[];
    __shared__ float red[32];
    __shared__ float sums[1024];
    const int kvh = blockIdx.x, qi = blockIdx.y, tid = threadIdx.x;
    const size_t base = (size_t)kvh * slots;
    float m = -INFINITY;
    for (int s = tid; s < slots; s += blockDim.x) m = fmaxf(m, part_max[(base + s) * n_q + qi]);
    m = block_reduce(m, red, true);
    float den = 0.f;
    for (int s = tid; s < slots; s += blockDim.x) {
        const float pm = part_max[(base + s) * n_q + qi];
        const float w = pm == -INFINITY ? 0.f : __expf(pm - m);
        weight[s] = w;
        den += w * part_sum[(base + s) * n_q + qi];
    }
    den = block_reduce(den, red, false);
    __syncthreads();
    const int phases = blockDim.x / d, v = tid % d, phase = tid / d;
    float num = 0.f;
    if (phase < phases)
        for (int s = phase; s < slots; s += phases)
            num += weight[s] * part_acc[((base + s) * n_q + qi) * d + v];
    sums[tid] = num;
    __syncthreads();
    __syncthreads();
    if (phase == 0) {
        for (int p = 1; p < phases; p++) num += sums[p * d + v];
        sums[v] = den > 0.f ? num / den : 0.f;
    }
    __syncthreads();
    if (inverse) wht_shared(sums, d, true);
    if (tid < d) out[((size_t)kvh * n_q + qi) * d + tid] = sums[tid];
}

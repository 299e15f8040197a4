// The KV cache in GPU memory: RoPE, quantize-on-append, the WHT for queries and outputs,
// flash-decoding attention over stored rows, and dequantization of a past range for prefill.
// Rows are the CPU codecs' bytes (src/kv/codec/{f16,turbo4,turbo3}.rs) in the CPU store's
// layout: head-major rings of `capacity` rows, position p in slot p % capacity.
#include <cuda_fp16.h>
#include <stdint.h>

#include "mma.cuh"

#define MAX_Q 8       // queries per KV head the decode kernel takes (a GQA group)
#define MAX_AD 256    // widest head the attention kernel takes
#define MAX_RD 512    // widest row the append/dequantize/WHT kernels take

// Codec ids, as src/kv/device.rs passes them.
#define C_F16 0
#define C_TURBO4 1
#define C_TURBO3 2

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

#define DEC_WARPS 4    // warps of a flash-decoding block
#define DEC_SPLIT 256  // most rows a flash-decoding slice may have

// Starts copying global bytes [src, src + n) into shared memory at `dst` (16-byte aligned) with
// cp.async, all in flight at once; returns where byte `src` lands. The copy is in aligned
// 16-byte pieces, so up to 15 bytes either side come along (device stores keep 16 bytes of
// slack after their last row; allocations start aligned).
__device__ __forceinline__ const uint8_t* stage_bytes(uint8_t* dst, const uint8_t* src,
                                                      size_t n) {
    const size_t s = (size_t)src, a = s & ~(size_t)15, e = (s + n + 15) & ~(size_t)15;
    for (size_t i = 16 * threadIdx.x; i < e - a; i += 16 * blockDim.x) {
        const unsigned d = (unsigned)__cvta_generic_to_shared(dst + i);
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(a + i));
    }
    return dst + (s - a);
}

// Shared bytes `stage_rows` takes for `len` rows of `rb` bytes: rows of a multiple of 16 bytes
// (f16) go one per 16-byte-padded line, so that ldmatrix's eight row reads hit distinct banks;
// others (turbo) are copied as the ring's bytes, in up to two aligned pieces.
__device__ __host__ __forceinline__ size_t staged_size(int len, int rb) {
    return rb % 16 == 0 ? (size_t)len * (rb + 16) : (((size_t)len * rb + 15) & ~(size_t)15) + 64;
}

// A slice of a head's ring in shared memory: rows 0..n1 from `a` on, the rest (wrapped to the
// ring's start) from `b` on, `stride` bytes apart.
struct Staged {
    const uint8_t *a, *b;
    int n1, stride;
    __device__ __forceinline__ const uint8_t* row(int r) const {
        return r < n1 ? a + (size_t)r * stride : b + (size_t)(r - n1) * stride;
    }
};

// Starts the copy of rows slot0.. (len of them, wrapping at `capacity`) of the ring at `head`
// into `dst`, as one cp.async group.
__device__ __forceinline__ Staged stage_rows(uint8_t* dst, const uint8_t* head, int rb,
                                             long long capacity, long long slot0, int len) {
    Staged st;
    if (rb % 16 == 0) {
        const int pieces = rb / 16;
        for (int i = threadIdx.x; i < len * pieces; i += blockDim.x) {
            const int r = i / pieces, p = i % pieces;
            const long long slot = slot0 + r < capacity ? slot0 + r : slot0 + r - capacity;
            const uint8_t* src = head + (size_t)slot * rb + 16 * p;
            const unsigned d = (unsigned)__cvta_generic_to_shared(dst + (size_t)r * (rb + 16) +
                                                                  16 * p);
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src));
        }
        st.a = st.b = dst;
        st.n1 = len;
        st.stride = rb + 16;
    } else {
        const int n1 = (int)min((long long)len, capacity - slot0);
        st.n1 = n1;
        st.stride = rb;
        st.a = stage_bytes(dst, head + slot0 * rb, (size_t)n1 * rb);
        st.b = stage_bytes(dst + ((((size_t)n1 * rb + 15) & ~(size_t)15) + 16), head,
                           (size_t)(len - n1) * rb);
    }
    asm volatile("cp.async.commit_group;\n" ::);
    return st;
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t* a, const void* p, bool trans) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(p);
    if (trans)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
                     : "r"(s));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
                     : "r"(s));
}

// The codes of N consecutive values (from `first`, a multiple of 8) of a turbo group, packed:
// turbo4 four bits each; turbo3 the low two bits in lo, the high bits in hi.
template <int C, int N>
struct Codes {
    uint32_t lo[(N + 15) / 16 * 2], hi;
    __device__ __forceinline__ void load(const uint8_t* grp, int gw, int first) {
        const unsigned short* p;
        if (C == C_TURBO4) {
            p = reinterpret_cast<const unsigned short*>(grp + (gw == 128 ? 4 : 2) + first / 2);
#pragma unroll
            for (int k = 0; k < N / 8; k++) lo[k] = p[2 * k] | ((uint32_t)p[2 * k + 1] << 16);
        } else {
            p = reinterpret_cast<const unsigned short*>(grp + 2 + first / 4);
#pragma unroll
            for (int k = 0; k < N / 8; k++) {
                const uint32_t w = p[k];
                lo[k / 2] = (k % 2 == 0) ? w : (lo[k / 2] | (w << 16));
            }
            hi = 0;
#pragma unroll
            for (int k = 0; k < N / 8; k++) hi |= (uint32_t)grp[2 + gw / 4 + first / 8 + k] << (8 * k);
        }
    }
    __device__ __forceinline__ int at(int j) const {
        if (C == C_TURBO4) return (lo[j / 8] >> (4 * (j % 8))) & 15;
        return ((lo[j / 16] >> (2 * (j % 16))) & 3) | (((hi >> j) & 1) << 2);
    }
};

// A decoding block's shared memory besides the staged rows.
struct DecodeShared {
    float kcb[16], vcb[16];
    float p[DEC_SPLIT * MAX_Q];  // [row][query]: scores, then weights
    union {
        float q[MAX_Q * MAX_AD];    // the queries, until they are in registers
        float acc[MAX_Q * MAX_AD];  // then the warps' V sums
    };
};

// Flash-decoding partials on tensor cores, one block per (KV head, slice of `split` past
// positions from `first`). Queries q [n_kv, n_q ≤ 8, D] are in K's domain and already scaled;
// V accumulates in V's domain. The slice's K and V rows are staged into shared memory (all
// loads in flight at once), then three passes: scores Sᵀ = K·Qᵀ (16 rows a warp per mma tile,
// n_q queries in the 8 columns), per query the slice max and the weights, then Oᵀ = Vᵀ·Pᵀ.
// f16 rows enter the mma by ldmatrix; turbo rows are decoded from their codes in an order of
// our choosing (a dot product does not care which dimension pairs with which, as long as the
// query's follows): each lane reads contiguous codes, and the output dims are put back in
// place when written. Turbo norms scale the scores per row, and the weights per row and group
// for V. Partials: max, sum of weights, weighted V sum relative to that max.
template <int D, int KC, int VC>
__device__ __forceinline__ void attn_partial(
    const float* __restrict__ q, const uint8_t* __restrict__ k_rows,
    const uint8_t* __restrict__ v_rows, int k_rb, int v_rb, const float* __restrict__ k_cb,
    const float* __restrict__ v_cb, long long capacity, int first, int n,
    float* __restrict__ part_max, float* __restrict__ part_sum, float* __restrict__ part_acc,
    int n_q, int split, DecodeShared& sh, uint8_t* stage) {
    constexpr int GW = D % 128 == 0 ? 128 : 64, G = D / GW, KS = GW / 16;
    const int kvh = blockIdx.x, part = blockIdx.y, slots = gridDim.y;
    const int lo = part * split, len = min(n, lo + split) - lo;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const long long slot0 = ((long long)first + lo) % capacity;
    const size_t head = (size_t)kvh * capacity;
    const Staged ks = stage_rows(stage, k_rows + head * k_rb, k_rb, capacity, slot0, len);
    const Staged vs = stage_rows(stage + staged_size(split, k_rb), v_rows + head * v_rb, v_rb,
                                 capacity, slot0, len);
    if (tid < 16) {
        sh.kcb[tid] = k_cb[tid];
        sh.vcb[tid] = v_cb[tid];
    }
    for (int i = tid; i < MAX_Q * D; i += blockDim.x)
        sh.q[i] = i < n_q * D ? q[(size_t)kvh * n_q * D + i] : 0.f;
    __syncthreads();
    // Qᵀ as the scores' B operand: query g, the k-step's dims (f16: 2t, 2t+1 | +8; turbo: the
    // lane's four codes of the k-step, kk·4.. within its quarter of the group).
    uint32_t qb[D / 16][2];
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        const float* qr = sh.q + g * D;
        int c0, c1;
        if (KC == C_F16) {
            c0 = 16 * kk + 2 * t;
            c1 = c0 + 8;
        } else {
            c0 = (kk / KS) * GW + (GW / 4) * t + 4 * (kk % KS);
            c1 = c0 + 2;
        }
        qb[kk][0] = pack_half2(qr[c0], qr[c0 + 1]);
        qb[kk][1] = pack_half2(qr[c1], qr[c1 + 1]);
    }
    asm volatile("cp.async.wait_group 1;\n" ::);
    __syncthreads();
    for (int i = tid; i < MAX_Q * D; i += blockDim.x) sh.acc[i] = 0.f;
    // Scores: a warp per 16-row tile; lanes hold rows g, g + 8 and queries 2t, 2t + 1.
    for (int r0 = 16 * warp; r0 < len; r0 += 16 * DEC_WARPS) {
        float s[4] = {0.f, 0.f, 0.f, 0.f};
        const int ra = min(r0 + g, len - 1), rb = min(r0 + g + 8, len - 1);
        if (KC == C_F16) {
            const int m = lane >> 3, rr = min(r0 + (lane & 7) + 8 * (m & 1), len - 1);
            const uint8_t* row = ks.row(rr) + 16 * (m >> 1);
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                uint32_t a[4];
                ldmatrix_x4(a, row + 32 * kk, false);
                mma16816(s, a, qb[kk][0], qb[kk][1]);
            }
        } else {
#pragma unroll
            for (int gi = 0; gi < G; gi++) {
                const int gb = (KC == C_TURBO4 ? (GW == 128 ? 4 : 2) + GW / 2 : 2 + GW / 4 + GW / 8);
                const uint8_t *ga = ks.row(ra) + gi * gb, *gbp = ks.row(rb) + gi * gb;
                Codes<KC, GW / 4> ca, cb;
                ca.load(ga, GW, (GW / 4) * t);
                cb.load(gbp, GW, (GW / 4) * t);
                float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                for (int kk = 0; kk < KS; kk++) {
                    const uint32_t a[4] = {
                        pack_half2(sh.kcb[ca.at(4 * kk)], sh.kcb[ca.at(4 * kk + 1)]),
                        pack_half2(sh.kcb[cb.at(4 * kk)], sh.kcb[cb.at(4 * kk + 1)]),
                        pack_half2(sh.kcb[ca.at(4 * kk + 2)], sh.kcb[ca.at(4 * kk + 3)]),
                        pack_half2(sh.kcb[cb.at(4 * kk + 2)], sh.kcb[cb.at(4 * kk + 3)])};
                    mma16816(c, a, qb[gi * KS + kk][0], qb[gi * KS + kk][1]);
                }
                const float na = half_at(ga), nb = half_at(gbp);
                s[0] += na * c[0];
                s[1] += na * c[1];
                s[2] += nb * c[2];
                s[3] += nb * c[3];
            }
        }
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int r = r0 + g + 8 * (e >> 1), qi = 2 * t + (e & 1);
            if (r < len && qi < n_q) sh.p[r * MAX_Q + qi] = s[e];
        }
    }
    __syncthreads();
    // Per query (a warp each): the slice max, the weights in place of the scores, their sum.
    for (int qi = warp; qi < n_q; qi += DEC_WARPS) {
        float m = -INFINITY;
        for (int r = lane; r < len; r += 32) m = fmaxf(m, sh.p[r * MAX_Q + qi]);
        for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, off));
        float l = 0.f;
        for (int r = lane; r < len; r += 32) {
            const float p = __expf(sh.p[r * MAX_Q + qi] - m);
            sh.p[r * MAX_Q + qi] = p;
            l += p;
        }
        for (int off = 16; off > 0; off >>= 1) l += __shfl_xor_sync(0xffffffff, l, off);
        if (lane == 0) {
            const size_t o = ((size_t)kvh * slots + part) * n_q + qi;
            part_max[o] = m;
            part_sum[o] = l;
        }
    }
    asm volatile("cp.async.wait_group 0;\n" ::);
    __syncthreads();
    // Oᵀ = Vᵀ·Pᵀ: a warp per 16-row k-step; lanes hold dims (per m-tile) g, g + 8 and queries
    // 2t, 2t + 1. Turbo m-tile mt of group gi: dims gi·GW + (GW/8)·g + 2·(mt % (GW/16)) (+1).
    float o[D / 16][4];
#pragma unroll
    for (int mt = 0; mt < D / 16; mt++)
#pragma unroll
        for (int e = 0; e < 4; e++) o[mt][e] = 0.f;
    for (int r0 = 16 * warp; r0 < len; r0 += 16 * DEC_WARPS) {
        int rr[4];
        float w[4];
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const int r = r0 + 2 * t + (k & 1) + 8 * (k >> 1);
            rr[k] = min(r, len - 1);
            w[k] = r < len && g < n_q ? sh.p[r * MAX_Q + g] : 0.f;
        }
        if (VC == C_F16) {
            const uint32_t b0 = pack_half2(w[0], w[1]), b1 = pack_half2(w[2], w[3]);
            const int m = lane >> 3, lr = min(r0 + (lane & 7) + 8 * (m >> 1), len - 1);
            const uint8_t* row = vs.row(lr) + 16 * (m & 1);
#pragma unroll
            for (int mt = 0; mt < D / 16; mt++) {
                uint32_t a[4];
                ldmatrix_x4(a, row + 32 * mt, true);
                mma16816(o[mt], a, b0, b1);
            }
        } else {
            constexpr int MT = GW / 16;
#pragma unroll
            for (int gi = 0; gi < G; gi++) {
                const int gb = (VC == C_TURBO4 ? (GW == 128 ? 4 : 2) + GW / 2 : 2 + GW / 4 + GW / 8);
                Codes<VC, GW / 8> c[4];
                float wn[4];
#pragma unroll
                for (int k = 0; k < 4; k++) {
                    const uint8_t* grp = vs.row(rr[k]) + gi * gb;
                    c[k].load(grp, GW, (GW / 8) * g);
                    wn[k] = w[k] * half_at(grp);
                }
                const uint32_t b0 = pack_half2(wn[0], wn[1]), b1 = pack_half2(wn[2], wn[3]);
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    const uint32_t a[4] = {
                        pack_half2(sh.vcb[c[0].at(2 * mt)], sh.vcb[c[1].at(2 * mt)]),
                        pack_half2(sh.vcb[c[0].at(2 * mt + 1)], sh.vcb[c[1].at(2 * mt + 1)]),
                        pack_half2(sh.vcb[c[2].at(2 * mt)], sh.vcb[c[3].at(2 * mt)]),
                        pack_half2(sh.vcb[c[2].at(2 * mt + 1)], sh.vcb[c[3].at(2 * mt + 1)])};
                    mma16816(o[gi * MT + mt], a, b0, b1);
                }
            }
        }
    }
    // Warps add their tiles in shared memory, in natural dimension order.
#pragma unroll
    for (int mt = 0; mt < D / 16; mt++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int qi = 2 * t + (e & 1), hi = e >> 1;
            int dim;
            if (VC == C_F16) {
                dim = 16 * mt + g + 8 * hi;
            } else {
                constexpr int MT = GW / 16;
                dim = (mt / MT) * GW + (GW / 8) * g + 2 * (mt % MT) + hi;
            }
            if (qi < n_q) atomicAdd(sh.acc + qi * D + dim, o[mt][e]);
        }
    __syncthreads();
    const size_t slot = (size_t)kvh * slots + part;
    for (int i = tid; i < n_q * D; i += blockDim.x) part_acc[slot * n_q * D + i] = sh.acc[i];
}

// One instance per (head dim, K codec, V codec): the row decoding is straight-line code and the
// fragments stay in registers. Dynamic shared memory: the staged slice,
// staged_size(split, k_rb) + staged_size(split, v_rb) bytes.
#define ATTN_PARTIAL(D, KN, KC, VN, VC)                                                        \
    extern "C" __global__ void __launch_bounds__(32 * DEC_WARPS)                               \
        kv_attn_partial_##D##_##KN##_##VN(                                                     \
            const float* q, const uint8_t* k_rows, const uint8_t* v_rows, int k_rb, int v_rb,  \
            const float* k_cb, const float* v_cb, long long capacity, int first, int n,        \
            float* part_max, float* part_sum, float* part_acc, int n_q, int split) {           \
        __shared__ DecodeShared sh;                                                            \
        extern __shared__ __align__(16) uint8_t stage[];                                       \
        attn_partial<D, KC, VC>(q, k_rows, v_rows, k_rb, v_rb, k_cb, v_cb, capacity, first, n, \
                                part_max, part_sum, part_acc, n_q, split, sh, stage);          \
    }

#define ATTN_PARTIAL_V(D, KN, KC)                      \
    ATTN_PARTIAL(D, KN, KC, f16, C_F16)                \
    ATTN_PARTIAL(D, KN, KC, turbo4, C_TURBO4)          \
    ATTN_PARTIAL(D, KN, KC, turbo3, C_TURBO3)

#define ATTN_PARTIAL_KV(D)                  \
    ATTN_PARTIAL_V(D, f16, C_F16)           \
    ATTN_PARTIAL_V(D, turbo4, C_TURBO4)     \
    ATTN_PARTIAL_V(D, turbo3, C_TURBO3)

ATTN_PARTIAL_KV(64)
ATTN_PARTIAL_KV(128)
ATTN_PARTIAL_KV(256)

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

// out [n_kv, n_q, d] = Σ_s e^{m_s − M} acc_s / Σ_s e^{m_s − M} sum_s over the `slots` partials
// and the step's own position (its score q·own_k, its row own_v; q [n_kv, n_q, d] as the
// partials took it, own_k/own_v [n_kv, d] in the codecs' domains), rotated back out of V's
// domain when `inverse`; one block per (KV head, query): slot weights in shared memory (`slots`
// floats, dynamic), then (value × phase) threads sum over the slots.
extern "C" __global__ void kv_attn_merge(const float* __restrict__ part_max,
                                         const float* __restrict__ part_sum,
                                         const float* __restrict__ part_acc,
                                         const float* __restrict__ q,
                                         const float* __restrict__ own_k,
                                         const float* __restrict__ own_v,
                                         float* __restrict__ out, int n_q, int d, int slots,
                                         int inverse) {
    extern __shared__ float weight[];
    __shared__ float red[32];
    __shared__ float sums[1024];
    const int kvh = blockIdx.x, qi = blockIdx.y, tid = threadIdx.x;
    const size_t base = (size_t)kvh * slots;
    float own = 0.f;
    for (int v = tid; v < d; v += blockDim.x)
        own += q[((size_t)kvh * n_q + qi) * d + v] * own_k[(size_t)kvh * d + v];
    own = block_reduce(own, red, false);
    float m = own;
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
        for (int p = 1; p < phases; p++) num += sums[p * d + v];
        sums[v] = num / den;
    }
    __syncthreads();
    if (inverse) wht_shared(sums, d, true);
    if (tid < d) out[((size_t)kvh * n_q + qi) * d + tid] = sums[tid];
}

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

// y = scale · WHT(x) (or its inverse) per row of d values; one block of d threads per row.
extern "C" __global__ void kv_wht(const float* __restrict__ x, float* __restrict__ y, int d,
                                  float scale, int inverse) {
    __shared__ float s[MAX_RD];
    const size_t base = (size_t)blockIdx.x * d;
    const int i = threadIdx.x;
    if (i < d) s[i] = x[base + i];
    wht_shared(s, d, inverse != 0);
    if (i < d) y[base + i] = s[i] * scale;
}

// Stores rows x [t, n_kv, d] at positions pos..pos+t, quantizing with `codec` (turbo: codebook
// `cb` and its decision points `mids`, src/kv/codec/turbo.rs's quantize_group). With `own`
// non-null also writes each row in the codec's domain at full precision (for the decode step's
// own position). One block of d threads per (KV head, token).
extern "C" __global__ void kv_append(const float* __restrict__ x, uint8_t* __restrict__ rows,
                                     float* __restrict__ own, int codec, int row_bytes,
                                     long long capacity, int pos, int n_kv, int d,
                                     const float* __restrict__ cb, const float* __restrict__ mids,
                                     int n_mids) {
    __shared__ float s[MAX_RD];
    __shared__ float warp_sums[MAX_RD / 32];
    __shared__ uint8_t codes[MAX_RD];
    const int h = blockIdx.x, ti = blockIdx.y, i = threadIdx.x;
    // A chunk longer than a sliding-window ring wraps onto itself: only its last `capacity`
    // rows survive, so earlier ones are not written (blocks run in no particular order).
    if ((long long)ti + capacity < (long long)gridDim.y) return;
    const size_t src = ((size_t)ti * n_kv + h) * d;
    uint8_t* row = rows + ((size_t)h * capacity + (size_t)(pos + ti) % capacity) * row_bytes;
    const float val = i < d ? x[src + i] : 0.f;
    if (codec == C_F16) {
        if (i < d) {
            put_half(row + 2 * i, val);
            if (own) own[src + i] = val;
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
        if (own) own[src + i] = norm * y;
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

// Flash-decoding partials, one block per (KV head, slice): slices 0..n_split-1 cover the past
// positions first..first+n (`split` each), slice n_split (when own_k is given) the step's own
// position from full-precision rows. Queries q [n_kv, n_q, d] are in K's domain and already
// scaled; V accumulates in V's domain. A row is read by d/8 lanes, eight values each, so a warp
// holds 32/(d/8) rows at once; each lane group runs an online softmax over its rows U at a
// time (one rescale per step), then groups merge by shuffles and warps through shared memory.
// Partials: max, sum of weights, weighted V sum relative to that max.
template <int Q, int KC, int VC, int U>
__device__ __forceinline__ void attn_partial(
    const float* __restrict__ q, const uint8_t* __restrict__ k_rows,
    const uint8_t* __restrict__ v_rows, int k_rb, int v_rb, const float* __restrict__ k_cb,
    const float* __restrict__ v_cb, long long capacity, int first, int n, int n_split,
    const float* __restrict__ own_k, const float* __restrict__ own_v, float* __restrict__ part_max,
    float* __restrict__ part_sum, float* __restrict__ part_acc, int n_q, int d, int split) {
    __shared__ float kcb[16], vcb[16];
    __shared__ float wm[DEC_MAX_WARPS][Q], wl[DEC_MAX_WARPS][Q];
    __shared__ float sacc[Q * MAX_AD];
    const int kvh = blockIdx.x, part = blockIdx.y, slots = gridDim.y;
    const bool is_own = part == n_split;
    const int lo = is_own ? 0 : part * split;
    const int len = is_own ? 1 : max(0, min(n, lo + split) - lo);
    if (threadIdx.x < 16) {
        kcb[threadIdx.x] = k_cb[threadIdx.x];
        vcb[threadIdx.x] = v_cb[threadIdx.x];
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int L = d / 8, R = 32 / L, sub = lane / L, v0 = 8 * (lane % L);
    float qv[Q][8];
#pragma unroll
    for (int qi = 0; qi < Q; qi++)
#pragma unroll
        for (int k = 0; k < 8; k++)
            qv[qi][k] = qi < n_q ? q[((size_t)kvh * n_q + qi) * d + v0 + k] : 0.f;
    float m[Q], l[Q], acc[Q][8];
#pragma unroll
    for (int qi = 0; qi < Q; qi++) {
        m[qi] = -INFINITY;
        l[qi] = 0.f;
#pragma unroll
        for (int k = 0; k < 8; k++) acc[qi][k] = 0.f;
    }
    __syncthreads();
    const int stride = warps * R;
    // The loop bound is the same for the whole warp, so the shuffles see every lane.
    for (int base = warp * R; base < len; base += U * stride) {
        float kx[U][8], vx[U][8], kn[U], vn[U];
        bool ok[U];
#pragma unroll
        for (int j = 0; j < U; j++) {
            const int rj = base + j * stride + sub;
            ok[j] = rj < len;
            const int rr = ok[j] ? rj : 0;
            const size_t slot = (size_t)(first + lo + rr) % capacity;
            const uint8_t* kr = is_own ? reinterpret_cast<const uint8_t*>(own_k + (size_t)kvh * d)
                                       : k_rows + ((size_t)kvh * capacity + slot) * k_rb;
            const uint8_t* vr = is_own ? reinterpret_cast<const uint8_t*>(own_v + (size_t)kvh * d)
                                       : v_rows + ((size_t)kvh * capacity + slot) * v_rb;
            kn[j] = read_oct<KC>(kr, v0, d, kcb, kx[j]);
            vn[j] = read_oct<VC>(vr, v0, d, vcb, vx[j]);
        }
#pragma unroll
        for (int qi = 0; qi < Q; qi++) {
            if (qi >= n_q) break;
            float s[U];
            float mn = m[qi];
#pragma unroll
            for (int j = 0; j < U; j++) {
                float dot = 0.f;
#pragma unroll
                for (int k = 0; k < 8; k++) dot += qv[qi][k] * kx[j][k];
                s[j] = dot * kn[j];
                for (int off = L / 2; off > 0; off >>= 1) s[j] += __shfl_xor_sync(0xffffffff, s[j], off);
                if (!ok[j]) s[j] = -INFINITY;
                mn = fmaxf(mn, s[j]);
            }
            if (mn == -INFINITY) continue;
            const float c = __expf(m[qi] - mn);
            m[qi] = mn;
            l[qi] *= c;
#pragma unroll
            for (int k = 0; k < 8; k++) acc[qi][k] *= c;
#pragma unroll
            for (int j = 0; j < U; j++) {
                const float p = __expf(s[j] - mn);
                l[qi] += p;
                const float w = p * vn[j];
#pragma unroll
                for (int k = 0; k < 8; k++) acc[qi][k] += w * vx[j][k];
            }
        }
    }
    // Lane groups of a warp hold the same values of different rows: merge them.
    for (int off = L; off < 32; off <<= 1) {
#pragma unroll
        for (int qi = 0; qi < Q; qi++) {
            if (qi >= n_q) break;
            const float mo = __shfl_xor_sync(0xffffffff, m[qi], off);
            const float lo_ = __shfl_xor_sync(0xffffffff, l[qi], off);
            const float mn = fmaxf(m[qi], mo);
            const float c1 = m[qi] == -INFINITY ? 0.f : __expf(m[qi] - mn);
            const float c2 = mo == -INFINITY ? 0.f : __expf(mo - mn);
            l[qi] = l[qi] * c1 + lo_ * c2;
#pragma unroll
            for (int k = 0; k < 8; k++) {
                const float ao = __shfl_xor_sync(0xffffffff, acc[qi][k], off);
                acc[qi][k] = acc[qi][k] * c1 + ao * c2;
            }
            m[qi] = mn;
        }
    }
    if (lane == 0) {
        for (int qi = 0; qi < n_q; qi++) {
            wm[warp][qi] = m[qi];
            wl[warp][qi] = l[qi];
        }
    }
    __syncthreads();
    float scale[Q];
#pragma unroll
    for (int qi = 0; qi < Q; qi++) {
        if (qi >= n_q) break;
        float bm = -INFINITY;
        for (int w = 0; w < warps; w++) bm = fmaxf(bm, wm[w][qi]);
        scale[qi] = (bm == -INFINITY || m[qi] == -INFINITY) ? 0.f : __expf(m[qi] - bm);
        if (threadIdx.x == 0) {
            float bl = 0.f;
            for (int w = 0; w < warps; w++)
                if (wm[w][qi] != -INFINITY) bl += wl[w][qi] * __expf(wm[w][qi] - bm);
            const size_t o = ((size_t)kvh * slots + part) * n_q + qi;
            part_max[o] = bm;
            part_sum[o] = bl;
        }
    }
    for (int w = 0; w < warps; w++) {
        if (warp == w && sub == 0) {
#pragma unroll
            for (int qi = 0; qi < Q; qi++) {
                if (qi >= n_q) break;
#pragma unroll
                for (int k = 0; k < 8; k++) {
                    const int v = qi * d + v0 + k;
                    sacc[v] = (w == 0 ? 0.f : sacc[v]) + scale[qi] * acc[qi][k];
                }
            }
        }
        __syncthreads();
    }
    const size_t slot = (size_t)kvh * slots + part;
    for (int i = threadIdx.x; i < n_q * d; i += blockDim.x) part_acc[slot * n_q * d + i] = sacc[i];
}

// One instance per (GQA group bound, K codec, V codec, rows per step): with the codecs known at
// compile time the row decoding is straight-line code. The own position (full-precision rows)
// takes the second inlined copy.
#define ATTN_PARTIAL(NAME, Q, KC, VC, U)                                                       \
    extern "C" __global__ void __launch_bounds__(32 * DEC_MAX_WARPS) NAME(                     \
        const float* q, const uint8_t* k_rows, const uint8_t* v_rows, int k_rb, int v_rb,      \
        const float* k_cb, const float* v_cb, long long capacity, int first, int n,            \
        int n_split, const float* own_k, const float* own_v, float* part_max,                  \
        float* part_sum, float* part_acc, int n_q, int d, int split) {                         \
        if (blockIdx.y == n_split)                                                             \
            attn_partial<Q, C_F32, C_F32, 1>(q, k_rows, v_rows, k_rb, v_rb, k_cb, v_cb,        \
                                             capacity, first, n, n_split, own_k, own_v,        \
                                             part_max, part_sum, part_acc, n_q, d, split);     \
        else                                                                                   \
            attn_partial<Q, KC, VC, U>(q, k_rows, v_rows, k_rb, v_rb, k_cb, v_cb, capacity,    \
                                       first, n, n_split, own_k, own_v, part_max, part_sum,    \
                                       part_acc, n_q, d, split);                               \
    }

#define ATTN_PARTIAL_V(PREFIX, Q, U, KN, KC)                   \
    ATTN_PARTIAL(PREFIX##_##KN##_f16, Q, KC, C_F16, U)         \
    ATTN_PARTIAL(PREFIX##_##KN##_turbo4, Q, KC, C_TURBO4, U)   \
    ATTN_PARTIAL(PREFIX##_##KN##_turbo3, Q, KC, C_TURBO3, U)

#define ATTN_PARTIAL_KV(PREFIX, Q, U)                      \
    ATTN_PARTIAL_V(PREFIX, Q, U, f16, C_F16)               \
    ATTN_PARTIAL_V(PREFIX, Q, U, turbo4, C_TURBO4)         \
    ATTN_PARTIAL_V(PREFIX, Q, U, turbo3, C_TURBO3)

// GQA groups up to 4 (llama 8B, SmolLM2), and up to 8.
ATTN_PARTIAL_KV(kv_attn_partial_q4, 4, 2)
ATTN_PARTIAL_KV(kv_attn_partial_q8, MAX_Q, 2)

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

// out [n_kv, n_q, d] = Σ_s e^{m_s − M} acc_s / Σ_s e^{m_s − M} sum_s over the `slots` partials;
// one block per (KV head, query): slot weights in shared memory (`slots` floats, dynamic),
// then (value × phase) threads sum over the slots.
extern "C" __global__ void kv_attn_merge(const float* __restrict__ part_max,
                                         const float* __restrict__ part_sum,
                                         const float* __restrict__ part_acc,
                                         float* __restrict__ out, int n_q, int d, int slots) {
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
    if (phase == 0) {
        for (int p = 1; p < phases; p++) num += sums[p * d + v];
        out[((size_t)kvh * n_q + qi) * d + v] = den > 0.f ? num / den : 0.f;
    }
}

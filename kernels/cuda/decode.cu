// Flash-decoding partials on tensor cores: attention of one decode step's queries over a slice
// of the stored rows, read compressed (kv.cu's kv_attn_merge adds the step's own position and
// merges the slices). Built once per K codec (build.rs defines DEC_KC, its id, and DEC_KN, its
// name), each module holding the kernels for every V codec and head dim, so a run JIT-compiles
// only what its K type needs.
#include <cuda_fp16.h>
#include <stdint.h>

#include "codec.cuh"
#include "mma.cuh"

#define MAX_Q 8       // queries per KV head the decode kernel takes (a GQA group)
#define MAX_AD 256    // widest head the attention kernel takes

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
// turbo4 four bits each; turbo3/turbo2 the low two bits in lo, turbo3's high bits in hi.
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
            if (C == C_TURBO3)
#pragma unroll
                for (int k = 0; k < N / 8; k++)
                    hi |= (uint32_t)grp[2 + gw / 4 + first / 8 + k] << (8 * k);
        }
    }
    __device__ __forceinline__ int at(int j) const {
        if (C == C_TURBO4) return (lo[j / 8] >> (4 * (j % 8))) & 15;
        const int low = (lo[j / 16] >> (2 * (j % 16))) & 3;
        return C == C_TURBO3 ? low | (((hi >> j) & 1) << 2) : low;
    }
};

// What lane (g, t) of a warp feeds the scores' mma from one stored group (GW values) of a K row:
// per k-step kk of the group four values, at dims dim(kk, t) .. + 3 of the group — an order of
// our choosing (a dot product does not care which dimension pairs with which, as long as the
// query follows) in which each lane reads contiguous bytes. Turbo values are codebook entries
// (`cb`), ggml's are the block's integers; both are scaled by the group's f16 after the mma.
template <int C, int GW>
struct KLane {
    Codes<C, GW / 4> c;
    uint32_t w[2];
    // spectral: decoded value by value through the head's table (`cb`)
    const uint8_t* row;
    SpectralScales sc;
    __device__ __forceinline__ void load(const uint8_t* grp, int t) {
        if constexpr (C == C_SPECTRAL4) {
            row = grp;
            sc.load(grp);
        } else if constexpr (is_turbo(C)) {
            c.load(grp, GW, (GW / 4) * t);
        } else {
            w[0] = u32_at(grp + 2 + 4 * t);
            if constexpr (C == C_Q8_0) w[1] = u32_at(grp + 18 + 4 * t);
        }
    }
    __device__ __forceinline__ float at(int kk, int j, const float* cb, int t) const {
        if constexpr (C == C_SPECTRAL4)
            return sc.value(row, __float_as_uint(cb[dim(kk, t) + j]), cb + GW);
        else if constexpr (is_turbo(C)) return cb[c.at(4 * kk + j)];
        else if constexpr (C == C_Q8_0) return (float)(int8_t)(w[kk] >> (8 * j));
        // q4_0: byte j holds value j (low nibble) and j + 16 (high)
        else return (float)((int)((w[0] >> (8 * j + 4 * kk)) & 15) - 8);
    }
    static __device__ __forceinline__ int dim(int kk, int t) {
        return lane_major(C) ? (GW / 4) * t + 4 * kk : 16 * kk + 4 * t;
    }
};

// The same for the V sums' mma (Vᵀ as its A operand): lane g's two values (hi = 0, 1) of each
// m-tile mt of the group sit at dims dim(mt, g, hi).
template <int C, int GW>
struct VLane {
    Codes<C, GW / 8> c;
    uint32_t w;
    const uint8_t* row;
    SpectralScales sc;
    __device__ __forceinline__ void load(const uint8_t* grp, int g) {
        if constexpr (C == C_SPECTRAL4) {
            row = grp;
            sc.load(grp);
        } else if constexpr (is_turbo(C)) {
            c.load(grp, GW, (GW / 8) * g);
        } else {
            const unsigned short* h = reinterpret_cast<const unsigned short*>(grp + 2 + 2 * g);
            w = h[0];
            if constexpr (C == C_Q8_0) w |= (uint32_t)h[8] << 16;
        }
    }
    __device__ __forceinline__ float at(int mt, int hi, const float* cb, int g) const {
        if constexpr (C == C_SPECTRAL4)
            return sc.value(row, __float_as_uint(cb[dim(mt, g, hi)]), cb + GW);
        else if constexpr (is_turbo(C)) return cb[c.at(2 * mt + hi)];
        else if constexpr (C == C_Q8_0) return (float)(int8_t)(w >> (16 * mt + 8 * hi));
        else return (float)((int)((w >> (8 * hi + 4 * mt)) & 15) - 8);
    }
    static __device__ __forceinline__ int dim(int mt, int g, int hi) {
        return lane_major(C) ? (GW / 8) * g + 2 * mt + hi : 16 * mt + 2 * g + hi;
    }
};

// Floats of a codec's codebook in a decoding block's shared memory: turbo's 16 centroids, or a
// spectral head's descriptors and centroids.
__host__ __device__ constexpr int cb_floats(int c, int d) {
    return c == C_SPECTRAL4 ? SPEC_MIDS(d) : 16;
}

// A decoding block's shared memory besides the staged rows.
template <int D, int KC, int VC>
struct DecodeShared {
    float kcb[cb_floats(KC, D)], vcb[cb_floats(VC, D)];
    float p[DEC_SPLIT * MAX_Q];  // [row][query]: scores, then weights
    float q[MAX_Q * MAX_AD];  // the queries, until they are in registers
};

// Flash-decoding partials on tensor cores, one block per (KV head, slice of `split` past
// positions from `first`). Queries q [n_kv, n_q ≤ 8, D] are in K's domain and already scaled;
// V accumulates in V's domain. The slice's K and V rows are staged into shared memory (all
// loads in flight at once), then three passes: scores Sᵀ = K·Qᵀ (16 rows a warp per mma tile,
// n_q queries in the 8 columns), per query the slice max and the weights, then Oᵀ = Vᵀ·Pᵀ.
// f16 rows enter the mma by ldmatrix; other rows are decoded group by group in the lane order
// of KLane / VLane, and the output dims are put back in place when written. Group scales (turbo
// norms, ggml block scales) scale the scores per row and group after the mma, and V's the
// weights per row and group before it. Partials: max, sum of weights, weighted V sum relative
// to that max.
template <int D, int KC, int VC>
__device__ __forceinline__ void attn_partial(
    const float* __restrict__ q, const uint8_t* __restrict__ k_rows,
    const uint8_t* __restrict__ v_rows, int k_rb, int v_rb, const float* __restrict__ k_cb,
    const float* __restrict__ v_cb, long long capacity, int first, int n,
    float* __restrict__ part_max, float* __restrict__ part_sum, float* __restrict__ part_acc,
    int n_q, int split, DecodeShared<D, KC, VC>& sh, uint8_t* stage) {
    constexpr int KGW = group_width(KC, D), KS = KGW / 16, KGB = group_bytes(KC, KGW);
    constexpr int VGW = group_width(VC, D), MT = VGW / 16, VGB = group_bytes(VC, VGW);
    const int kvh = blockIdx.x, part = blockIdx.y, slots = gridDim.y;
    const int lo = part * split, len = min(n, lo + split) - lo;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    const long long slot0 = ((long long)first + lo) % capacity;
    const size_t head = (size_t)kvh * capacity;
    const Staged ks = stage_rows(stage, k_rows + head * k_rb, k_rb, capacity, slot0, len);
    const Staged vs = stage_rows(stage + staged_size(split, k_rb), v_rows + head * v_rb, v_rb,
                                 capacity, slot0, len);
    // Spectral tables are per head: this block's.
    const float* kt = KC == C_SPECTRAL4 ? k_cb + (size_t)kvh * spec_table(D) : k_cb;
    const float* vt = VC == C_SPECTRAL4 ? v_cb + (size_t)kvh * spec_table(D) : v_cb;
    for (int i = tid; i < cb_floats(KC, D); i += blockDim.x) sh.kcb[i] = kt[i];
    for (int i = tid; i < cb_floats(VC, D); i += blockDim.x) sh.vcb[i] = vt[i];
    for (int i = tid; i < MAX_Q * D; i += blockDim.x)
        sh.q[i] = i < n_q * D ? q[(size_t)kvh * n_q * D + i] : 0.f;
    __syncthreads();
    // Qᵀ as the scores' B operand: query g, the k-step's dims (f16: 2t, 2t+1 | +8; others: the
    // four KLane gives the lane).
    uint32_t qb[D / 16][2];
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        const float* qr = sh.q + g * D;
        int c0, c1;
        if (KC == C_F16) {
            c0 = 16 * kk + 2 * t;
            c1 = c0 + 8;
        } else {
            c0 = (kk / KS) * KGW + KLane<KC, KGW>::dim(kk % KS, t);
            c1 = c0 + 2;
        }
        qb[kk][0] = pack_half2(qr[c0], qr[c0 + 1]);
        qb[kk][1] = pack_half2(qr[c1], qr[c1 + 1]);
    }
    asm volatile("cp.async.wait_group 1;\n" ::);
    __syncthreads();
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
            for (int gi = 0; gi < D / KGW; gi++) {
                const uint8_t *ga = ks.row(ra) + gi * KGB, *gb = ks.row(rb) + gi * KGB;
                KLane<KC, KGW> la, lb;
                la.load(ga, t);
                lb.load(gb, t);
                float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                for (int kk = 0; kk < KS; kk++) {
                    const uint32_t a[4] = {
                        pack_half2(la.at(kk, 0, sh.kcb, t), la.at(kk, 1, sh.kcb, t)),
                        pack_half2(lb.at(kk, 0, sh.kcb, t), lb.at(kk, 1, sh.kcb, t)),
                        pack_half2(la.at(kk, 2, sh.kcb, t), la.at(kk, 3, sh.kcb, t)),
                        pack_half2(lb.at(kk, 2, sh.kcb, t), lb.at(kk, 3, sh.kcb, t))};
                    mma16816(c, a, qb[gi * KS + kk][0], qb[gi * KS + kk][1]);
                }
                // (spectral values come scaled)
                const float na = KC == C_SPECTRAL4 ? 1.f : half_at(ga);
                const float nb = KC == C_SPECTRAL4 ? 1.f : half_at(gb);
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
    // 2t, 2t + 1 (other than f16: m-tile mt of group gi at VLane's dims in the group).
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
#pragma unroll
            for (int gi = 0; gi < D / VGW; gi++) {
                VLane<VC, VGW> c[4];
                float wn[4];
#pragma unroll
                for (int k = 0; k < 4; k++) {
                    const uint8_t* grp = vs.row(rr[k]) + gi * VGB;
                    c[k].load(grp, g);
                    wn[k] = VC == C_SPECTRAL4 ? w[k] : w[k] * half_at(grp);
                }
                const uint32_t b0 = pack_half2(wn[0], wn[1]), b1 = pack_half2(wn[2], wn[3]);
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    const uint32_t a[4] = {
                        pack_half2(c[0].at(mt, 0, sh.vcb, g), c[1].at(mt, 0, sh.vcb, g)),
                        pack_half2(c[0].at(mt, 1, sh.vcb, g), c[1].at(mt, 1, sh.vcb, g)),
                        pack_half2(c[2].at(mt, 0, sh.vcb, g), c[3].at(mt, 0, sh.vcb, g)),
                        pack_half2(c[2].at(mt, 1, sh.vcb, g), c[3].at(mt, 1, sh.vcb, g))};
                    mma16816(o[gi * MT + mt], a, b0, b1);
                }
            }
        }
    }
    // Warps put their tiles in natural dimension order into the staging area (its rows are
    // read), then they are added in warp order: the same sums every run, no atomics.
    __syncthreads();
    float* tiles = reinterpret_cast<float*>(stage);  // [DEC_WARPS][n_q][D]
#pragma unroll
    for (int mt = 0; mt < D / 16; mt++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int qi = 2 * t + (e & 1), hi = e >> 1;
            int dim;
            if (VC == C_F16)
                dim = 16 * mt + g + 8 * hi;
            else
                dim = (mt / MT) * VGW + VLane<VC, VGW>::dim(mt % MT, g, hi);
            if (qi < n_q) tiles[(warp * n_q + qi) * D + dim] = o[mt][e];
        }
    __syncthreads();
    const size_t slot = (size_t)kvh * slots + part;
    for (int i = tid; i < n_q * D; i += blockDim.x) {
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < DEC_WARPS; w++) sum += tiles[w * n_q * D + i];
        part_acc[slot * n_q * D + i] = sum;
    }
}

// One instance per (head dim, K codec, V codec): the row decoding is straight-line code and the
// fragments stay in registers. Dynamic shared memory: the staged slice,
// staged_size(split, k_rb) + staged_size(split, v_rb) bytes, and at least the warps' V tiles
// (DEC_WARPS · n_q · D floats).
#define ATTN_PARTIAL_(D, KN, KC, VN, VC)                                                       \
    extern "C" __global__ void __launch_bounds__(32 * DEC_WARPS)                               \
        kv_attn_partial_##D##_##KN##_##VN(                                                     \
            const float* q, const uint8_t* k_rows, const uint8_t* v_rows, int k_rb, int v_rb,  \
            const float* k_cb, const float* v_cb, long long capacity, int first, int n,        \
            float* part_max, float* part_sum, float* part_acc, int n_q, int split) {           \
        __shared__ DecodeShared<D, KC, VC> sh;                                                 \
        extern __shared__ __align__(16) uint8_t stage[];                                       \
        attn_partial<D, KC, VC>(q, k_rows, v_rows, k_rb, v_rb, k_cb, v_cb, capacity, first, n, \
                                part_max, part_sum, part_acc, n_q, split, sh, stage);          \
    }
// (expands DEC_KN before pasting)
#define ATTN_PARTIAL(D, KN, KC, VN, VC) ATTN_PARTIAL_(D, KN, KC, VN, VC)

#define ATTN_PARTIAL_64(VN, VC) ATTN_PARTIAL(64, DEC_KN, DEC_KC, VN, VC)
#define ATTN_PARTIAL_128(VN, VC) ATTN_PARTIAL(128, DEC_KN, DEC_KC, VN, VC)
#define ATTN_PARTIAL_256(VN, VC) ATTN_PARTIAL(256, DEC_KN, DEC_KC, VN, VC)
FOR_EACH_CODEC(ATTN_PARTIAL_64)
FOR_EACH_CODEC(ATTN_PARTIAL_128)
FOR_EACH_CODEC(ATTN_PARTIAL_256)

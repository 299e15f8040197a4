// turbo4 decode attention on compressed rows, reading the CPU codec's bytes as they are
// (src/kv/codec/turbo4.rs): per group of g = 64 or 128 values, an f16 norm (+ 2 reserved bytes
// when g = 128) and g/2 bytes of 4-bit codebook indices, low nibble first. Queries arrive
// already rotated (the WHT is applied once per head on the host), so a score is
// norm · Σ q_i · cb[idx_i] and V accumulates in the rotated domain.
#include <cuda_fp16.h>
#include <stdint.h>

#define MAX_Q 8
#define MAX_D 512

__device__ __forceinline__ int group_width(int d) { return (d % 128 == 0) ? 128 : 64; }
__device__ __forceinline__ int group_header(int g) { return g == 128 ? 4 : 2; }

__device__ __forceinline__ float read_norm(const uint8_t* p) {
    __half h;
    *reinterpret_cast<uint16_t*>(&h) = (uint16_t)p[0] | ((uint16_t)p[1] << 8);
    return __half2float(h);
}

// scores[qi·n + j] = <q[qi], row j> for n_q ≤ MAX_Q prepared queries [n_q, d], one warp per row.
extern "C" __global__ void turbo4_scores(const float* __restrict__ q, const uint8_t* __restrict__ rows,
                                         const float* __restrict__ codebook, float* __restrict__ scores,
                                         int n_q, int n, int d, int row_bytes) {
    __shared__ float sq[MAX_Q * MAX_D];
    __shared__ float cb[16];
    for (int i = threadIdx.x; i < n_q * d; i += blockDim.x) sq[i] = q[i];
    if (threadIdx.x < 16) cb[threadIdx.x] = codebook[threadIdx.x];
    __syncthreads();
    const int g = group_width(d), h = group_header(g), gb = h + g / 2;
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int j = blockIdx.x * warps + (threadIdx.x >> 5); j < n; j += gridDim.x * warps) {
        const uint8_t* row = rows + (size_t)j * row_bytes;
        float acc[MAX_Q];
#pragma unroll
        for (int qi = 0; qi < MAX_Q; qi++) acc[qi] = 0.f;
        // each lane takes one index byte (two values) per 64 values
        for (int v = 2 * lane; v < d; v += 64) {
            const int gi = v / g, o = v % g;
            const uint8_t* grp = row + gi * gb;
            const uint8_t b = grp[h + o / 2];
            const float norm = read_norm(grp);
            const float x0 = norm * cb[b & 15], x1 = norm * cb[b >> 4];
#pragma unroll
            for (int qi = 0; qi < MAX_Q; qi++)
                if (qi < n_q) acc[qi] += sq[qi * d + v] * x0 + sq[qi * d + v + 1] * x1;
        }
#pragma unroll
        for (int qi = 0; qi < MAX_Q; qi++) {
            float s = acc[qi];
            for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffff, s, off);
            if (lane == 0 && qi < n_q) scores[(size_t)qi * n + j] = s;
        }
    }
}

// out[qi·d + v] += Σ_j w[qi·n + j] · row_j[v] (rotated domain). Each block takes a slice of the
// rows and each thread one index byte (two values) of every row in it; slices meet in atomics.
extern "C" __global__ void turbo4_axpy(const float* __restrict__ w, const uint8_t* __restrict__ rows,
                                       const float* __restrict__ codebook, float* __restrict__ out,
                                       int n_q, int n, int d, int row_bytes, int rows_per_block) {
    __shared__ float cb[16];
    if (threadIdx.x < 16) cb[threadIdx.x] = codebook[threadIdx.x];
    __syncthreads();
    const int g = group_width(d), h = group_header(g), gb = h + g / 2;
    const int v = 2 * threadIdx.x;
    if (v >= d) return;
    const int gi = v / g, o = v % g;
    const int j0 = blockIdx.x * rows_per_block, j1 = min(n, j0 + rows_per_block);
    float a0[MAX_Q], a1[MAX_Q];
#pragma unroll
    for (int qi = 0; qi < MAX_Q; qi++) a0[qi] = a1[qi] = 0.f;
    for (int j = j0; j < j1; j++) {
        const uint8_t* grp = rows + (size_t)j * row_bytes + gi * gb;
        const uint8_t b = grp[h + o / 2];
        const float norm = read_norm(grp);
        const float x0 = norm * cb[b & 15], x1 = norm * cb[b >> 4];
#pragma unroll
        for (int qi = 0; qi < MAX_Q; qi++) {
            if (qi < n_q) {
                const float wj = w[(size_t)qi * n + j];
                a0[qi] += wj * x0;
                a1[qi] += wj * x1;
            }
        }
    }
    for (int qi = 0; qi < n_q; qi++) {
        atomicAdd(&out[qi * d + v], a0[qi]);
        atomicAdd(&out[qi * d + v + 1], a1[qi]);
    }
}

// Flash-decoding over turbo4 K and V rows, one block per (KV head, slice of the context):
// scores of the slice's rows for the head's GQA group (queries prepared and pre-scaled), the
// slice's softmax max and sum, and its weighted V sum in the rotated domain. `turbo4_attn_merge`
// combines the slices. Rows of head h start at h · head_stride bytes; n rows, `split` per slice.
#define SPLIT_MAX 256
extern "C" __global__ void turbo4_attn_partial(const float* __restrict__ q, const uint8_t* __restrict__ k_rows,
                                               const uint8_t* __restrict__ v_rows, const float* __restrict__ codebook,
                                               float* __restrict__ part_max, float* __restrict__ part_sum,
                                               float* __restrict__ part_acc, int n_q, int n, int d, int row_bytes,
                                               long long head_stride, int split) {
    __shared__ float sq[MAX_Q * 256];
    __shared__ float sw[MAX_Q * SPLIT_MAX];
    __shared__ float cb[16];
    __shared__ float smax[MAX_Q], ssum[MAX_Q];
    const int kvh = blockIdx.x, part = blockIdx.y, n_split = gridDim.y;
    const int lo = part * split, hi = min(n, lo + split), len = max(0, hi - lo);
    for (int i = threadIdx.x; i < n_q * d; i += blockDim.x) sq[i] = q[(size_t)kvh * n_q * d + i];
    if (threadIdx.x < 16) cb[threadIdx.x] = codebook[threadIdx.x];
    __syncthreads();
    const int g = group_width(d), h = group_header(g), gb = h + g / 2;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const uint8_t* kh = k_rows + (size_t)kvh * head_stride;
    const uint8_t* vh = v_rows + (size_t)kvh * head_stride;
    for (int r = warp; r < len; r += warps) {
        const uint8_t* row = kh + (size_t)(lo + r) * row_bytes;
        float acc[MAX_Q];
#pragma unroll
        for (int qi = 0; qi < MAX_Q; qi++) acc[qi] = 0.f;
        for (int v = 2 * lane; v < d; v += 64) {
            const uint8_t* grp = row + (v / g) * gb;
            const uint8_t b = grp[h + (v % g) / 2];
            const float norm = read_norm(grp);
            const float x0 = norm * cb[b & 15], x1 = norm * cb[b >> 4];
#pragma unroll
            for (int qi = 0; qi < MAX_Q; qi++)
                if (qi < n_q) acc[qi] += sq[qi * d + v] * x0 + sq[qi * d + v + 1] * x1;
        }
#pragma unroll
        for (int qi = 0; qi < MAX_Q; qi++) {
            float s = acc[qi];
            for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffff, s, off);
            if (lane == 0 && qi < n_q) sw[qi * SPLIT_MAX + r] = s;
        }
    }
    __syncthreads();
    // one warp per query: max, then weights and their sum
    for (int qi = warp; qi < n_q; qi += warps) {
        float m = -INFINITY;
        for (int r = lane; r < len; r += 32) m = fmaxf(m, sw[qi * SPLIT_MAX + r]);
        for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, off));
        float s = 0.f;
        for (int r = lane; r < len; r += 32) {
            const float e = __expf(sw[qi * SPLIT_MAX + r] - m);
            sw[qi * SPLIT_MAX + r] = e;
            s += e;
        }
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffff, s, off);
        if (lane == 0) {
            smax[qi] = m;
            ssum[qi] = s;
        }
    }
    __syncthreads();
    const size_t slot = (size_t)kvh * n_split + part;
    if (threadIdx.x < n_q) {
        part_max[slot * n_q + threadIdx.x] = smax[threadIdx.x];
        part_sum[slot * n_q + threadIdx.x] = ssum[threadIdx.x];
    }
    // V: threads form (d/2 index bytes) × (phases) and each phase takes every phases-th row;
    // the phases' sums meet in shared memory (reusing the query buffer).
    const int cols = d / 2, phases = blockDim.x / cols;
    const int byte = threadIdx.x % cols, phase = threadIdx.x / cols;
    const int v = 2 * byte;
    float a0[MAX_Q], a1[MAX_Q];
#pragma unroll
    for (int qi = 0; qi < MAX_Q; qi++) a0[qi] = a1[qi] = 0.f;
    if (phase < phases) {
        for (int r = phase; r < len; r += phases) {
            const uint8_t* grp = vh + (size_t)(lo + r) * row_bytes + (v / g) * gb;
            const uint8_t b = grp[h + (v % g) / 2];
            const float norm = read_norm(grp);
            const float x0 = norm * cb[b & 15], x1 = norm * cb[b >> 4];
#pragma unroll
            for (int qi = 0; qi < MAX_Q; qi++) {
                if (qi < n_q) {
                    const float w = sw[qi * SPLIT_MAX + r];
                    a0[qi] += w * x0;
                    a1[qi] += w * x1;
                }
            }
        }
    }
    __syncthreads();
    // sq is free now: [n_q, d] partial sums, phases added one after another
    for (int p = 0; p < phases; p++) {
        if (phase == p) {
            for (int qi = 0; qi < n_q; qi++) {
                sq[qi * d + v] = (p == 0 ? 0.f : sq[qi * d + v]) + a0[qi];
                sq[qi * d + v + 1] = (p == 0 ? 0.f : sq[qi * d + v + 1]) + a1[qi];
            }
        }
        __syncthreads();
    }
    for (int i = threadIdx.x; i < n_q * d; i += blockDim.x) part_acc[slot * n_q * d + i] = sq[i];
}

// out[(kvh·n_q + qi)·d + v] = Σ_s e^{m_s − M} acc_s / Σ_s e^{m_s − M} sum_s: one block per KV
// head, a thread per value.
extern "C" __global__ void turbo4_attn_merge(const float* __restrict__ part_max, const float* __restrict__ part_sum,
                                             const float* __restrict__ part_acc, float* __restrict__ out,
                                             int n_q, int d, int n_split) {
    const int kvh = blockIdx.x;
    for (int v = threadIdx.x; v < d; v += blockDim.x) {
        for (int qi = 0; qi < n_q; qi++) {
            float m = -INFINITY;
            for (int s = 0; s < n_split; s++) m = fmaxf(m, part_max[((size_t)kvh * n_split + s) * n_q + qi]);
            float num = 0.f, den = 0.f;
            for (int s = 0; s < n_split; s++) {
                const size_t slot = (size_t)kvh * n_split + s;
                const float pm = part_max[slot * n_q + qi];
                if (pm == -INFINITY) continue;
                const float c = __expf(pm - m);
                den += c * part_sum[slot * n_q + qi];
                num += c * part_acc[(slot * n_q + qi) * d + v];
            }
            out[((size_t)kvh * n_q + qi) * d + v] = den > 0.f ? num / den : 0.f;
        }
    }
}

// Prefill attention on tensor cores: one launch per key tile does QKᵀ, the causal / sliding
// mask, an online softmax and PV for every query head (flash-attention style; mma.sync
// m16n8k16, f16 inputs, f32 accumulators), reading the queries and the chunk's own K/V
// token-major as the model made them and the past as kv_dequant wrote it.
#include <cuda_fp16.h>
#include <stdint.h>

#include "mma.cuh"

#define FP_BQ 64   // query rows per block: 4 warps × 16
#define FP_BK 64   // keys per shared-memory tile
#define FP_PAD 8   // halves of padding per shared row: conflict-free fragment loads

// Queries q [t, n_head, D] (roped, unscaled) at positions pos..pos+t attend to keys a..b:
// those below `pos` from the past (past_k/past_v [n_kv, b' − a, D], b' = min(b, pos)), the
// rest from the chunk (new_k/new_v [t, n_kv, D]). A key is visible to a query at p when it is
// ≤ p and, with `window` > 0, > p − window. A KV head's query rows are ordered (token, group
// member). State between tiles, per (KV head, row): running max (log2 units) m, weight sum l
// (n_kv · group · t each), unnormalized output o (· D); `has_state` reads it first, `last`
// writes out [t, n_head · D] instead of it. Grid (⌈group · t / 64⌉, n_kv), 128 threads.
template <int D>
__device__ __forceinline__ void flash_prefill(
    const float* __restrict__ q, const float* __restrict__ past_k,
    const float* __restrict__ past_v, const float* __restrict__ new_k,
    const float* __restrict__ new_v, float* __restrict__ m_state, float* __restrict__ l_state,
    float* __restrict__ o_state, float* __restrict__ out, float scale_log2, int t, int pos,
    int a, int b, int n_kv, int group, int window, int has_state, int last) {
    __shared__ __align__(16) __half ks[FP_BK][D + FP_PAD];
    __shared__ __align__(16) __half vs[FP_BK][D + FP_PAD];
    const int kvh = blockIdx.y, n_head = n_kv * group, rows = group * t;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const int r0 = blockIdx.x * FP_BQ, wr = r0 + warp * 16;
    const int n_past = min(b, pos) - a;
    // This thread's two rows (g and g + 8 of the warp's 16): token, head, validity.
    int row_tok[2], row_head[2];
    bool row_ok[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int r = wr + g + 8 * h;
        row_ok[h] = r < rows;
        row_tok[h] = row_ok[h] ? r / group : 0;
        row_head[h] = kvh * group + (row_ok[h] ? r % group : 0);
    }
    // Query fragments, scaled so that scores come out in log2 units.
    uint32_t qa[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++)
#pragma unroll
        for (int h = 0; h < 2; h++)
#pragma unroll
            for (int c = 0; c < 2; c++) {
                float2 x = make_float2(0.f, 0.f);
                if (row_ok[h])
                    x = *reinterpret_cast<const float2*>(
                        q + ((size_t)row_tok[h] * n_head + row_head[h]) * D + kk * 16 + 2 * tq +
                        8 * c);
                qa[kk][h + 2 * c] = pack_half2(x.x * scale_log2, x.y * scale_log2);
            }
    float o[D / 8][4];
    float m[2], l[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const size_t sr = (size_t)kvh * rows + wr + g + 8 * h;
        m[h] = has_state && row_ok[h] ? m_state[sr] : -INFINITY;
        l[h] = has_state && row_ok[h] && tq == 0 ? l_state[sr] : 0.f;
    }
#pragma unroll
    for (int dt = 0; dt < D / 8; dt++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int h = e >> 1;
            const size_t sr = (size_t)kvh * rows + wr + g + 8 * h;
            o[dt][e] = has_state && row_ok[h] ? o_state[sr * D + dt * 8 + 2 * tq + (e & 1)] : 0.f;
        }
    // Keys this block can see: up to its last token, from its first token's window.
    const int tok_lo = r0 / group, tok_hi = (min(r0 + FP_BQ, rows) - 1) / group;
    const int k_end = min(b, pos + tok_hi + 1);
    const int k_start = window > 0 ? max(a, pos + tok_lo - window + 1) : a;
    for (int j0 = k_start; j0 < k_end; j0 += FP_BK) {
        __syncthreads();
        // The tile into shared memory as f16, row-major; keys past the end zero.
        for (int i = threadIdx.x; i < FP_BK * D / 4; i += blockDim.x) {
            const int kr = i / (D / 4), c = 4 * (i % (D / 4)), j = j0 + kr;
            float4 kx = make_float4(0.f, 0.f, 0.f, 0.f), vx = kx;
            if (j < k_end) {
                const size_t src = j < pos ? ((size_t)kvh * n_past + (j - a)) * D + c
                                           : ((size_t)(j - pos) * n_kv + kvh) * D + c;
                const float* kp = j < pos ? past_k : new_k;
                const float* vp = j < pos ? past_v : new_v;
                kx = *reinterpret_cast<const float4*>(kp + src);
                vx = *reinterpret_cast<const float4*>(vp + src);
            }
            *reinterpret_cast<uint2*>(&ks[kr][c]) =
                make_uint2(pack_half2(kx.x, kx.y), pack_half2(kx.z, kx.w));
            *reinterpret_cast<uint2*>(&vs[kr][c]) =
                make_uint2(pack_half2(vx.x, vx.y), pack_half2(vx.z, vx.w));
        }
        __syncthreads();
        if (wr >= rows) continue;
        float s[FP_BK / 8][4];
#pragma unroll
        for (int nt = 0; nt < FP_BK / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) s[nt][e] = 0.f;
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                const __half* kr = &ks[nt * 8 + g][kk * 16 + 2 * tq];
                mma16816(s[nt], qa[kk], *reinterpret_cast<const uint32_t*>(kr),
                         *reinterpret_cast<const uint32_t*>(kr + 8));
            }
        }
        // Mask, then the online softmax per row (a row's values sit in the four lanes of a quad).
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = 0; nt < FP_BK / 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int h = e >> 1, j = j0 + nt * 8 + 2 * tq + (e & 1);
                const int p = pos + row_tok[h];
                const bool vis = row_ok[h] && j < k_end && j <= p && (window <= 0 || j > p - window);
                s[nt][e] = vis ? s[nt][e] : -INFINITY;
                mx[h] = fmaxf(mx[h], s[nt][e]);
            }
        float alpha[2], mu[2];
#pragma unroll
        for (int h = 0; h < 2; h++) {
            mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffff, mx[h], 1));
            mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffff, mx[h], 2));
            const float mn = fmaxf(m[h], mx[h]);
            mu[h] = mn == -INFINITY ? 0.f : mn;  // a row that sees nothing yet keeps zeros
            alpha[h] = exp2f(m[h] - mu[h]);
            m[h] = mn;
            l[h] *= alpha[h];
        }
#pragma unroll
        for (int nt = 0; nt < FP_BK / 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int h = e >> 1;
                s[nt][e] = exp2f(s[nt][e] - mu[h]);
                l[h] += s[nt][e];
            }
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++)
#pragma unroll
            for (int e = 0; e < 4; e++) o[dt][e] *= alpha[e >> 1];
        // P (the accumulator layout of two 16×8 tiles is the operand layout of one 16×16) · V.
#pragma unroll
        for (int kk = 0; kk < FP_BK / 16; kk++) {
            const uint32_t pa[4] = {
                pack_half2(s[2 * kk][0], s[2 * kk][1]), pack_half2(s[2 * kk][2], s[2 * kk][3]),
                pack_half2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                pack_half2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int dt = 0; dt < D / 8; dt++) {
                // V's operand is its 16×8 block transposed: lanes 0..15 name the block's rows.
                uint32_t b0, b1;
                const unsigned addr =
                    (unsigned)__cvta_generic_to_shared(&vs[kk * 16 + (lane & 15)][dt * 8]);
                asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                             : "=r"(b0), "=r"(b1)
                             : "r"(addr));
                mma16816(o[dt], pa, b0, b1);
            }
        }
    }
#pragma unroll
    for (int h = 0; h < 2; h++) {
        l[h] += __shfl_xor_sync(0xffffffff, l[h], 1);
        l[h] += __shfl_xor_sync(0xffffffff, l[h], 2);
    }
#pragma unroll
    for (int h = 0; h < 2; h++) {
        if (!row_ok[h]) continue;
        const size_t sr = (size_t)kvh * rows + wr + g + 8 * h;
        if (!last && tq == 0) {
            m_state[sr] = m[h];
            l_state[sr] = l[h];
        }
        const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++) {
            const int c = dt * 8 + 2 * tq;
            const float2 x = make_float2(o[dt][2 * h], o[dt][2 * h + 1]);
            if (last)
                *reinterpret_cast<float2*>(
                    out + ((size_t)row_tok[h] * n_head + row_head[h]) * D + c) =
                    make_float2(x.x * inv, x.y * inv);
            else
                *reinterpret_cast<float2*>(o_state + sr * D + c) = x;
        }
    }
}

#define FLASH_PREFILL(D)                                                                     \
    extern "C" __global__ void __launch_bounds__(128) kv_flash_prefill_d##D(                 \
        const float* q, const float* past_k, const float* past_v, const float* new_k,        \
        const float* new_v, float* m_state, float* l_state, float* o_state, float* out,      \
        float scale_log2, int t, int pos, int a, int b, int n_kv, int group, int window,     \
        int has_state, int last) {                                                           \
        flash_prefill<D>(q, past_k, past_v, new_k, new_v, m_state, l_state, o_state, out,    \
                         scale_log2, t, pos, a, b, n_kv, group, window, has_state, last);    \
    }

FLASH_PREFILL(64)
FLASH_PREFILL(128)

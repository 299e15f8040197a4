// Matrix × vector for the weight types that have our own CPU kernels (Q4_1, Q5_0;
// src/model/quant), rounding the activations as those kernels do: 8-bit blocks with f32 scales,
// where candle's MMVQ keeps f16 ones. A model of these types then sees the same activation
// codes on both devices, and only float order differs (issue 7: GPU perplexity against CPU).
#include <cuda_fp16.h>
#include <stdint.h>

#include "codec.cuh"

#define QK 32

// One activation block: scale d, d·Σq, 32 signed bytes (src/model/quant's Q8Block).
struct Q8 {
    float d, s;
    int qs[QK / 4];
};

// x [n_blocks · 32] → q [n_blocks], a warp per block, as src/model/quant/mod.rs's
// quantize_block computes it (IEEE division, round half away from zero).
extern "C" __global__ void q8_quantize(const float* __restrict__ x, Q8* __restrict__ q,
                                       int n_blocks) {
    const int b = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (b >= n_blocks) return;
    const float v = x[(size_t)b * QK + lane];
    float amax = fabsf(v);
    for (int off = 16; off > 0; off >>= 1)
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffff, amax, off));
    const float d = __fdiv_rn(amax, 127.f);
    const float id = d > 0.f ? __fdiv_rn(1.f, d) : 0.f;
    const int qi = (int)roundf(__fmul_rn(v, id));
    int sum = qi;
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, off);
    reinterpret_cast<int8_t*>(q[b].qs)[lane] = (int8_t)qi;
    if (lane == 0) {
        q[b].d = d;
        q[b].s = __fmul_rn(d, (float)sum);
    }
}

// Bit k of the 4-bit n moved to bit 4 of byte k (Q5_0's fifth bits beside their nibbles).
__device__ __forceinline__ int spread4(uint32_t n) {
    return (int)(((n & 1) << 4) | ((n & 2) << 11) | ((n & 4) << 18) | ((n & 8) << 25));
}

// y [t, rows] = x [t, cols] · wᵀ for w [rows, cols] in ggml blocks of `kind` (0: Q4_1, 20 bytes
// of f16 d, f16 m, 16 nibble bytes, value d·q + m; 1: Q5_0, 22 bytes of f16 d, 32 high bits, 16
// nibble bytes, value d·(q − 16)); element j < 16 in the low nibble of byte j, j + 16 in its
// high nibble. x comes as q8 blocks [t, nb]. A warp per (weight row, token), lanes over blocks.
extern "C" __global__ void quant_matvec(const uint8_t* __restrict__ w, const Q8* __restrict__ x,
                                        float* __restrict__ y, int rows, int nb, int kind) {
    const int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), ti = blockIdx.y;
    const int lane = threadIdx.x & 31;
    if (r >= rows) return;
    const int bb = kind == 0 ? 20 : 22;
    const uint8_t* wr = w + (size_t)r * nb * bb;
    const Q8* xr = x + (size_t)ti * nb;
    float acc = 0.f;
    for (int b = lane; b < nb; b += 32) {
        const uint8_t* blk = wr + (size_t)b * bb;
        const Q8& q = xr[b];
        const float d = half_at(blk);
        int sumi = 0;
        if (kind == 0) {
            for (int j = 0; j < 4; j++) {
                const uint32_t p = u32_at(blk + 4 + 4 * j);
                sumi = __dp4a((int)(p & 0x0F0F0F0F), q.qs[j], sumi);
                sumi = __dp4a((int)((p >> 4) & 0x0F0F0F0F), q.qs[4 + j], sumi);
            }
            acc += d * q.d * (float)sumi + half_at(blk + 2) * q.s;
        } else {
            const uint32_t qh = u32_at(blk + 2);
            int qsum = 0;
            for (int j = 0; j < 4; j++) {
                const uint32_t p = u32_at(blk + 6 + 4 * j);
                const int lo = (int)(p & 0x0F0F0F0F) | spread4(qh >> (4 * j));
                const int hi = (int)((p >> 4) & 0x0F0F0F0F) | spread4(qh >> (16 + 4 * j));
                sumi = __dp4a(lo, q.qs[j], sumi);
                sumi = __dp4a(hi, q.qs[4 + j], sumi);
                qsum = __dp4a(0x01010101, q.qs[j], qsum);
                qsum = __dp4a(0x01010101, q.qs[4 + j], qsum);
            }
            acc += d * q.d * (float)(sumi - 16 * qsum);
        }
    }
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, off);
    if (lane == 0) y[(size_t)ti * rows + r] = acc;
}

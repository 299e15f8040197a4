// The cache codecs as the KV kernels (kv.cu, decode.cu) see them: ids and row layouts. Rows are
// the CPU codecs' bytes (src/kv/codec/*.rs): per group of values an f16 scale (turbo's norm,
// ggml's block scale d) first, then the codes.
#pragma once
#include <cuda_fp16.h>
#include <stdint.h>

// Codec ids, as src/kv/device.rs passes them (the order of kv::store::GPU_TYPES).
#define C_F16 0
#define C_TURBO4 1
#define C_TURBO3 2
#define C_TURBO2 3
#define C_Q8_0 4
#define C_Q4_0 5

__host__ __device__ constexpr bool is_turbo(int c) {
    return c == C_TURBO4 || c == C_TURBO3 || c == C_TURBO2;
}

// Turbo's rotation groups: 128 values where the head allows, else 64.
__host__ __device__ constexpr int turbo_width(int d) { return d % 128 == 0 ? 128 : 64; }

// Values sharing one scale: turbo's rotation groups, ggml's 32-value blocks (f16: any).
__host__ __device__ constexpr int group_width(int codec, int d) {
    return is_turbo(codec) ? turbo_width(d) : 32;
}

__host__ __device__ constexpr int group_bytes(int codec, int g) {
    return codec == C_TURBO4   ? (g == 128 ? 4 : 2) + g / 2
           : codec == C_TURBO3 ? 2 + g / 4 + g / 8
           : codec == C_TURBO2 ? 2 + g / 4
           : codec == C_Q8_0   ? 2 + g
           : codec == C_Q4_0   ? 2 + g / 2
                               : 2 * g;
}

// f16 values sit at even offsets of rows whose sizes are even (f16 rows, group scales), so they
// are read and written as aligned 16-bit words. (Two byte stores of the converted half lost its
// low byte once JIT-compiled on the H100; `cuda-check -m` compares stored bytes.)
__device__ __forceinline__ float half_at(const uint8_t* p) {
    return __half2float(__ushort_as_half(*reinterpret_cast<const unsigned short*>(p)));
}

__device__ __forceinline__ void put_half(uint8_t* p, float x) {
    *reinterpret_cast<unsigned short*>(p) = __half_as_ushort(__float2half_rn(x));
}

// Four bytes from an address that is only 2-byte aligned (groups of ggml blocks in a row).
__device__ __forceinline__ uint32_t u32_at(const uint8_t* p) {
    const unsigned short* h = reinterpret_cast<const unsigned short*>(p);
    return h[0] | ((uint32_t)h[1] << 16);
}

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
#define C_SPECTRAL 6

__host__ __device__ constexpr bool is_turbo(int c) {
    return c == C_TURBO4 || c == C_TURBO3 || c == C_TURBO2;
}

// Turbo's rotation groups: 128 values where the head allows, else 64.
__host__ __device__ constexpr int turbo_width(int d) { return d % 128 == 0 ? 128 : 64; }

// Values sharing one scale: turbo's rotation groups, ggml's 32-value blocks (f16: any);
// SpectralQuant's groups vary per head, so the kernels take its whole row as one, unscaled.
__host__ __device__ constexpr int group_width(int codec, int d) {
    return is_turbo(codec) ? turbo_width(d) : codec == C_SPECTRAL ? d : 32;
}

// Codecs whose lanes read a contiguous run of a row's values (turbo's packed codes, spectral's
// bit stream) rather than ggml's interleaved blocks.
__host__ __device__ constexpr bool lane_major(int c) { return is_turbo(c) || c == C_SPECTRAL; }

__host__ __device__ constexpr int group_bytes(int codec, int g) {
    return codec == C_TURBO4   ? (g == 128 ? 4 : 2) + g / 2
           : codec == C_TURBO3 ? 2 + g / 4 + g / 8
           : codec == C_TURBO2 ? 2 + g / 4
           : codec == C_Q8_0   ? 2 + g
           : codec == C_Q4_0   ? 2 + g / 2
           : codec == C_SPECTRAL ? 0  // one group a row: never stepped over
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

// SpectralQuant (src/kv/codec/spectral.rs): a head's rows live in its own basis, in up to three
// groups of coordinates with their own widths; a row is the groups' f16 scales, then the codes
// LSB first. Each head has a table of spec_table(d) floats (spectral.rs's HeadBasis): per
// coordinate a descriptor (u32 bits: bit position in the row, width << 16, group << 20), then
// per group its scaled centroids (32 slots, from SPEC_LUT), its N(0, 1) decision points (32
// slots, from SPEC_MIDS), (start, len, width, 0) at SPEC_META, and the group count at
// SPEC_META + 12.
#define SPEC_GROUPS 3
#define SPEC_LUT(d) (d)
#define SPEC_MIDS(d) ((d) + 32 * SPEC_GROUPS)
#define SPEC_META(d) ((d) + 64 * SPEC_GROUPS)
__host__ __device__ constexpr int spec_table(int d) { return d + 64 * SPEC_GROUPS + 16; }

// The code and group of a spectral row's coordinate with descriptor `desc` (its head's table
// entry); -1 for a coordinate without bits. Reads up to one byte past the code (rows keep slack
// after them).
__device__ __forceinline__ int spectral_code(const uint8_t* row, uint32_t desc, int& grp) {
    const int w = (desc >> 16) & 15, bit = desc & 0xffff;
    grp = desc >> 20;
    if (w == 0) return -1;
    const uint32_t two = row[bit >> 3] | ((uint32_t)row[(bit >> 3) + 1] << 8);
    return (two >> (bit & 7)) & ((1 << w) - 1);
}

// That coordinate's value: the group's scale times its centroid (centroids at `lut`).
__device__ __forceinline__ float spectral_value(const uint8_t* row, uint32_t desc,
                                                const float* lut) {
    int grp;
    const int c = spectral_code(row, desc, grp);
    return c < 0 ? 0.f : __fmul_rn(half_at(row + 2 * grp), lut[32 * grp + c]);
}

// A spectral row's group scales, read once per row (slots past its groups hold code bytes).
struct SpectralScales {
    float a[SPEC_GROUPS];
    __device__ __forceinline__ void load(const uint8_t* row) {
#pragma unroll
        for (int j = 0; j < SPEC_GROUPS; j++) a[j] = half_at(row + 2 * j);
    }
    // The coordinate with descriptor `desc`, as spectral_value.
    __device__ __forceinline__ float value(const uint8_t* row, uint32_t desc,
                                           const float* lut) const {
        int grp;
        const int c = spectral_code(row, desc, grp);
        const float scale = grp == 0 ? a[0] : grp == 1 ? a[1] : a[2];
        return c < 0 ? 0.f : __fmul_rn(scale, lut[32 * grp + c]);
    }
};

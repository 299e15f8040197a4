// Elementwise steps of the forward pass fused into one launch each: a decode step on the GPU is
// bound by kernel launches, not by these kernels' memory traffic.

// y [t, f] = act(gu[:, :f]) · gu[:, f:] for gu [t, 2f], the gate and up projections joined;
// act 0: SiLU, 1: GELU with the tanh approximation (as candle computes them).
extern "C" __global__ void glu(const float* __restrict__ gu, float* __restrict__ y, int f,
                               long long n, int act) {
    const long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
        const long long r = i / f, c = i % f;
        const float g = gu[2 * r * f + c], u = gu[2 * r * f + f + c];
        const float a = act == 0 ? g / (1.f + expf(-g))
                                 : 0.5f * g *
                                       (1.f + tanhf(0.7978845608f * (g + 0.044715f * g * g * g)));
        y[i] = a * u;
    }
}

// s = x + h, and y = s / sqrt(mean(s²) + eps) · w, per row of n values; one block per row.
extern "C" __global__ void add_rms_norm(const float* __restrict__ x, const float* __restrict__ h,
                                        const float* __restrict__ w, float* __restrict__ s,
                                        float* __restrict__ y, int n, float eps) {
    __shared__ float warp_sums[32];
    const size_t base = (size_t)blockIdx.x * n;
    float ss = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = x[base + i] + h[base + i];
        s[base + i] = v;
        ss += v * v;
    }
    for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, off);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = ss;
    __syncthreads();
    float total = 0.f;
    for (int k = 0; k < (int)(blockDim.x >> 5); k++) total += warp_sums[k];
    const float inv = rsqrtf(total / n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) y[base + i] = s[base + i] * inv * w[i];
}

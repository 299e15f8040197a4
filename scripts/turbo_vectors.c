// Test vectors from the TurboQuant fork's own quantizers, for src/kv/codec/turbo*.rs.
// Build against the fork beside the project (see scripts/turbo_vectors.sh) and write JSON:
// {"turbo2": [{"x": [...128 floats], "bytes": "hex"}, ...], "turbo3": ..., "turbo4": ...}
#include <math.h>
#include <stdint.h>
#include <stdio.h>

extern int turbo3_cpu_wht_group_size;
void quantize_row_turbo2_0_ref(const float *x, void *y, int64_t k);
void quantize_row_turbo3_0_ref(const float *x, void *y, int64_t k);
void quantize_row_turbo4_0_ref(const float *x, void *y, int64_t k);

static uint64_t state = 12345;
static double uniform(void) {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    return (double)(state >> 11) / (double)(1ULL << 53);
}
// Heavy-tailed rows: Gaussian background, a few channels 8x larger, like real K.
static float sample(int i) {
    double u1 = uniform(), u2 = uniform();
    if (u1 < 1e-12) u1 = 1e-12;
    double g = sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
    return (float)(i % 29 == 3 ? 8.0 * g : g);
}

static void emit(const char *name, void (*q)(const float *, void *, int64_t), int bytes, int last) {
    printf("\"%s\": [\n", name);
    for (int r = 0; r < 16; r++) {
        float x[128];
        uint8_t out[128];
        for (int i = 0; i < 128; i++) x[i] = sample(i) * (float)(0.1 + r);
        q(x, out, 128);
        printf("{\"x\": [");
        for (int i = 0; i < 128; i++) printf("%s%.9g", i ? "," : "", x[i]);
        printf("], \"bytes\": \"");
        for (int i = 0; i < bytes; i++) printf("%02x", out[i]);
        printf("\"}%s\n", r < 15 ? "," : "");
    }
    printf("]%s\n", last ? "" : ",");
}

int main(void) {
    turbo3_cpu_wht_group_size = 128;
    printf("{\n");
    emit("turbo2", quantize_row_turbo2_0_ref, 34, 0);
    emit("turbo3", quantize_row_turbo3_0_ref, 50, 0);
    emit("turbo4", quantize_row_turbo4_0_ref, 68, 1);
    printf("}\n");
    return 0;
}

// One decode step's attention on CPU, float32 (posttrain/models/decode.py): rotary on the new token's query and key,
// the key and value written to the KV cache, and each query head's softmax over the readable cache slots.
//
// torch takes a dozen small ops per layer for this (rotary, two cache writes, two batched matmuls, mask, softmax),
// each paying its dispatch and a pass over memory; at one token per row the work itself is small.
//
// Built by posttrain/kernels/__init__.py with g++ -O3 -march=native; called through ctypes on contiguous tensors.

#include <vector>

#include "vec_math.h"

namespace {

using posttrain::dot;
using posttrain::exp_nonpositive;
using posttrain::lane_sum;
using posttrain::W;

// HF's x * cos + rotate_half(x) * sin, with sin's first half negated: x * cos + roll(x, D/2) * signed_sin.
template <int64_t D>
inline void rotate(const float* x, const float* cos, const float* sin, float* y) {
    for (int64_t d = 0; d < D / 2; ++d) y[d] = x[d] * cos[d] + x[d + D / 2] * sin[d];
    for (int64_t d = D / 2; d < D; ++d) y[d] = x[d] * cos[d] + x[d - D / 2] * sin[d];
}

template <int64_t D>
void step(const float* qkv, int64_t B, int64_t H, int64_t Hkv, const float* cos, const float* sin, float* cache_k,
          float* cache_v, int64_t S, int64_t slot, const uint8_t* blocked, int64_t blocked_stride, float scale,
          float* out) {
    const int64_t group = H / Hkv, n = slot + 1, n16 = (n + W - 1) / W * W;
    std::vector<float> x(n16), p(n16), q(D);
    for (int64_t b = 0; b < B; ++b) {
        const float* row = qkv + b * (H + 2 * Hkv) * D;
        const float* c = cos + b * D;
        const float* s = sin + b * D;
        for (int64_t g = 0; g < Hkv; ++g) {
            float* keys = cache_k + (b * Hkv + g) * S * D;
            float* values = cache_v + (b * Hkv + g) * S * D;
            rotate<D>(row + (H + g) * D, c, s, keys + slot * D);
            std::memcpy(values + slot * D, row + (H + Hkv + g) * D, D * sizeof(float));
            for (int64_t h = g * group; h < (g + 1) * group; ++h) {
                rotate<D>(row + h * D, c, s, q.data());
                const uint8_t* mask = blocked + b * blocked_stride;
                float m = -INFINITY;
                for (int64_t j = 0; j < n; ++j) {
                    x[j] = mask[j] && j != slot ? -INFINITY : dot<D>(q.data(), keys + j * D) * scale;
                    m = std::max(m, x[j]);
                }
                float lanes[W] = {};
                for (int64_t jb = 0; jb < n16; jb += W)
                    for (int64_t j = 0; j < W; ++j) {
                        const bool real = jb + j < n && x[jb + j] != -INFINITY;
                        p[jb + j] = real ? exp_nonpositive(x[jb + j] - m) : 0.0f;
                        lanes[j] += p[jb + j];
                    }
                const float l = lane_sum(lanes);
                float o[D] = {};
                for (int64_t j = 0; j < n; ++j) {
                    const float pj = p[j];
                    const float* vrow = values + j * D;
                    for (int64_t d = 0; d < D; ++d) o[d] += pj * vrow[d];
                }
                float* dst = out + (b * H + h) * D;
                const float inv = 1.0f / l;
                for (int64_t d = 0; d < D; ++d) dst[d] = o[d] * inv;
            }
        }
    }
}

}  // namespace

extern "C" {

// qkv (B, (H + 2 Hkv) D): the new token's projections; cos, sin (B, D) at its positions (sin signed as above);
// cache_k, cache_v (B, Hkv, S, D): slot `slot` is written; blocked (B, >= slot + 1) bytes, row stride
// blocked_stride: 1 where a slot may not be read (the new slot always is); out (B, H D). Returns 0, or -1 for a
// head size without a build (32, 64, 128, 256): nothing is written then.
int decode_attend(const float* qkv, int64_t B, int64_t H, int64_t Hkv, int64_t D, const float* cos, const float* sin,
                  float* cache_k, float* cache_v, int64_t S, int64_t slot, const uint8_t* blocked,
                  int64_t blocked_stride, float scale, float* out) {
    switch (D) {
        case 32: step<32>(qkv, B, H, Hkv, cos, sin, cache_k, cache_v, S, slot, blocked, blocked_stride, scale, out); return 0;
        case 64: step<64>(qkv, B, H, Hkv, cos, sin, cache_k, cache_v, S, slot, blocked, blocked_stride, scale, out); return 0;
        case 128: step<128>(qkv, B, H, Hkv, cos, sin, cache_k, cache_v, S, slot, blocked, blocked_stride, scale, out); return 0;
        case 256: step<256>(qkv, B, H, Hkv, cos, sin, cache_k, cache_v, S, slot, blocked, blocked_stride, scale, out); return 0;
        default: return -1;
    }
}

}  // extern "C"

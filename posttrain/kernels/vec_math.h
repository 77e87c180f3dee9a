// Vectorisable float helpers shared by the CPU kernels in this directory.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace posttrain {

constexpr int64_t W = 16;  // floats per AVX-512 register

// exp(x) for x <= 0 (scores minus their maximum, or minus the log-sum-exp): 2^n * p(r) with r in [-ln2/2, ln2/2]
// and a degree-7 polynomial; relative error below 2e-7, and plain arithmetic the compiler vectorises.
inline float exp_nonpositive(float x) {
    x = std::max(x, -87.0f);  // exp(-87) ~ 1.6e-38: below it the weight is 0 to float precision anyway
    const float n = std::nearbyint(x * 1.44269504088896341f);
    const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

// Sums over W lanes first: float reductions do not vectorise otherwise (their order is fixed).
inline float lane_sum(const float* lanes) {
    float total = 0.0f;
    for (int64_t j = 0; j < W; ++j) total += lanes[j];
    return total;
}

template <int64_t D>
inline float dot(const float* a, const float* b) {
    static_assert(D % W == 0);
    float lanes[W] = {};
    for (int64_t d = 0; d < D; d += W)
        for (int64_t j = 0; j < W; ++j) lanes[j] += a[d + j] * b[d + j];
    return lane_sum(lanes);
}

}  // namespace posttrain

// Shared-prefix attention on CPU, forward and backward, float32 (posttrain/models/shared_prefix.py).
//
// The learners lay every token out once in one row; segment s is one sequence: the row positions of its keys (its
// prompt's single copy, then its completion) and of the queries it owns. A query sees a prefix of its segment's
// keys (visible[s][i] of them: causal order is key order). torch's attention needs the keys gathered into padded
// blocks first, with a mask, and the gathers' backward scatters; here each segment reads its rows in place.
//
// Per segment and head: the keys are copied once into small local blocks (K transposed, so scores vectorise over
// keys), then each query runs an exact softmax over its visible keys. The backward recomputes the probabilities
// from the saved log-sum-exp, as FlashAttention does, and adds dK and dV into the shared rows after each segment
// (a prompt's keys are read by every sequence of its group).
//
// Built by posttrain/kernels/__init__.py with g++ -O3 -march=native; called through ctypes on contiguous tensors.

#include <vector>

#include "vec_math.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

using posttrain::dot;
using posttrain::exp_nonpositive;
using posttrain::lane_sum;
using posttrain::W;

// Keys go in chunks of W; key blocks are padded to a multiple of W.
inline int64_t chunks(int64_t n) { return (n + W - 1) / W * W; }

struct Segments {
    const int64_t *query_index, *key_index, *visible, *n_queries, *n_keys;
    int64_t S, Lq, Lk;
};

// Segment s's keys (or values) of kv head g: by row (Lk16 x D) and/or transposed (D x Lk16), zero past the last key.
template <int64_t D>
void gather(const float* src, const Segments& seg, int64_t s, int64_t g, int64_t Hkv, int64_t Lk16, float* by_row,
            float* transposed) {
    const int64_t nk = seg.n_keys[s];
    if (transposed) std::fill(transposed, transposed + D * Lk16, 0.0f);
    if (by_row) std::fill(by_row + nk * D, by_row + chunks(nk) * D, 0.0f);  // read with weight 0: no stale NaN
    for (int64_t j = 0; j < nk; ++j) {
        const float* row = src + (seg.key_index[s * seg.Lk + j] * Hkv + g) * D;
        if (by_row) std::memcpy(by_row + j * D, row, D * sizeof(float));
        if (transposed)
            for (int64_t d = 0; d < D; ++d) transposed[d * Lk16 + j] = row[d];
    }
}

// x[j] = scale * sum_d a[d] * t[d][j] for j < chunks(n): t is a transposed key block, vectorised over keys. With
// AVX-512, four accumulators over interleaved d: one would chain every multiply-add on the one before it (the
// compiler keeps only one accumulator array in registers, hence the intrinsics).
template <int64_t D>
inline void dots(const float* a, const float* t, int64_t Lk16, int64_t n, float scale, float* x) {
    for (int64_t jb = 0; jb < chunks(n); jb += W) {
#if defined(__AVX512F__)
        static_assert(D % 4 == 0 && W == 16);
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t d = 0; d < D; d += 4)
            for (int64_t u = 0; u < 4; ++u)
                acc[u] = _mm512_fmadd_ps(_mm512_set1_ps(a[d + u]), _mm512_loadu_ps(t + (d + u) * Lk16 + jb), acc[u]);
        const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        _mm512_storeu_ps(x + jb, _mm512_mul_ps(sum, _mm512_set1_ps(scale)));
#else
        float acc[W] = {};
        for (int64_t d = 0; d < D; ++d) {
            const float ad = a[d];
            const float* row = t + d * Lk16 + jb;
            for (int64_t j = 0; j < W; ++j) acc[j] += ad * row[j];
        }
        for (int64_t j = 0; j < W; ++j) x[jb + j] = acc[j] * scale;
#endif
    }
}

// p[j] = exp(x[j] - m) for j < n, 0 for the padding up to chunks(n); returns the sum.
inline float exp_shifted(const float* x, float m, int64_t n, float* p) {
    float lanes[W] = {};
    for (int64_t jb = 0; jb < chunks(n); jb += W)
        for (int64_t j = 0; j < W; ++j) {
            p[jb + j] = jb + j < n ? exp_nonpositive(x[jb + j] - m) : 0.0f;
            lanes[j] += p[jb + j];
        }
    return lane_sum(lanes);
}

inline float max_of(const float* x, int64_t n) {
    float lanes[W];
    std::fill(lanes, lanes + W, x[0]);
    for (int64_t jb = 0; jb < chunks(n); jb += W)
        for (int64_t j = 0; j < W; ++j) lanes[j] = std::max(lanes[j], jb + j < n ? x[jb + j] : x[0]);
    float m = lanes[0];
    for (int64_t j = 1; j < W; ++j) m = std::max(m, lanes[j]);
    return m;
}

template <int64_t D>
void forward(const float* q, const float* k, const float* v, int64_t H, int64_t Hkv, const Segments& seg, float scale,
             float* out, float* lse) {
    const int64_t group = H / Hkv, Lk16 = chunks(seg.Lk);
    std::vector<float> kt(D * Lk16), vs(Lk16 * D), x(Lk16), p(Lk16);
    for (int64_t s = 0; s < seg.S; ++s) {
        for (int64_t g = 0; g < Hkv; ++g) {
            gather<D>(k, seg, s, g, Hkv, Lk16, nullptr, kt.data());
            gather<D>(v, seg, s, g, Hkv, Lk16, vs.data(), nullptr);
            for (int64_t h = g * group; h < (g + 1) * group; ++h) {
                for (int64_t i = 0; i < seg.n_queries[s]; ++i) {
                    const int64_t r = seg.query_index[s * seg.Lq + i], nv = seg.visible[s * seg.Lq + i];
                    dots<D>(q + (r * H + h) * D, kt.data(), Lk16, nv, scale, x.data());
                    const float m = max_of(x.data(), nv);
                    const float l = exp_shifted(x.data(), m, nv, p.data());
                    float o[2][D] = {};  // even and odd keys: two independent chains
                    for (int64_t j = 0; j < chunks(nv); j += 2)  // p is 0 past nv, and vs is padded
                        for (int64_t u = 0; u < 2; ++u) {
                            const float pj = p[j + u];
                            const float* vrow = vs.data() + (j + u) * D;
                            for (int64_t d = 0; d < D; ++d) o[u][d] += pj * vrow[d];
                        }
                    float* dst = out + (r * H + h) * D;
                    const float inv = 1.0f / l;
                    for (int64_t d = 0; d < D; ++d) dst[d] = (o[0][d] + o[1][d]) * inv;
                    lse[r * H + h] = m + std::log(l);
                }
            }
        }
    }
}

template <int64_t D>
void backward(const float* q, const float* k, const float* v, const float* out, const float* lse, const float* dout,
              int64_t H, int64_t Hkv, const Segments& seg, float scale, float* dq, float* dk, float* dv) {
    const int64_t group = H / Hkv, Lk16 = chunks(seg.Lk);
    std::vector<float> kt(D * Lk16), ks(Lk16 * D), vt(D * Lk16), dks(Lk16 * D), dvs(Lk16 * D), x(Lk16), p(Lk16),
        dp(Lk16);
    for (int64_t s = 0; s < seg.S; ++s) {
        const int64_t nk = seg.n_keys[s];
        for (int64_t g = 0; g < Hkv; ++g) {
            gather<D>(k, seg, s, g, Hkv, Lk16, ks.data(), kt.data());
            gather<D>(v, seg, s, g, Hkv, Lk16, nullptr, vt.data());
            std::fill(dks.begin(), dks.begin() + nk * D, 0.0f);
            std::fill(dvs.begin(), dvs.begin() + nk * D, 0.0f);
            for (int64_t h = g * group; h < (g + 1) * group; ++h) {
                for (int64_t i = 0; i < seg.n_queries[s]; ++i) {
                    const int64_t r = seg.query_index[s * seg.Lq + i], nv = seg.visible[s * seg.Lq + i];
                    const float* qr = q + (r * H + h) * D;
                    const float* go = dout + (r * H + h) * D;
                    const float* orow = out + (r * H + h) * D;
                    const float delta = dot<D>(go, orow);  // sum_j p_j dp_j = dO . O
                    dots<D>(qr, kt.data(), Lk16, nv, scale, x.data());
                    exp_shifted(x.data(), lse[r * H + h], nv, p.data());
                    dots<D>(go, vt.data(), Lk16, nv, 1.0f, dp.data());  // dp_j = dO . V_j
                    float acc[D] = {};
                    for (int64_t j = 0; j < nv; ++j) {
                        const float pj = p[j], dj = pj * (dp[j] - delta) * scale;
                        const float* krow = ks.data() + j * D;
                        float* dvrow = dvs.data() + j * D;
                        float* dkrow = dks.data() + j * D;
                        for (int64_t d = 0; d < D; ++d) {
                            acc[d] += dj * krow[d];
                            dvrow[d] += pj * go[d];
                            dkrow[d] += dj * qr[d];
                        }
                    }
                    std::memcpy(dq + (r * H + h) * D, acc, D * sizeof(float));
                }
            }
            for (int64_t j = 0; j < nk; ++j) {
                float* dkrow = dk + (seg.key_index[s * seg.Lk + j] * Hkv + g) * D;
                float* dvrow = dv + (seg.key_index[s * seg.Lk + j] * Hkv + g) * D;
                for (int64_t d = 0; d < D; ++d) {
                    dkrow[d] += dks[j * D + d];
                    dvrow[d] += dvs[j * D + d];
                }
            }
        }
    }
}

}  // namespace

extern "C" {

// q (N, H, D), k and v (N, Hkv, D) -> out (N, H, D), lse (N, H). Head sizes 32, 64, 128 and 256 (returns 0);
// any other: nothing is computed (returns -1) and the caller uses torch.
int spa_forward(const float* q, const float* k, const float* v, int64_t H, int64_t Hkv, int64_t D,
                const int64_t* query_index, const int64_t* key_index, const int64_t* visible,
                const int64_t* n_queries, const int64_t* n_keys, int64_t S, int64_t Lq, int64_t Lk, float scale,
                float* out, float* lse) {
    const Segments seg{query_index, key_index, visible, n_queries, n_keys, S, Lq, Lk};
    switch (D) {
        case 32: forward<32>(q, k, v, H, Hkv, seg, scale, out, lse); return 0;
        case 64: forward<64>(q, k, v, H, Hkv, seg, scale, out, lse); return 0;
        case 128: forward<128>(q, k, v, H, Hkv, seg, scale, out, lse); return 0;
        case 256: forward<256>(q, k, v, H, Hkv, seg, scale, out, lse); return 0;
        default: return -1;
    }
}

// Gradients of spa_forward. dq is written for every owned query row; dk and dv are added to (zero them first).
int spa_backward(const float* q, const float* k, const float* v, const float* out, const float* lse,
                 const float* dout, int64_t H, int64_t Hkv, int64_t D, const int64_t* query_index,
                 const int64_t* key_index, const int64_t* visible, const int64_t* n_queries, const int64_t* n_keys,
                 int64_t S, int64_t Lq, int64_t Lk, float scale, float* dq, float* dk, float* dv) {
    const Segments seg{query_index, key_index, visible, n_queries, n_keys, S, Lq, Lk};
    switch (D) {
        case 32: backward<32>(q, k, v, out, lse, dout, H, Hkv, seg, scale, dq, dk, dv); return 0;
        case 64: backward<64>(q, k, v, out, lse, dout, H, Hkv, seg, scale, dq, dk, dv); return 0;
        case 128: backward<128>(q, k, v, out, lse, dout, H, Hkv, seg, scale, dq, dk, dv); return 0;
        case 256: backward<256>(q, k, v, out, lse, dout, H, Hkv, seg, scale, dq, dk, dv); return 0;
        default: return -1;
    }
}

}  // extern "C"

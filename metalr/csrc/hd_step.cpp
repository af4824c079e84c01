// One-pass CPU kernels of metalr's Adam-HD and SGD-HD steps (lagged mode), and the two passes of
// the exact mode. The equations are those of metalr/functional/adam_rule.py and sgd_rule.py; the
// Python side (metalr/functional/_cpu_kernels.py) computes the per-tensor scalars and the rate
// update from the sums written here.
//
// Per tensor i the kernels accumulate, over the gradient g (after `maximize`, before weight decay)
// and the previous direction d (Adam: recomputed from the moments being read; SGD: the momentum
// buffer or stored direction being read), sums[i] = (Σ g·d, Σ g², Σ d²) in double. With `write`
// they also update the state, skipping (per element) entries whose gradient is not finite.
//
// Loops run over fixed chunks (at::parallel_for); partial sums are combined in chunk order, so
// the result does not depend on the number of threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#include <cmath>
#include <vector>

namespace {

constexpr int64_t kChunk = 1 << 15;
// Elements prefetched ahead (prefetching past the end never faults). The build sets it per CPU
// vendor (metalr/functional/_cpu_kernels.py): in paired runs 256 (1 KiB) was best on a Xeon, 64
// (256 B) on an AMD EPYC, where 256 made the exact passes 1.2x slower.
#ifndef METALR_PREFETCH
#define METALR_PREFETCH 256
#endif
constexpr int64_t kPrefetch = METALR_PREFETCH;

template <typename T>
inline bool finite(T x) { return (x - x) == T(0); }  // false for NaN and ±inf; vectorizes

struct AdamConsts {
  // prev_c1 = 1/(1-β1^{t-1}), prev_c2 = 1/√(1-β2^{t-1}), step = lr·m/(1-β1^t), c2 = 1/√(1-β2^t),
  // decay = 1 - lr·λ (decoupled; else 1), l2 = λ (coupled; else 0), sign = -1 to maximize
  double pc1, pc2, step, c2, decay, b1, b2, eps, l2, sign;
};

// Σ g·d, Σ g², Σ d² over [lo, hi) with d = m·pc1/(√v·pc2 + ε); with `write` also the update
// (per-element skip of non-finite g). Plain loops the compiler vectorises.
template <typename T>
void adam_range_generic(T* __restrict p, const T* __restrict gp, T* __restrict m, T* __restrict v,
                int64_t lo, int64_t hi, const AdamConsts& k, bool accumulate, bool write,
                double* out) {
  const T pc1 = k.pc1, pc2 = k.pc2, step = k.step, c2 = k.c2, decay = k.decay;
  const T b2 = k.b2, w1 = 1 - k.b1, w2 = 1 - k.b2, e = k.eps, l2 = k.l2, sign = k.sign;
  T gd = 0, gg = 0, dd = 0;
  if (accumulate && write) {
#pragma omp simd reduction(+ : gd, gg, dd)
    for (int64_t j = lo; j < hi; ++j) {
      const T g = sign * gp[j], mj = m[j], vj = v[j], pj = p[j];
      const T d = mj * pc1 / (std::sqrt(vj) * pc2 + e);
      gd += g * d; gg += g * g; dd += d * d;
      const T ge = g + l2 * pj;
      const T mn = mj + w1 * (ge - mj);
      const T vn = b2 * vj + w2 * ge * ge;
      const T pn = pj * decay - step * mn / (std::sqrt(vn) * c2 + e);
      const bool ok = finite(g);
      m[j] = ok ? mn : mj; v[j] = ok ? vn : vj; p[j] = ok ? pn : pj;
    }
  } else if (accumulate) {
#pragma omp simd reduction(+ : gd, gg, dd)
    for (int64_t j = lo; j < hi; ++j) {
      const T g = sign * gp[j];
      const T d = m[j] * pc1 / (std::sqrt(v[j]) * pc2 + e);
      gd += g * d; gg += g * g; dd += d * d;
    }
  } else if (write) {  // the exact mode's second pass: the step is known to be finite
#pragma omp simd
    for (int64_t j = lo; j < hi; ++j) {
      const T g = sign * gp[j], pj = p[j];
      const T ge = g + l2 * pj;
      const T mn = m[j] + w1 * (ge - m[j]);
      const T vn = b2 * v[j] + w2 * ge * ge;
      m[j] = mn; v[j] = vn;
      p[j] = pj * decay - step * mn / (std::sqrt(vn) * c2 + e);
    }
  }
  out[0] = gd; out[1] = gg; out[2] = dd;
}

template <typename T>
void adam_range(T* __restrict p, const T* __restrict gp, T* __restrict m, T* __restrict v,
                int64_t lo, int64_t hi, const AdamConsts& k, bool accumulate, bool write,
                double* out) {
  adam_range_generic(p, gp, m, v, lo, hi, k, accumulate, write, out);
}

#if defined(__AVX512F__)
// float32 with AVX-512: d_{t-1} (which only feeds the sums) from the 14-bit reciprocal and
// reciprocal square root instructions instead of a square root and a division (those two
// dominate the pass); the update itself keeps the exact square root and division. The loop runs
// with subnormals flushed to zero (FTZ/DAZ, restored after; measured 1.4× faster on Adam states
// of 1e-3-scale gradients): values below 1.2e-38 count as zero, as on GPUs' fast paths.
template <>
void adam_range<float>(float* __restrict p, const float* __restrict gp, float* __restrict m,
                       float* __restrict v, int64_t lo, int64_t hi, const AdamConsts& k,
                       bool accumulate, bool write, double* out) {
  const unsigned csr = _mm_getcsr();
  _mm_setcsr(csr | 0x8040);  // FTZ | DAZ
  const __m512 pc1 = _mm512_set1_ps(k.pc1), pc2 = _mm512_set1_ps(k.pc2);
  const __m512 step = _mm512_set1_ps(k.step), c2 = _mm512_set1_ps(k.c2);
  const __m512 decay = _mm512_set1_ps(k.decay), b2 = _mm512_set1_ps(k.b2);
  const __m512 w1 = _mm512_set1_ps(1 - k.b1), w2 = _mm512_set1_ps(1 - k.b2);
  const __m512 e = _mm512_set1_ps(k.eps), l2 = _mm512_set1_ps(k.l2), sign = _mm512_set1_ps(k.sign);
  const __m512 tiny = _mm512_set1_ps(1e-30f), zero = _mm512_setzero_ps();
  __m512 gd = zero, gg = zero, dd = zero;
  int64_t j = lo;
  for (; j + 16 <= hi; j += 16) {
    // software prefetch kPrefetch elements ahead: on a shared Xeon 1 KiB ahead made the passes
    // 1.4-1.8x faster than the hardware prefetchers alone (4 KiB ahead was slower for writes)
    _mm_prefetch(reinterpret_cast<const char*>(gp + j + kPrefetch), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(m + j + kPrefetch), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(v + j + kPrefetch), _MM_HINT_T0);
    if (write) _mm_prefetch(reinterpret_cast<const char*>(p + j + kPrefetch), _MM_HINT_T0);
    const __m512 g = _mm512_mul_ps(sign, _mm512_loadu_ps(gp + j));
    const __m512 mj = _mm512_loadu_ps(m + j), vj = _mm512_loadu_ps(v + j);
    if (accumulate) {
      const __m512 sq = _mm512_mul_ps(vj, _mm512_rsqrt14_ps(_mm512_max_ps(vj, tiny)));  // ≈ √v
      const __m512 d = _mm512_mul_ps(_mm512_mul_ps(mj, pc1),
                                     _mm512_rcp14_ps(_mm512_fmadd_ps(sq, pc2, e)));
      gd = _mm512_fmadd_ps(g, d, gd);
      gg = _mm512_fmadd_ps(g, g, gg);
      dd = _mm512_fmadd_ps(d, d, dd);
    }
    if (write) {
      const __m512 pj = _mm512_loadu_ps(p + j);
      const __m512 ge = _mm512_fmadd_ps(l2, pj, g);
      const __m512 mn = _mm512_fmadd_ps(w1, _mm512_sub_ps(ge, mj), mj);
      const __m512 vn = _mm512_fmadd_ps(b2, vj, _mm512_mul_ps(w2, _mm512_mul_ps(ge, ge)));
      const __m512 den = _mm512_fmadd_ps(_mm512_sqrt_ps(vn), c2, e);
      const __m512 pn = _mm512_sub_ps(_mm512_mul_ps(pj, decay),
                                      _mm512_div_ps(_mm512_mul_ps(step, mn), den));
      const __mmask16 ok = _mm512_cmp_ps_mask(_mm512_sub_ps(g, g), zero, _CMP_EQ_OQ);
      _mm512_mask_storeu_ps(m + j, ok, mn);
      _mm512_mask_storeu_ps(v + j, ok, vn);
      _mm512_mask_storeu_ps(p + j, ok, pn);
    }
  }
  double tail[3];
  adam_range_generic(p, gp, m, v, j, hi, k, accumulate, write, tail);
  _mm_setcsr(csr);
  out[0] = _mm512_reduce_add_ps(gd) + tail[0];
  out[1] = _mm512_reduce_add_ps(gg) + tail[1];
  out[2] = _mm512_reduce_add_ps(dd) + tail[2];
}
#endif

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
inline float hsum(__m256 x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

// float32 with AVX2 + FMA (no AVX-512): as above with 8 lanes; the 12-bit estimates get one
// Newton step each (~23 bits), and skipped elements are blended back before plain stores.
template <>
void adam_range<float>(float* __restrict p, const float* __restrict gp, float* __restrict m,
                       float* __restrict v, int64_t lo, int64_t hi, const AdamConsts& k,
                       bool accumulate, bool write, double* out) {
  const unsigned csr = _mm_getcsr();
  _mm_setcsr(csr | 0x8040);  // FTZ | DAZ
  const __m256 pc1 = _mm256_set1_ps(k.pc1), pc2 = _mm256_set1_ps(k.pc2);
  const __m256 step = _mm256_set1_ps(k.step), c2 = _mm256_set1_ps(k.c2);
  const __m256 decay = _mm256_set1_ps(k.decay), b2 = _mm256_set1_ps(k.b2);
  const __m256 w1 = _mm256_set1_ps(1 - k.b1), w2 = _mm256_set1_ps(1 - k.b2);
  const __m256 e = _mm256_set1_ps(k.eps), l2 = _mm256_set1_ps(k.l2), sign = _mm256_set1_ps(k.sign);
  const __m256 tiny = _mm256_set1_ps(1e-30f), zero = _mm256_setzero_ps();
  const __m256 half = _mm256_set1_ps(0.5f), three_halves = _mm256_set1_ps(1.5f);
  const __m256 two = _mm256_set1_ps(2.0f);
  __m256 gd = zero, gg = zero, dd = zero;
  int64_t j = lo;
  for (; j + 8 <= hi; j += 8) {
    _mm_prefetch(reinterpret_cast<const char*>(gp + j + kPrefetch), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(m + j + kPrefetch), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(v + j + kPrefetch), _MM_HINT_T0);
    if (write) _mm_prefetch(reinterpret_cast<const char*>(p + j + kPrefetch), _MM_HINT_T0);
    const __m256 g = _mm256_mul_ps(sign, _mm256_loadu_ps(gp + j));
    const __m256 mj = _mm256_loadu_ps(m + j), vj = _mm256_loadu_ps(v + j);
    if (accumulate) {
      const __m256 vs = _mm256_max_ps(vj, tiny);
      __m256 y = _mm256_rsqrt_ps(vs);  // y ← y (3/2 - v y²/2)
      y = _mm256_mul_ps(y, _mm256_fnmadd_ps(_mm256_mul_ps(half, vs), _mm256_mul_ps(y, y),
                                            three_halves));
      const __m256 x = _mm256_fmadd_ps(_mm256_mul_ps(vj, y), pc2, e);  // ≈ √v·pc2 + ε
      __m256 r = _mm256_rcp_ps(x);  // r ← r (2 - x r)
      r = _mm256_mul_ps(r, _mm256_fnmadd_ps(x, r, two));
      const __m256 d = _mm256_mul_ps(_mm256_mul_ps(mj, pc1), r);
      gd = _mm256_fmadd_ps(g, d, gd);
      gg = _mm256_fmadd_ps(g, g, gg);
      dd = _mm256_fmadd_ps(d, d, dd);
    }
    if (write) {
      const __m256 pj = _mm256_loadu_ps(p + j);
      const __m256 ge = _mm256_fmadd_ps(l2, pj, g);
      const __m256 mn = _mm256_fmadd_ps(w1, _mm256_sub_ps(ge, mj), mj);
      const __m256 vn = _mm256_fmadd_ps(b2, vj, _mm256_mul_ps(w2, _mm256_mul_ps(ge, ge)));
      const __m256 den = _mm256_fmadd_ps(_mm256_sqrt_ps(vn), c2, e);
      const __m256 pn = _mm256_sub_ps(_mm256_mul_ps(pj, decay),
                                      _mm256_div_ps(_mm256_mul_ps(step, mn), den));
      const __m256 ok = _mm256_cmp_ps(_mm256_sub_ps(g, g), zero, _CMP_EQ_OQ);
      _mm256_storeu_ps(m + j, _mm256_blendv_ps(mj, mn, ok));
      _mm256_storeu_ps(v + j, _mm256_blendv_ps(vj, vn, ok));
      _mm256_storeu_ps(p + j, _mm256_blendv_ps(pj, pn, ok));
    }
  }
  double tail[3];
  adam_range_generic(p, gp, m, v, j, hi, k, accumulate, write, tail);
  _mm_setcsr(csr);
  out[0] = hsum(gd) + tail[0];
  out[1] = hsum(gg) + tail[1];
  out[2] = hsum(dd) + tail[2];
}
#endif

template <typename scalar_t>
void adam_tensor(scalar_t* p, const scalar_t* g, scalar_t* m, scalar_t* v, int64_t n,
                 const AdamConsts& k, bool accumulate, bool write, double* out) {
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(3 * n_chunks, 0.0);
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t lo = c * kChunk, hi = std::min(n, lo + kChunk);
      adam_range<scalar_t>(p, g, m, v, lo, hi, k, accumulate, write, partial.data() + 3 * c);
    }
  });
  for (int64_t c = 0; c < n_chunks; ++c)
    for (int i = 0; i < 3; ++i) out[i] += partial[3 * c + i];
}

struct SgdConsts {
  double step, momentum, dampening, l2, sign;
  bool nesterov;
};

// Momentum (b != null, prev null): d_{t-1} = b; b ← μ b + (1-τ) g_e; θ ← θ - step · b.
template <typename T>
void sgd_momentum_range(T* __restrict p, const T* __restrict gp, T* __restrict b, int64_t lo,
                        int64_t hi, const SgdConsts& k, double* out) {
  const T step = k.step, mu = k.momentum, w = 1 - k.dampening, l2 = k.l2, sign = k.sign;
  T gd = 0, gg = 0, dd = 0;
#pragma omp simd reduction(+ : gd, gg, dd)
  for (int64_t j = lo; j < hi; ++j) {
    const T g = sign * gp[j], bj = b[j], pj = p[j];
    gd += g * bj; gg += g * g; dd += bj * bj;
    const T bn = mu * bj + w * (g + l2 * pj);
    const bool ok = finite(g);
    b[j] = ok ? bn : bj;
    p[j] = ok ? pj - step * bn : pj;
  }
  out[0] = gd; out[1] = gg; out[2] = dd;
}

// Plain SGD (b null) or Nesterov: d_{t-1} is stored in prev and overwritten with d_t.
template <typename T>
void sgd_direction_range(T* __restrict p, const T* __restrict gp, T* __restrict b,
                         T* __restrict prev, int64_t lo, int64_t hi, const SgdConsts& k,
                         double* out) {
  const T step = k.step, mu = k.momentum, w = 1 - k.dampening, l2 = k.l2, sign = k.sign;
  T gd = 0, gg = 0, dd = 0;
  if (b == nullptr) {
#pragma omp simd reduction(+ : gd, gg, dd)
    for (int64_t j = lo; j < hi; ++j) {
      const T g = sign * gp[j], dj = prev[j], pj = p[j];
      gd += g * dj; gg += g * g; dd += dj * dj;
      const T dn = g + l2 * pj;
      const bool ok = finite(g);
      prev[j] = ok ? dn : dj;
      p[j] = ok ? pj - step * dn : pj;
    }
  } else {  // Nesterov: d_t = g_e + μ b_t
#pragma omp simd reduction(+ : gd, gg, dd)
    for (int64_t j = lo; j < hi; ++j) {
      const T g = sign * gp[j], dj = prev[j], pj = p[j], bj = b[j];
      gd += g * dj; gg += g * g; dd += dj * dj;
      const T ge = g + l2 * pj;
      const T bn = mu * bj + w * ge;
      const T dn = ge + mu * bn;
      const bool ok = finite(g);
      b[j] = ok ? bn : bj;
      prev[j] = ok ? dn : dj;
      p[j] = ok ? pj - step * dn : pj;
    }
  }
  out[0] = gd; out[1] = gg; out[2] = dd;
}

template <typename scalar_t>
void sgd_tensor(scalar_t* p, const scalar_t* g, scalar_t* b, scalar_t* prev, int64_t n,
                const SgdConsts& k, double* out) {
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(3 * n_chunks, 0.0);
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t lo = c * kChunk, hi = std::min(n, lo + kChunk);
      if (prev == nullptr) {
        sgd_momentum_range<scalar_t>(p, g, b, lo, hi, k, partial.data() + 3 * c);
      } else {
        sgd_direction_range<scalar_t>(p, g, b, prev, lo, hi, k, partial.data() + 3 * c);
      }
    }
  });
  for (int64_t c = 0; c < n_chunks; ++c)
    for (int i = 0; i < 3; ++i) out[i] += partial[3 * c + i];
}

void check_same(const at::Tensor& a, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(a.device().is_cpu() && a.is_contiguous() && a.scalar_type() == ref.scalar_type() &&
                  a.numel() == ref.numel(),
              name, " must be a contiguous CPU tensor like its parameter");
}

// scalars: [n, 6] or, for all tensors alike, [1, 6] float64 rows (pc1, pc2, lr, 1-β1^t, c2,
// decay); rates: [n], the multipliers m (any floating dtype), so that step = lr·m/(1-β1^t) is
// formed here in double, in that order. Returns sums [n, 3] float64 (zeros unless accumulate).
at::Tensor adam_hd_pass(std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
                        std::vector<at::Tensor> exp_avgs, std::vector<at::Tensor> exp_avg_sqs,
                        at::Tensor scalars, at::Tensor rates, double beta1, double beta2,
                        double eps, double weight_decay, bool maximize, bool accumulate,
                        bool write) {
  const int64_t n = params.size();
  auto sums = at::zeros({n, 3}, at::kDouble);
  auto sc = scalars.contiguous();
  TORCH_CHECK(sc.scalar_type() == at::kDouble && (sc.numel() == 6 * n || sc.numel() == 6),
              "scalars must be [n, 6] or [1, 6] float64");
  auto mult = rates.to(at::kDouble).contiguous();
  TORCH_CHECK(mult.numel() == n, "rates must hold one multiplier per tensor");
  const int64_t row_stride = sc.numel() == 6 ? 0 : 6;
  for (int64_t i = 0; i < n; ++i) {  // every check before the first write
    check_same(grads[i], params[i], "grad");
    check_same(exp_avgs[i], params[i], "exp_avg");
    check_same(exp_avg_sqs[i], params[i], "exp_avg_sq");
    TORCH_CHECK(params[i].is_contiguous(), "params must be contiguous");
  }
  // The exact step's write pass (write, no sums) follows a sums pass that read g, m, v first
  // to last: it runs last to first, so it starts on the tensors still in the cache. The order
  // changes no value (each tensor's sums and update are its own).
  const bool last_first = write && !accumulate;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t i = last_first ? n - 1 - j : j;
    auto& p = params[i];
    const double* s = sc.data_ptr<double>() + row_stride * i;
    const double step = s[2] * mult.data_ptr<double>()[i] / s[3];
    const AdamConsts k{s[0], s[1], step, s[4], s[5], beta1, beta2, eps, weight_decay,
                       maximize ? -1.0 : 1.0};
    AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "adam_hd_pass", [&] {
      adam_tensor<scalar_t>(p.data_ptr<scalar_t>(), grads[i].data_ptr<scalar_t>(),
                            exp_avgs[i].data_ptr<scalar_t>(), exp_avg_sqs[i].data_ptr<scalar_t>(),
                            p.numel(), k, accumulate, write, sums.data_ptr<double>() + 3 * i);
    });
  }
  return sums;
}

// steps: [n] float64 (lr · m per tensor); bufs/prevs: empty lists when unused
at::Tensor sgd_hd_pass(std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
                       std::vector<at::Tensor> bufs, std::vector<at::Tensor> prevs,
                       at::Tensor steps, double momentum, double dampening, double weight_decay,
                       bool nesterov, bool maximize) {
  const int64_t n = params.size();
  auto sums = at::zeros({n, 3}, at::kDouble);
  auto st = steps.contiguous();
  TORCH_CHECK(st.scalar_type() == at::kDouble && st.numel() == n, "steps must be [n]");
  for (int64_t i = 0; i < n; ++i) {
    auto& p = params[i];
    check_same(grads[i], p, "grad");
    TORCH_CHECK(p.is_contiguous(), "params must be contiguous");
    if (!bufs.empty()) check_same(bufs[i], p, "momentum_buffer");
    if (!prevs.empty()) check_same(prevs[i], p, "prev_direction");
    const SgdConsts k{st.data_ptr<double>()[i], momentum, dampening, weight_decay,
                      maximize ? -1.0 : 1.0, nesterov};
    AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "sgd_hd_pass", [&] {
      sgd_tensor<scalar_t>(p.data_ptr<scalar_t>(), grads[i].data_ptr<scalar_t>(),
                           bufs.empty() ? nullptr : bufs[i].data_ptr<scalar_t>(),
                           prevs.empty() ? nullptr : prevs[i].data_ptr<scalar_t>(), p.numel(), k,
                           sums.data_ptr<double>() + 3 * i);
    });
  }
  return sums;
}

}  // namespace

void register_element(pybind11::module& m);  // hd_element.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("adam_hd_pass", &adam_hd_pass, "Adam-HD pass over many tensors (sums and/or update)");
  m.def("sgd_hd_pass", &sgd_hd_pass, "SGD-HD lagged one-pass step over many tensors");
  register_element(m);
}

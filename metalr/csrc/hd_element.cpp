// The exact Adam-HD step at element granularity in one pass over the state (plus a read-only scan
// of the gradients first), for the CPU. The equations are those of metalr/functional/adam_rule.py
// and _hypergrad.py; the Python side (metalr/functional/_cpu_element.py) computes the per-tensor
// constants before the pass and the seek controllers from the sums written here.
//
// Per element, with g after `maximize` and before weight decay, d = d_{t-1} recomputed from the
// moments being read, s = sign(g·d) (0 for 0 or NaN):
//
//   sign rules (normalized, seek):  r' = clamp(min(r · E[s], cap), lo, hi)
//   additive:                       q = g·d / lr;  r' = clamp(finite(q) ? max(r + β q, 0) : r)
//   then the Adam update with r':   θ' = θ·decay - lr·r'/(1-β1^t) · m'/(√v'/√(1-β2^t) + ε)
//
// where E[s] = exp(move_s) is the per-tensor multiplier of the rate's log-space move for that
// sign (normalized: β·s; seek: the ramp's move, or τβ·s once settled) and cap = exp(ceiling).
//
// The scan first sums g per tensor: a sum that is not finite in the parameter's dtype
// (a NaN/inf entry, or an overflow, as the eager path's check) skips the whole step before any
// write. It also finds whether some first moment is non-zero (some d_{t-1} ≠ 0): when none is
// (the first step), the rates only get clamped (E = 1, no cap), as the eager path's "inactive"
// step. Per tensor the pass returns (Σ g·d, Σ g², Σ d², Σ s, max r, Σ g) in double, summed over
// fixed chunks in chunk order (independent of the thread count).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#ifndef METALR_PREFETCH
#define METALR_PREFETCH 256
#endif

namespace {

constexpr int64_t kChunk = 1 << 15;
constexpr int kCols = 13;  // columns of `scalars` (see ElementConsts)
constexpr int kOut = 6;    // columns of the returned sums

struct ElementConsts {
  // pc1 = 1/(1-β1^{t-1}), pc2 = 1/√(1-β2^{t-1}) (t-1 ≥ 1), lr_c1 = lr/(1-β1^t), c2 = 1/√(1-β2^t),
  // decay = 1 - lr·λ (decoupled; else 1), e_neg/e_zero/e_pos = E[-1/0/+1], cap, lo, hi (clamp
  // bounds of r'), inv_lr = 1/lr (0 if lr ≤ 0) and beta (additive rule)
  double pc1, pc2, lr_c1, c2, decay, e_neg, e_zero, e_pos, cap, lo, hi, inv_lr, beta;
};

struct Common {
  double b1, b2, eps, l2, sign;
  bool additive;
};

// One chunk [lo, hi): the sums (ACC) and the update (WRITE).
template <typename T, bool ACC, bool WRITE, bool ADD>
void element_range(T* __restrict p, const T* __restrict gp, T* __restrict m, T* __restrict v,
                   T* __restrict r, int64_t lo, int64_t hi, const ElementConsts& k,
                   const Common& c, double* out) {
  const T pc1 = k.pc1, pc2 = k.pc2, lr_c1 = k.lr_c1, c2 = k.c2, decay = k.decay;
  const T e_neg = k.e_neg, e_zero = k.e_zero, e_pos = k.e_pos, cap = k.cap;
  const T rlo = k.lo, rhi = k.hi, inv_lr = k.inv_lr, beta = k.beta;
  const T b2 = c.b2, w1 = 1 - c.b1, w2 = 1 - c.b2, e = c.eps, l2 = c.l2, sign = c.sign;
  T gd = 0, gg = 0, dd = 0, ss = 0, rmax = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(+ : gd, gg, dd, ss) reduction(max : rmax)
  for (int64_t j = lo; j < hi; ++j) {
    const T g = sign * gp[j], mj = m[j], vj = v[j], rj = r[j];
    const T d = mj * pc1 / (std::sqrt(vj) * pc2 + e);
    const T prod = g * d;
    const T s = prod > T(0) ? T(1) : (prod < T(0) ? T(-1) : T(0));
    if (ACC) {
      gd += prod; gg += g * g; dd += d * d; ss += s;
      rmax = rj > rmax ? rj : rmax;
    }
    if (WRITE) {
      T rn;
      if (ADD) {
        const T q = prod * inv_lr;  // the rule's signal: kept only where finite
        const T moved = rj + beta * q;
        rn = (q - q) == T(0) ? (moved > T(0) ? moved : T(0)) : rj;
      } else {
        const T f = s > T(0) ? e_pos : (s < T(0) ? e_neg : e_zero);
        const T moved = rj * f;
        rn = moved < cap ? moved : cap;
      }
      rn = rn < rlo ? rlo : rn;
      rn = rn > rhi ? rhi : rn;
      const T pj = p[j];
      const T ge = g + l2 * pj;
      const T mn = mj + w1 * (ge - mj);
      const T vn = b2 * vj + w2 * ge * ge;
      m[j] = mn; v[j] = vn; r[j] = rn;
      p[j] = pj * decay - (lr_c1 * rn) * mn / (std::sqrt(vn) * c2 + e);
    }
  }
  out[0] = gd; out[1] = gg; out[2] = dd; out[3] = ss; out[4] = rmax;
}

#if defined(__AVX512F__)
// float32 sign rules with AVX-512, as the tensor kernel's loop (hd_step.cpp): d_{t-1}, which only
// feeds the sums and the sign s (the sign of m: its denominator is positive), from the 14-bit
// reciprocal and reciprocal square root estimates; the update keeps the exact square root and
// division. Subnormals are not flushed (the eager path's values).
template <bool ACC, bool WRITE>
void element_sign_avx512(float* __restrict p, const float* __restrict gp, float* __restrict m,
                         float* __restrict v, float* __restrict r, int64_t lo, int64_t hi,
                         const ElementConsts& k, const Common& c, double* out) {
  constexpr int64_t ahead = METALR_PREFETCH;  // elements prefetched ahead (see hd_step.cpp)
  const __m512 pc1 = _mm512_set1_ps(k.pc1), pc2 = _mm512_set1_ps(k.pc2);
  const __m512 lr_c1 = _mm512_set1_ps(k.lr_c1), c2 = _mm512_set1_ps(k.c2);
  const __m512 decay = _mm512_set1_ps(k.decay), b2 = _mm512_set1_ps(c.b2);
  const __m512 w1 = _mm512_set1_ps(1 - c.b1), w2 = _mm512_set1_ps(1 - c.b2);
  const __m512 e = _mm512_set1_ps(c.eps), l2 = _mm512_set1_ps(c.l2), sign = _mm512_set1_ps(c.sign);
  const __m512 e_neg = _mm512_set1_ps(k.e_neg), e_zero = _mm512_set1_ps(k.e_zero);
  const __m512 e_pos = _mm512_set1_ps(k.e_pos), cap = _mm512_set1_ps(k.cap);
  const __m512 rlo = _mm512_set1_ps(k.lo), rhi = _mm512_set1_ps(k.hi);
  const __m512 one = _mm512_set1_ps(1.0f), minus_one = _mm512_set1_ps(-1.0f);
  const __m512 tiny = _mm512_set1_ps(1e-30f), zero = _mm512_setzero_ps();
  __m512 gd = zero, gg = zero, dd = zero, ss = zero;
  __m512 rmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = lo;
  for (; j + 16 <= hi; j += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(gp + j + ahead), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(m + j + ahead), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(v + j + ahead), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(r + j + ahead), _MM_HINT_T0);
    if (WRITE) _mm_prefetch(reinterpret_cast<const char*>(p + j + ahead), _MM_HINT_T0);
    const __m512 g = _mm512_mul_ps(sign, _mm512_loadu_ps(gp + j));
    const __m512 mj = _mm512_loadu_ps(m + j), vj = _mm512_loadu_ps(v + j);
    const __m512 rj = _mm512_loadu_ps(r + j);
    const __m512 sq = _mm512_mul_ps(vj, _mm512_rsqrt14_ps(_mm512_max_ps(vj, tiny)));  // ≈ √v
    const __m512 d = _mm512_mul_ps(_mm512_mul_ps(mj, pc1),
                                   _mm512_rcp14_ps(_mm512_fmadd_ps(sq, pc2, e)));
    const __m512 prod = _mm512_mul_ps(g, d);
    const __mmask16 pos = _mm512_cmp_ps_mask(prod, zero, _CMP_GT_OQ);
    const __mmask16 neg = _mm512_cmp_ps_mask(prod, zero, _CMP_LT_OQ);
    if (ACC) {
      gd = _mm512_add_ps(gd, prod);
      gg = _mm512_fmadd_ps(g, g, gg);
      dd = _mm512_fmadd_ps(d, d, dd);
      ss = _mm512_mask_add_ps(ss, pos, ss, one);
      ss = _mm512_mask_add_ps(ss, neg, ss, minus_one);
      rmax = _mm512_max_ps(rmax, rj);
    }
    if (WRITE) {
      __m512 f = _mm512_mask_blend_ps(pos, e_zero, e_pos);
      f = _mm512_mask_blend_ps(neg, f, e_neg);
      __m512 rn = _mm512_min_ps(_mm512_mul_ps(rj, f), cap);
      rn = _mm512_min_ps(_mm512_max_ps(rn, rlo), rhi);
      const __m512 pj = _mm512_loadu_ps(p + j);
      const __m512 ge = _mm512_fmadd_ps(l2, pj, g);
      const __m512 mn = _mm512_fmadd_ps(w1, _mm512_sub_ps(ge, mj), mj);
      const __m512 vn = _mm512_fmadd_ps(b2, vj, _mm512_mul_ps(w2, _mm512_mul_ps(ge, ge)));
      const __m512 den = _mm512_fmadd_ps(_mm512_sqrt_ps(vn), c2, e);
      const __m512 pn = _mm512_sub_ps(
          _mm512_mul_ps(pj, decay), _mm512_div_ps(_mm512_mul_ps(_mm512_mul_ps(lr_c1, rn), mn), den));
      _mm512_storeu_ps(m + j, mn);
      _mm512_storeu_ps(v + j, vn);
      _mm512_storeu_ps(p + j, pn);
      _mm512_storeu_ps(r + j, rn);
    }
  }
  double tail[5];
  element_range<float, ACC, WRITE, false>(p, gp, m, v, r, j, hi, k, c, tail);
  out[0] = _mm512_reduce_add_ps(gd) + tail[0];
  out[1] = _mm512_reduce_add_ps(gg) + tail[1];
  out[2] = _mm512_reduce_add_ps(dd) + tail[2];
  out[3] = _mm512_reduce_add_ps(ss) + tail[3];
  out[4] = std::max(static_cast<double>(_mm512_reduce_max_ps(rmax)), tail[4]);
}
#endif

template <typename T, bool ACC, bool WRITE>
void element_dispatch(T* p, const T* g, T* m, T* v, T* r, int64_t lo, int64_t hi,
                      const ElementConsts& k, const Common& c, double* out) {
  if (c.additive) {
    element_range<T, ACC, WRITE, true>(p, g, m, v, r, lo, hi, k, c, out);
    return;
  }
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    element_sign_avx512<ACC, WRITE>(p, g, m, v, r, lo, hi, k, c, out);
    return;
  }
#endif
  element_range<T, ACC, WRITE, false>(p, g, m, v, r, lo, hi, k, c, out);
}

template <typename T>
void element_tensor(T* p, const T* g, T* m, T* v, T* r, int64_t n, const ElementConsts& k,
                    const Common& c, bool accumulate, bool write, double* out) {
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(5 * n_chunks, 0.0);
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t ch = c0; ch < c1; ++ch) {
      const int64_t lo = ch * kChunk, hi = std::min(n, lo + kChunk);
      double* o = partial.data() + 5 * ch;
      if (accumulate && write) {
        element_dispatch<T, true, true>(p, g, m, v, r, lo, hi, k, c, o);
      } else if (accumulate) {
        element_dispatch<T, true, false>(p, g, m, v, r, lo, hi, k, c, o);
      } else if (write) {
        element_dispatch<T, false, true>(p, g, m, v, r, lo, hi, k, c, o);
      }
    }
  });
  out[4] = -std::numeric_limits<double>::infinity();
  for (int64_t ch = 0; ch < n_chunks; ++ch) {
    for (int i = 0; i < 4; ++i) out[i] += partial[5 * ch + i];
    out[4] = std::max(out[4], partial[5 * ch + 4]);
  }
}

// Σ g over one tensor (chunks summed in T in four interleaved quarters, so four independent
// accumulators hide the add latency; chunks added in double, in chunk order); NaN/inf propagate.
template <typename T>
double grad_sum(const T* g, int64_t n) {
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(n_chunks, 0.0);
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t ch = c0; ch < c1; ++ch) {
      const int64_t lo = ch * kChunk, hi = std::min(n, lo + kChunk), q = (hi - lo) / 4;
      const T* __restrict a = g + lo;
      T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t j = 0; j < q; ++j) {
        s0 += a[j]; s1 += a[q + j]; s2 += a[2 * q + j]; s3 += a[3 * q + j];
      }
      double s = static_cast<double>(s0) + s1 + s2 + s3;
      for (int64_t j = lo + 4 * q; j < hi; ++j) s += g[j];
      partial[ch] = s;
    }
  });
  double total = 0;
  for (double s : partial) total += s;
  return total;
}

template <typename T>
bool any_nonzero(const T* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j)
    if (x[j] != T(0)) return true;
  return false;
}

void check_like(const at::Tensor& a, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(a.device().is_cpu() && a.is_contiguous() && a.scalar_type() == ref.scalar_type() &&
                  a.numel() == ref.numel(),
              name, " must be a contiguous CPU tensor like its parameter");
}

// scalars: [n, kCols] float64. scan 1: sum the gradients first and return status 0 (nothing
// written) if a sum is not finite; scan 1 or 2 (gradients known finite): status 2 if no first
// moment is non-zero, written with the inactive constants (E = 1, no cap); otherwise status 1,
// written with the given constants. scan 0: status 1. Returns (sums [n, kOut] float64, status).
std::tuple<at::Tensor, int64_t> adam_hd_element_pass(
    std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
    std::vector<at::Tensor> exp_avgs, std::vector<at::Tensor> exp_avg_sqs,
    std::vector<at::Tensor> rates, at::Tensor scalars, double beta1, double beta2, double eps,
    double weight_decay, bool maximize, bool additive, int64_t scan, bool accumulate,
    bool write) {
  const int64_t n = params.size();
  auto sums = at::zeros({n, kOut}, at::kDouble);
  auto sc = scalars.contiguous();
  TORCH_CHECK(sc.scalar_type() == at::kDouble && sc.numel() == kCols * n,
              "scalars must be [n, 13] float64");
  for (int64_t i = 0; i < n; ++i) {
    check_like(grads[i], params[i], "grad");
    check_like(exp_avgs[i], params[i], "exp_avg");
    check_like(exp_avg_sqs[i], params[i], "exp_avg_sq");
    check_like(rates[i], params[i], "lr_multiplier");
    TORCH_CHECK(params[i].is_contiguous(), "params must be contiguous");
  }
  double* out = sums.data_ptr<double>();
  int64_t status = 1;
  if (scan != 0) {
    bool moved = false;
    for (int64_t i = 0; i < n; ++i) {
      bool finite = true;
      AT_DISPATCH_FLOATING_TYPES(params[i].scalar_type(), "grad_scan", [&] {
        if (scan == 1) {
          const double s = grad_sum<scalar_t>(grads[i].data_ptr<scalar_t>(), grads[i].numel());
          out[kOut * i + 5] = s;
          finite = std::isfinite(static_cast<scalar_t>(s));
        }
        if (!moved) moved = any_nonzero<scalar_t>(exp_avgs[i].data_ptr<scalar_t>(),
                                                  exp_avgs[i].numel());
      });
      if (!finite) return {sums, 0};
    }
    status = moved ? 1 : 2;
  }
  const Common c{beta1, beta2, eps, weight_decay, maximize ? -1.0 : 1.0, additive};
  const double inf = std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    const double* s = sc.data_ptr<double>() + kCols * i;
    ElementConsts k{s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7],
                    s[8], s[9], s[10], s[11], s[12]};
    if (status == 2) {  // inactive: the rates are only clamped
      k.e_neg = k.e_zero = k.e_pos = 1.0;
      k.cap = inf;
      k.beta = 0.0;
    }
    AT_DISPATCH_FLOATING_TYPES(params[i].scalar_type(), "adam_hd_element_pass", [&] {
      element_tensor<scalar_t>(
          params[i].data_ptr<scalar_t>(), grads[i].data_ptr<scalar_t>(),
          exp_avgs[i].data_ptr<scalar_t>(), exp_avg_sqs[i].data_ptr<scalar_t>(),
          rates[i].data_ptr<scalar_t>(), params[i].numel(), k, c, accumulate, write,
          out + kOut * i);
    });
  }
  return {sums, status};
}

}  // namespace

void register_element(pybind11::module& m) {
  m.def("adam_hd_element_pass", &adam_hd_element_pass,
        "Adam-HD element-granularity step: scan, then one pass (sums and/or update)");
}

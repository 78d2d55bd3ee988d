// CPU loop bodies of the CS gate (docs/contract.md section 1), free of torch so they read top to bottom:
//   forward   w_eff = w * m,  m = sigmoid(beta * s)  (soft)  or  m = 1[s > 0]  (hard)
//   backward  dL/dw = G * m,  dL/ds = beta * m * (1 - m) * (G * w + lam)
// With one logit per row of `cols` weights (channel granularity) m is the row's and dL/ds the sum
// of those terms over the row, reduced in the same pass.
// Each loop is branch-free so that GCC vectorizes it; ops.cpp compiles it once per ISA level.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// Everything here is inlined into the per-ISA clones of the kernels in ops.cpp.
#if defined(__GNUC__)
#define CSEXT_INLINE inline __attribute__((always_inline))
#else
#define CSEXT_INLINE inline
#endif

namespace csext {
namespace cpu {

// Raw bfloat16 bits, so that conversions are plain integer ops the vectorizer understands.
struct bf16 {
  uint16_t bits;
};

// load: storage type -> accumulation type (float or double); store: the way back.
template <typename Acc, typename T>
CSEXT_INLINE Acc load(T v) { return static_cast<Acc>(v); }
template <>
CSEXT_INLINE float load<float, bf16>(bf16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename T, typename Acc>
CSEXT_INLINE T store(Acc v) { return static_cast<T>(v); }
template <>
CSEXT_INLINE bf16 store<bf16, float>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  // Round to nearest even; a NaN keeps a set quiet bit so it never rounds into infinity.
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  uint32_t nan_bits = (u >> 16) | 0x0040u;
  bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return bf16{static_cast<uint16_t>(is_nan ? nan_bits : rounded)};
}

// exp(x) for x in [-87, 0]: Cody-Waite reduction and the Cephes polynomial, about 1.4 ulp.
// Written without branches or float-to-int conversions, so NaN stays NaN and loops vectorize.
CSEXT_INLINE float exp_nonpositive(float x) {
  const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float shifted = x * 1.44269504088896341f + round_magic;
  float n = shifted - round_magic;
  float r = x - n * 0.693359375f - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  uint32_t n_bits;
  std::memcpy(&n_bits, &shifted, sizeof n_bits);
  uint32_t scale_bits = (n_bits - 0x4B400000u + 127u) << 23;  // 2^n built in the exponent field
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof scale);
  return p * scale;
}

// m = sigmoid(x) and slope = m * (1 - m) from z = exp(-|x|), which never overflows and
// keeps 1 - m accurate where m rounds to 1 (large beta).
CSEXT_INLINE void soft_gate(float x, float& m, float& slope) {
  float neg_abs = -std::fabs(x);
  bool underflow = neg_abs < -87.0f;
  float z = exp_nonpositive(underflow ? -87.0f : neg_abs);
  z = underflow ? 0.0f : z;
  float r = 1.0f / (1.0f + z);
  float zr = z * r;
  m = x >= 0.0f ? r : zr;  // NaN fails the test and takes zr, which is NaN
  slope = zr * r;
}
CSEXT_INLINE void soft_gate(double x, double& m, double& slope) {
  double z = std::exp(-std::fabs(x));
  double r = 1.0 / (1.0 + z);
  double zr = z * r;
  m = x >= 0.0 ? r : zr;
  slope = zr * r;
}

// 1[s > 0], with NaN passed through rather than read as "pruned".
template <typename Acc>
CSEXT_INLINE Acc hard_gate(Acc s) {
  return s > Acc(0) ? Acc(1) : (s <= Acc(0) ? Acc(0) : s);
}

// Acc is float, or double for float64 weights (whose mask logits are then float64 too).
// Forward: out = w * m. The backward of a hard gate, and of a soft gate whose mask logits
// need no gradient, is this same loop with G in place of w.
template <typename Acc, typename W, typename Out>
CSEXT_INLINE void gate_forward_loop(const W* __restrict weight, const Acc* __restrict mask_logits,
                              Out* __restrict out, int64_t n, Acc beta, bool hard) {
  if (hard) {
    for (int64_t i = 0; i < n; ++i)
      out[i] = store<Out>(load<Acc>(weight[i]) * hard_gate(mask_logits[i]));
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    Acc m, slope;
    soft_gate(beta * mask_logits[i], m, slope);
    out[i] = store<Out>(load<Acc>(weight[i]) * m);
  }
}

// Backward of the soft gate: G = dL/dw_eff (compute dtype) -> dL/dw (weight dtype), dL/ds.
template <typename Acc, typename W, typename G>
CSEXT_INLINE void gate_backward_loop(const G* __restrict grad, const W* __restrict weight,
                               const Acc* __restrict mask_logits, W* __restrict grad_weight,
                               Acc* __restrict grad_mask_logits, int64_t n, Acc beta,
                               Acc penalty) {
  for (int64_t i = 0; i < n; ++i) {
    Acc m, slope;
    soft_gate(beta * mask_logits[i], m, slope);
    Acc g = load<Acc>(grad[i]);
    grad_weight[i] = store<W>(g * m);
    grad_mask_logits[i] = beta * slope * (g * load<Acc>(weight[i]) + penalty);
  }
}

// The channel form: one logit per row of `cols` consecutive weights.
template <typename Acc, typename W, typename Out>
CSEXT_INLINE void gate_rows_forward_loop(const W* __restrict weight, const Acc* __restrict mask_logits,
                                         Out* __restrict out, int64_t rows, int64_t cols, Acc beta,
                                         bool hard) {
  for (int64_t r = 0; r < rows; ++r) {
    Acc m, slope;
    if (hard) {
      m = hard_gate(mask_logits[r]);
    } else {
      soft_gate(beta * mask_logits[r], m, slope);
    }
    const W* w = weight + r * cols;
    Out* o = out + r * cols;
    for (int64_t j = 0; j < cols; ++j) o[j] = store<Out>(load<Acc>(w[j]) * m);
  }
}

// dL/ds of a row = beta * m * (1 - m) * (sum_j G_j w_j + cols * lam), the sum kept in double so
// that a long row loses no more than the reference's pairwise float sum.
template <typename Acc, typename W, typename G>
CSEXT_INLINE void gate_rows_backward_loop(const G* __restrict grad, const W* __restrict weight,
                                          const Acc* __restrict mask_logits, W* __restrict grad_weight,
                                          Acc* __restrict grad_mask_logits, int64_t rows, int64_t cols,
                                          Acc beta, Acc penalty) {
  for (int64_t r = 0; r < rows; ++r) {
    Acc m, slope;
    soft_gate(beta * mask_logits[r], m, slope);
    const G* g = grad + r * cols;
    const W* w = weight + r * cols;
    W* dw = grad_weight + r * cols;
    double dot = 0.0;
    for (int64_t j = 0; j < cols; ++j) {
      const Acc gj = load<Acc>(g[j]);
      dw[j] = store<W>(gj * m);
      dot += static_cast<double>(gj) * static_cast<double>(load<Acc>(w[j]));
    }
    grad_mask_logits[r] = beta * slope * static_cast<Acc>(dot + static_cast<double>(cols) * penalty);
  }
}

// Either form: `cols` weights per logit, 1 for one logit per weight; n is a multiple of cols.
template <typename Acc, typename W, typename Out>
CSEXT_INLINE void gate_forward_any(const W* weight, const Acc* mask_logits, Out* out, int64_t n,
                                   int64_t cols, Acc beta, bool hard) {
  if (cols == 1) return gate_forward_loop<Acc>(weight, mask_logits, out, n, beta, hard);
  gate_rows_forward_loop<Acc>(weight, mask_logits, out, n / cols, cols, beta, hard);
}

template <typename Acc, typename W, typename G>
CSEXT_INLINE void gate_backward_any(const G* grad, const W* weight, const Acc* mask_logits,
                                    W* grad_weight, Acc* grad_mask_logits, int64_t n, int64_t cols,
                                    Acc beta, Acc penalty) {
  if (cols == 1)
    return gate_backward_loop<Acc>(grad, weight, mask_logits, grad_weight, grad_mask_logits, n,
                                   beta, penalty);
  gate_rows_backward_loop<Acc>(grad, weight, mask_logits, grad_weight, grad_mask_logits, n / cols,
                               cols, beta, penalty);
}

}  // namespace cpu
}  // namespace csext

// CUDA kernels of the CS gate (docs/contract.md section 1), free of torch:
//   forward   w_eff = w * m,  m = sigmoid(beta * s)  (soft)  or  m = 1[s > 0]  (hard)
//   backward  dL/dw = G * m,  dL/ds = beta * m * (1 - m) * (G * w + lam)
// With one logit per row of `cols` weights (channel granularity) m is the row's and dL/ds the sum
// of the backward's terms over the row, reduced by one block per row in the same pass.
// Each is one pass over flat storage; each thread moves VEC elements per operand with one access
// of up to 16 bytes where the pointers allow it. The math mirrors csrc/gate_cpu.h.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace csext {
namespace cuda {

// Storage type <-> accumulation type (float, or double for float64 weights).
template <typename Acc, typename T>
__device__ __forceinline__ Acc load_as(T v) { return static_cast<Acc>(v); }
template <>
__device__ __forceinline__ float load_as<float, __half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float load_as<float, __nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T, typename Acc>
__device__ __forceinline__ T store_as(Acc v) { return static_cast<T>(v); }
template <>
__device__ __forceinline__ __half store_as<__half, float>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 store_as<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float exp_of(float x) { return expf(x); }
__device__ __forceinline__ double exp_of(double x) { return exp(x); }

// m = sigmoid(x) and slope = m * (1 - m) from z = exp(-|x|): never overflows, and keeps
// 1 - m accurate where m rounds to 1 (large beta). NaN fails x >= 0 and takes z * r, NaN.
template <typename Acc>
__device__ __forceinline__ void soft_gate(Acc x, Acc& m, Acc& slope) {
  const Acc z = exp_of(-fabs(x));
  const Acc r = Acc(1) / (Acc(1) + z);
  const Acc zr = z * r;
  m = x >= Acc(0) ? r : zr;
  slope = zr * r;
}

// 1[s > 0], with NaN passed through rather than read as "pruned".
template <typename Acc>
__device__ __forceinline__ Acc hard_gate(Acc s) {
  return s > Acc(0) ? Acc(1) : (s <= Acc(0) ? Acc(0) : s);
}

// VEC consecutive elements, aligned so that the compiler emits one wide access per chunk.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p, int64_t i) {
  return reinterpret_cast<const Pack<T, VEC>*>(p)[i];
}
template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, int64_t i, const Pack<T, VEC>& pack) {
  reinterpret_cast<Pack<T, VEC>*>(p)[i] = pack;
}

// One element of the forward: out = w * m.
template <typename Acc, typename W, typename Out>
__device__ __forceinline__ Out gate_one(W w, Acc s, Acc beta, bool hard) {
  Acc m, slope;
  if (hard) {
    m = hard_gate(s);
  } else {
    soft_gate(beta * s, m, slope);
  }
  return store_as<Out>(load_as<Acc>(w) * m);
}

// Forward over n elements: packs of VEC (VEC = 1 where the pointers are not aligned), then
// the tail of n % VEC elements, all in one grid-stride launch.
template <typename Acc, typename W, typename Out, int VEC>
__global__ void gate_forward_kernel(const W* __restrict__ weight, const Acc* __restrict__ mask_logits,
                                    Out* __restrict__ out, int64_t n, Acc beta, bool hard) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t packs = n / VEC;
  for (int64_t i = first; i < packs; i += stride) {
    const Pack<W, VEC> w = load_pack<W, VEC>(weight, i);
    const Pack<Acc, VEC> s = load_pack<Acc, VEC>(mask_logits, i);
    Pack<Out, VEC> y;
#pragma unroll
    for (int j = 0; j < VEC; ++j) y.v[j] = gate_one<Acc, W, Out>(w.v[j], s.v[j], beta, hard);
    store_pack<Out, VEC>(out, i, y);
  }
  for (int64_t i = packs * VEC + first; i < n; i += stride) {
    out[i] = gate_one<Acc, W, Out>(weight[i], mask_logits[i], beta, hard);
  }
}

// One element of the soft backward.
template <typename Acc, typename W, typename G>
__device__ __forceinline__ void gate_backward_one(G grad, W weight, Acc s, Acc beta, Acc penalty,
                                                  W& grad_weight, Acc& grad_s) {
  Acc m, slope;
  soft_gate(beta * s, m, slope);
  const Acc g = load_as<Acc>(grad);
  grad_weight = store_as<W>(g * m);
  grad_s = beta * slope * (g * load_as<Acc>(weight) + penalty);
}

template <typename Acc, typename W, typename G, int VEC>
__global__ void gate_backward_kernel(const G* __restrict__ grad, const W* __restrict__ weight,
                                     const Acc* __restrict__ mask_logits,
                                     W* __restrict__ grad_weight, Acc* __restrict__ grad_mask_logits,
                                     int64_t n, Acc beta, Acc penalty) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t packs = n / VEC;
  for (int64_t i = first; i < packs; i += stride) {
    const Pack<G, VEC> g = load_pack<G, VEC>(grad, i);
    const Pack<W, VEC> w = load_pack<W, VEC>(weight, i);
    const Pack<Acc, VEC> s = load_pack<Acc, VEC>(mask_logits, i);
    Pack<W, VEC> dw;
    Pack<Acc, VEC> ds;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      gate_backward_one<Acc, W, G>(g.v[j], w.v[j], s.v[j], beta, penalty, dw.v[j], ds.v[j]);
    }
    store_pack<W, VEC>(grad_weight, i, dw);
    store_pack<Acc, VEC>(grad_mask_logits, i, ds);
  }
  for (int64_t i = packs * VEC + first; i < n; i += stride) {
    gate_backward_one<Acc, W, G>(grad[i], weight[i], mask_logits[i], beta, penalty, grad_weight[i],
                                 grad_mask_logits[i]);
  }
}

// Channel form, forward: element i takes the logit of its row, i / cols.
template <typename Acc, typename W, typename Out>
__global__ void gate_rows_forward_kernel(const W* __restrict__ weight,
                                         const Acc* __restrict__ mask_logits, Out* __restrict__ out,
                                         int64_t n, int64_t cols, Acc beta, bool hard) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = gate_one<Acc, W, Out>(weight[i], mask_logits[i / cols], beta, hard);
  }
}

// Channel form, backward: one block per row (grid-stride over rows); dL/dw per weight, and
// dL/ds = beta * m * (1 - m) * (sum_j G_j w_j + cols * lam) from a shared-memory tree sum.
// THREADS is the block size, a power of two.
template <typename Acc, typename W, typename G, int THREADS>
__global__ void gate_rows_backward_kernel(const G* __restrict__ grad, const W* __restrict__ weight,
                                          const Acc* __restrict__ mask_logits,
                                          W* __restrict__ grad_weight,
                                          Acc* __restrict__ grad_mask_logits, int64_t rows,
                                          int64_t cols, Acc beta, Acc penalty) {
  __shared__ Acc partial[THREADS];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    Acc m, slope;
    soft_gate(beta * mask_logits[r], m, slope);
    const int64_t first = r * cols;
    Acc dot = Acc(0);
    for (int64_t j = threadIdx.x; j < cols; j += THREADS) {
      const Acc g = load_as<Acc>(grad[first + j]);
      grad_weight[first + j] = store_as<W>(g * m);
      dot += g * load_as<Acc>(weight[first + j]);
    }
    partial[threadIdx.x] = dot;
    __syncthreads();
    for (int half = THREADS / 2; half > 0; half /= 2) {
      if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      grad_mask_logits[r] = beta * slope * (partial[0] + static_cast<Acc>(cols) * penalty);
    }
    __syncthreads();  // partial is reused by the next row
  }
}

}  // namespace cuda
}  // namespace csext

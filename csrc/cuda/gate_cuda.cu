// Host side of the CUDA gate kernels: dtype dispatch, alignment choice and launch.
#include <algorithm>
#include <cstdint>

#include "gate_cuda.h"
#include "gate_kernels.cuh"

namespace csext {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
bool aligned(const void* p, int vec) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * vec) == 0;
}

// One block for every kThreads packs (faster than a capped grid: bench/gate_launch.cu); the
// kernels' grid-stride loops only cover grids past gridDim.x's limit.
int blocks_for(int64_t work) {
  constexpr int64_t kMaxGrid = 0x7fffffff;
  const int64_t wanted = (work + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wanted, kMaxGrid)));
}

template <typename A, typename B, typename C>
constexpr int gate_vec_width() {
  // 16 bytes of the widest operand per access, 8 or 4 of the narrower ones (bench/gate_launch.cu).
  constexpr size_t widest = std::max(sizeof(A), std::max(sizeof(B), sizeof(C)));
  return static_cast<int>(16 / widest);
}

template <typename Acc, typename W, typename Out>
cudaError_t launch_forward(const void* weight, const void* mask_logits, void* out, int64_t n,
                           int64_t cols, double beta, bool hard, cudaStream_t stream) {
  constexpr int VEC = gate_vec_width<Acc, W, Out>();
  const W* w = static_cast<const W*>(weight);
  const Acc* s = static_cast<const Acc*>(mask_logits);
  Out* y = static_cast<Out*>(out);
  const Acc b = static_cast<Acc>(beta);
  if (cols > 1) {
    gate_rows_forward_kernel<Acc, W, Out><<<blocks_for(n), kThreads, 0, stream>>>(w, s, y, n, cols, b, hard);
  } else if (aligned<W>(w, VEC) && aligned<Acc>(s, VEC) && aligned<Out>(y, VEC)) {
    gate_forward_kernel<Acc, W, Out, VEC>
        <<<blocks_for(n / VEC + 1), kThreads, 0, stream>>>(w, s, y, n, b, hard);
  } else {
    gate_forward_kernel<Acc, W, Out, 1>
        <<<blocks_for(n), kThreads, 0, stream>>>(w, s, y, n, b, hard);
  }
  return cudaGetLastError();
}

template <typename Acc, typename W, typename G>
cudaError_t launch_backward(const void* grad, const void* weight, const void* mask_logits,
                            void* grad_weight, void* grad_mask_logits, int64_t n, int64_t cols,
                            double beta, double penalty, cudaStream_t stream) {
  constexpr int VEC = gate_vec_width<Acc, W, G>();
  const G* g = static_cast<const G*>(grad);
  const W* w = static_cast<const W*>(weight);
  const Acc* s = static_cast<const Acc*>(mask_logits);
  W* dw = static_cast<W*>(grad_weight);
  Acc* ds = static_cast<Acc*>(grad_mask_logits);
  const Acc b = static_cast<Acc>(beta), lam = static_cast<Acc>(penalty);
  if (cols > 1) {
    constexpr int64_t kMaxGrid = 0x7fffffff;
    const int64_t rows = n / cols;
    const int grid = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(rows, kMaxGrid)));
    gate_rows_backward_kernel<Acc, W, G, kThreads>
        <<<grid, kThreads, 0, stream>>>(g, w, s, dw, ds, rows, cols, b, lam);
  } else if (aligned<G>(g, VEC) && aligned<W>(w, VEC) && aligned<Acc>(s, VEC) && aligned<W>(dw, VEC) &&
      aligned<Acc>(ds, VEC)) {
    gate_backward_kernel<Acc, W, G, VEC>
        <<<blocks_for(n / VEC + 1), kThreads, 0, stream>>>(g, w, s, dw, ds, n, b, lam);
  } else {
    gate_backward_kernel<Acc, W, G, 1>
        <<<blocks_for(n), kThreads, 0, stream>>>(g, w, s, dw, ds, n, b, lam);
  }
  return cudaGetLastError();
}

// Calls fn with a value of the storage type of `t`, for the three float32-mask dtypes.
template <typename Fn>
cudaError_t with_half_or_float(DType t, const Fn& fn) {
  switch (t) {
    case DType::Float32: return fn(float{});
    case DType::Float16: return fn(__half{});
    case DType::BFloat16: return fn(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t gate_forward(DType weight_type, DType out_type, const void* weight,
                         const void* mask_logits, void* out, int64_t n, int64_t cols, double beta,
                         bool hard, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (weight_type == DType::Float64 || out_type == DType::Float64) {
    if (weight_type != out_type) return cudaErrorInvalidValue;
    return launch_forward<double, double, double>(weight, mask_logits, out, n, cols, beta, hard,
                                                  stream);
  }
  return with_half_or_float(weight_type, [&](auto w) {
    return with_half_or_float(out_type, [&](auto y) {
      return launch_forward<float, decltype(w), decltype(y)>(weight, mask_logits, out, n, cols,
                                                              beta, hard, stream);
    });
  });
}

cudaError_t gate_backward(DType weight_type, DType grad_type, const void* grad,
                          const void* weight, const void* mask_logits, void* grad_weight,
                          void* grad_mask_logits, int64_t n, int64_t cols, double beta,
                          double penalty, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (weight_type == DType::Float64 || grad_type == DType::Float64) {
    if (weight_type != grad_type) return cudaErrorInvalidValue;
    return launch_backward<double, double, double>(grad, weight, mask_logits, grad_weight,
                                                   grad_mask_logits, n, cols, beta, penalty,
                                                   stream);
  }
  return with_half_or_float(weight_type, [&](auto w) {
    return with_half_or_float(grad_type, [&](auto g) {
      return launch_backward<float, decltype(w), decltype(g)>(
          grad, weight, mask_logits, grad_weight, grad_mask_logits, n, cols, beta, penalty, stream);
    });
  });
}

}  // namespace cuda
}  // namespace csext

// Host entry points of the CUDA gate kernels (gate_cuda.cu). Free of torch headers, so that the
// kernels compile with a bare nvcc (`.ci/run` builds them for sm_80 and sm_90 on every commit);
// csrc/cuda/ops_cuda.cpp wraps them as the CUDA kernels of csext::gate and csext::gate_backward.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace csext {
namespace cuda {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3 };

// out = w * m over n elements of flat storage, m = sigmoid(beta * s) or 1[s > 0] (`hard`),
// with one logit per `cols` consecutive weights (1: per weight; more: per row, channel form).
// s is float32, or float64 beside a float64 w (then out is float64 too). Launches on `stream`
// (of the current device) and returns the launch's error, cudaErrorInvalidValue for a dtype
// pair it has no kernel for.
cudaError_t gate_forward(DType weight_type, DType out_type, const void* weight,
                         const void* mask_logits, void* out, int64_t n, int64_t cols, double beta,
                         bool hard, cudaStream_t stream);

// Soft-gate backward: from grad = dL/dw_eff, dL/dw = grad * m (in w's dtype) and
// dL/ds = beta * m * (1 - m) * (grad * w + penalty) (in s's dtype), summed over a row of `cols`
// weights where one logit gates the row.
cudaError_t gate_backward(DType weight_type, DType grad_type, const void* grad,
                          const void* weight, const void* mask_logits, void* grad_weight,
                          void* grad_mask_logits, int64_t n, int64_t cols, double beta,
                          double penalty, cudaStream_t stream);

}  // namespace cuda
}  // namespace csext

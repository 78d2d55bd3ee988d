// The CUDA kernels of csext::gate and csext::gate_backward: the same schemas, checks, fake and
// autograd registrations as the CPU kernels (ops.cpp, autograd.cpp, csext/backends/aten.py), with
// the kernel bodies in gate_kernels.cuh. Built only where CUDA torch is present (setup.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../gate_checks.h"
#include "gate_cuda.h"

namespace csext {
namespace {

cuda::DType to_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::ScalarType::Float: return cuda::DType::Float32;
    case at::ScalarType::Half: return cuda::DType::Float16;
    case at::ScalarType::BFloat16: return cuda::DType::BFloat16;
    case at::ScalarType::Double: return cuda::DType::Float64;
    default: TORCH_CHECK_TYPE(false, "csext: no CUDA gate kernel for ", t);
  }
}

void check_launch(cudaError_t error, const char* op) {
  TORCH_CHECK(error == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(error));
}

at::Tensor gate_cuda(const at::Tensor& weight, const at::Tensor& mask_logits,
                     const at::Tensor& beta_tensor, bool hard, double penalty,
                     std::optional<at::ScalarType> dtype) {
  (void)penalty;  // used by the backward only
  const double beta = read_beta("csext::gate", beta_tensor);
  check_gate_args("csext::gate", "weight", weight, mask_logits, beta);
  const int64_t cols = weights_per_logit("csext::gate", "weight", weight, mask_logits);
  TORCH_CHECK(weight.is_cuda(), "csext::gate: the CUDA kernel got a tensor on ", weight.device());
  const at::ScalarType out_type = gate_output_type(weight, dtype);
  const c10::cuda::CUDAGuard device_guard(weight.device());
  const at::MemoryFormat layout = common_layout({weight, mask_logits});
  const at::Tensor w = weight.contiguous(layout);
  const at::Tensor s = mask_logits.contiguous(layout);
  at::Tensor out = at::empty(w.sizes(), w.options().dtype(out_type).memory_format(layout));
  check_launch(cuda::gate_forward(to_kernel_dtype(w.scalar_type()), to_kernel_dtype(out_type),
                                  w.const_data_ptr(), s.const_data_ptr(), out.mutable_data_ptr(),
                                  w.numel(), cols, beta, hard, c10::cuda::getCurrentCUDAStream()),
               "csext::gate");
  return out;
}

std::tuple<at::Tensor, at::Tensor> gate_backward_cuda(const at::Tensor& grad,
                                                      const at::Tensor& weight,
                                                      const at::Tensor& mask_logits,
                                                      const at::Tensor& beta_tensor,
                                                      double penalty) {
  const double beta = read_beta("csext::gate_backward", beta_tensor);
  check_gate_backward_args(grad, weight, mask_logits, beta, penalty);
  const int64_t cols = weights_per_logit("csext::gate_backward", "weight", weight, mask_logits);
  TORCH_CHECK(weight.is_cuda(), "csext::gate_backward: the CUDA kernel got a tensor on ",
              weight.device());
  const c10::cuda::CUDAGuard device_guard(weight.device());
  const at::MemoryFormat layout = common_layout({grad, weight, mask_logits});
  const at::Tensor g = grad.contiguous(layout);
  const at::Tensor w = weight.contiguous(layout);
  const at::Tensor s = mask_logits.contiguous(layout);
  at::Tensor grad_weight = at::empty(w.sizes(), w.options().memory_format(layout));
  at::Tensor grad_mask_logits = at::empty(s.sizes(), s.options().memory_format(layout));
  check_launch(cuda::gate_backward(to_kernel_dtype(w.scalar_type()),
                                   to_kernel_dtype(g.scalar_type()), g.const_data_ptr(),
                                   w.const_data_ptr(), s.const_data_ptr(),
                                   grad_weight.mutable_data_ptr(),
                                   grad_mask_logits.mutable_data_ptr(), w.numel(), cols, beta,
                                   penalty,
                                   c10::cuda::getCurrentCUDAStream()),
               "csext::gate_backward");
  return {grad_weight, grad_mask_logits};
}

}  // namespace

TORCH_LIBRARY_IMPL(csext, CUDA, m) {
  m.impl("gate", &gate_cuda);
  m.impl("gate_backward", &gate_backward_cuda);
}

}  // namespace csext

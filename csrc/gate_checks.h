// Argument checks and layout rule shared by the CPU (ops.cpp) and CUDA (cuda/ops_cuda.cpp)
// kernels of csext::gate and csext::gate_backward; messages name the argument and what was
// expected. csext/backends/common.py mirrors common_layout (kernel_layout) for the fake kernels.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <initializer_list>
#include <optional>

namespace csext {

inline bool is_gate_dtype(at::ScalarType t) {
  using at::ScalarType;
  return t == ScalarType::Float || t == ScalarType::BFloat16 || t == ScalarType::Half ||
         t == ScalarType::Double;
}

// Weights per mask logit: 1 where mask_logits has weight's shape, a row's size where it holds
// one logit per leading row, shape (rows, 1, ..., 1) (channel granularity).
inline int64_t weights_per_logit(const char* op, const char* weight_name, const at::Tensor& weight,
                                 const at::Tensor& mask_logits) {
  if (weight.sizes() == mask_logits.sizes()) return 1;
  bool rows = weight.dim() >= 1 && mask_logits.dim() == weight.dim() &&
              mask_logits.size(0) == weight.size(0);
  for (int64_t d = 1; rows && d < weight.dim(); ++d) rows = mask_logits.size(d) == 1;
  TORCH_CHECK_VALUE(rows, op, ": mask_logits must have the shape of ", weight_name, " ",
                    weight.sizes(), " or one logit per row, (", weight.dim() ? weight.size(0) : 0,
                    ", 1, ...), got ", mask_logits.sizes());
  return weight.size(0) == 0 ? 1 : weight.numel() / weight.size(0);
}

inline void check_gate_args(const char* op, const char* weight_name, const at::Tensor& weight,
                            const at::Tensor& mask_logits, double beta) {
  using at::ScalarType;
  (void)weights_per_logit(op, weight_name, weight, mask_logits);
  TORCH_CHECK_VALUE(weight.device() == mask_logits.device(), op, ": ", weight_name,
                    " and mask_logits must be on the same device, got ", weight.device(),
                    " and ", mask_logits.device());
  TORCH_CHECK_TYPE(is_gate_dtype(weight.scalar_type()), op, ": ", weight_name,
                   " must be float32, float64, bfloat16 or float16, got ", weight.scalar_type());
  const bool fp64 = weight.scalar_type() == ScalarType::Double;
  TORCH_CHECK_TYPE(mask_logits.scalar_type() == ScalarType::Float ||
                       (fp64 && mask_logits.scalar_type() == ScalarType::Double),
                   op, ": mask_logits must be float32 (or float64 beside a float64 ", weight_name,
                   "), got ", mask_logits.scalar_type());
  TORCH_CHECK_TYPE(!fp64 || mask_logits.scalar_type() == ScalarType::Double, op, ": a float64 ",
                   weight_name, " needs float64 mask_logits, got ", mask_logits.scalar_type());
  TORCH_CHECK_VALUE(std::isfinite(beta) && beta >= 1.0, op,
                    ": beta must be a finite number >= 1, got ", beta);
}

// The dtype csext::gate writes: `dtype`, default weight's; float64 only for a float64 weight.
inline at::ScalarType gate_output_type(const at::Tensor& weight,
                                       std::optional<at::ScalarType> dtype) {
  const at::ScalarType out_type = dtype.value_or(weight.scalar_type());
  const bool fp64 = weight.scalar_type() == at::ScalarType::Double;
  TORCH_CHECK_TYPE(is_gate_dtype(out_type) && (out_type == at::ScalarType::Double) == fp64,
                   "csext::gate: dtype must be float32, bfloat16 or float16 (float64 only for a "
                   "float64 weight), got ",
                   out_type, " for a ", weight.scalar_type(), " weight");
  return out_type;
}

inline void check_gate_backward_args(const at::Tensor& grad, const at::Tensor& weight,
                                     const at::Tensor& mask_logits, double beta, double penalty) {
  check_gate_args("csext::gate_backward", "weight", weight, mask_logits, beta);
  TORCH_CHECK_VALUE(grad.sizes() == weight.sizes(),
                    "csext::gate_backward: grad must have the shape of weight ", weight.sizes(),
                    ", got ", grad.sizes());
  TORCH_CHECK_VALUE(grad.device() == weight.device(),
                    "csext::gate_backward: grad must be on the device of weight (",
                    weight.device(), "), got ", grad.device());
  TORCH_CHECK_VALUE(std::isfinite(penalty) && penalty >= 0.0,
                    "csext::gate_backward: penalty must be a finite number >= 0, got ", penalty);
  const bool fp64 = weight.scalar_type() == at::ScalarType::Double;
  TORCH_CHECK_TYPE(is_gate_dtype(grad.scalar_type()) &&
                       (grad.scalar_type() == at::ScalarType::Double) == fp64,
                   "csext::gate_backward: grad must be float32, bfloat16 or float16 (float64 "
                   "beside a float64 weight), got ",
                   grad.scalar_type());
}

// beta travels as a 0-dim CPU tensor, not a float: torch.compile bakes float arguments of
// custom ops into the graph, which would recompile at every step of the beta schedule.
inline double read_beta(const char* op, const at::Tensor& beta) {
  TORCH_CHECK_VALUE(beta.dim() == 0 && beta.device().is_cpu() && beta.is_floating_point(), op,
                    ": beta must be a 0-dim floating-point tensor on the CPU, got a ",
                    beta.dim(), "-dim ", beta.scalar_type(), " tensor on ", beta.device());
  // Read in place where it can be: item() costs a dispatch, a visible share of a small layer's call.
  return beta.scalar_type() == at::ScalarType::Double ? *beta.const_data_ptr<double>()
                                                      : beta.item<double>();
}

// The layout the kernels run in: channels_last when every operand already is (conv weights
// stay channels_last), else contiguous.
inline at::MemoryFormat common_layout(std::initializer_list<at::Tensor> tensors) {
  bool all_contiguous = true, all_channels_last = true;
  for (const at::Tensor& t : tensors) {
    all_contiguous = all_contiguous && t.is_contiguous();
    all_channels_last = all_channels_last && t.dim() == 4 &&
                        t.is_contiguous(at::MemoryFormat::ChannelsLast);
  }
  return all_channels_last && !all_contiguous ? at::MemoryFormat::ChannelsLast
                                              : at::MemoryFormat::Contiguous;
}

}  // namespace csext

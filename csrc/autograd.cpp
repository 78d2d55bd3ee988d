// Autograd of csext::gate, in C++ so that a gated layer's call costs no Python beyond its own
// forward (the Python registration cost ~30 us a call, more than a small layer's matmul).
// It calls the ops through the dispatcher, so one registration serves every device's kernels,
// and torch.compile traces it through the fake kernels of csext/_ops.py.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace csext {
namespace {

using at::ScalarType;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_gate(const at::Tensor& weight, const at::Tensor& mask_logits,
                     const at::Tensor& beta, bool hard, double penalty,
                     std::optional<ScalarType> dtype) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("csext::gate", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, bool, double,
                                               std::optional<ScalarType>)>();
  return op.call(weight, mask_logits, beta, hard, penalty, dtype);
}

std::tuple<at::Tensor, at::Tensor> call_gate_backward(const at::Tensor& grad,
                                                      const at::Tensor& weight,
                                                      const at::Tensor& mask_logits,
                                                      const at::Tensor& beta, double penalty) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("csext::gate_backward", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, double)>();
  return op.call(grad, weight, mask_logits, beta, penalty);
}

// Saves w and s, never m or w_eff: the backward recomputes the mask in its single pass.
class GateFunction : public torch::autograd::Function<GateFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& weight,
                            const at::Tensor& mask_logits, const at::Tensor& beta, bool hard,
                            double penalty, std::optional<ScalarType> dtype) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({weight, mask_logits, beta});
    ctx->saved_data["hard"] = hard;
    ctx->saved_data["penalty"] = penalty;
    return call_gate(weight, mask_logits, beta, hard, penalty, dtype);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &weight = saved[0], &mask_logits = saved[1], &beta = saved[2];
    const bool hard = ctx->saved_data["hard"].toBool();
    const double penalty = ctx->saved_data["penalty"].toDouble();
    const bool needs_weight = ctx->needs_input_grad(0);
    const bool needs_mask_logits = ctx->needs_input_grad(1);
    const at::Tensor& grad = grads[0];
    at::Tensor grad_weight, grad_mask_logits;
    if (hard || !needs_mask_logits) {
      // dL/dw = G * m is the forward pass with G in place of w; s gets no gradient.
      if (needs_weight) {
        grad_weight = call_gate(grad, mask_logits, beta, hard, 0.0, weight.scalar_type());
      }
    } else {
      std::tie(grad_weight, grad_mask_logits) =
          call_gate_backward(grad, weight, mask_logits, beta, penalty);
      if (!needs_weight) grad_weight = at::Tensor();
    }
    // One entry per forward argument: beta, hard, penalty and dtype get none.
    return {grad_weight, grad_mask_logits, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor gate_autograd(const at::Tensor& weight, const at::Tensor& mask_logits,
                         const at::Tensor& beta, bool hard, double penalty,
                         std::optional<ScalarType> dtype) {
  return GateFunction::apply(weight, mask_logits, beta, hard, penalty, dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(csext, Autograd, m) { m.impl("gate", &gate_autograd); }

}  // namespace csext

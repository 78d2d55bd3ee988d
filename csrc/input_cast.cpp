// The cast of a gated layer's input to the autocast dtype, and its autograd node.
//
// Under autocast a float32 x is cast to bfloat16 (or float16) before the layer's matmul or
// convolution, and the backward casts dL/dx back to float32. ATen's copy kernel on CUDA widens
// half and bfloat16 element by element (its vectorized casts only narrow), which on an H100
// made that cast the slowest of the casts around a linear layer (bench/README.md, M = 8192).
// InputCastBackward widens through csext::cast instead, whose CUDA kernel reads and writes 16
// bytes a thread per access (cuda/gate_kernels.cuh); elsewhere csext::cast is ATen's cast. The
// values are the same bits either way: widening is exact.
#include "input_cast.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/dynamo/compiled_autograd.h>

#include <string>
#include <vector>

#include "nodes.h"

namespace csext {
namespace {

using at::ScalarType;
using torch::autograd::variable_list;
using torch::dynamo::autograd::CompiledNodeArgs;
using torch::dynamo::autograd::PackedArgs;
using torch::dynamo::autograd::SwapSavedVariables;

at::Tensor call_cast(const at::Tensor& x, ScalarType dtype) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("csext::cast", "")
                             .typed<at::Tensor(const at::Tensor&, ScalarType)>();
  return op.call(x, dtype);
}

// Edge: the input. Saves only the input's dtype.
struct InputCastBackward : public torch::autograd::Node {
  ScalarType input_type_ = ScalarType::Float;

  // dL/dx in x's dtype; with grad mode on (create_graph=True) through ATen's differentiable cast.
  static at::Tensor widen(const at::Tensor& grad, ScalarType input_type) {
    if (!grad.defined()) return grad;
    if (at::GradMode::is_enabled()) return grad.to(input_type);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_cast(grad, input_type);
  }

  std::string name() const override { return "csext::InputCastBackward"; }

  variable_list apply(variable_list&& grads) override { return {widen(grads[0], input_type_)}; }

  void compiled_args(CompiledNodeArgs& args) const override { args.collect(input_type_); }

  variable_list apply_with_saved(const variable_list& grads, SwapSavedVariables& saved) override {
    PackedArgs packed;
    packed.pack(input_type_);
    return call_compiled(*this, saved, name(), &functional, grads, packed.vec());
  }

  // Compiled autograd traces ATen's cast, which inductor generates a kernel for.
  static variable_list functional(const variable_list& grads, const std::vector<at::IValue>& args) {
    PackedArgs packed(args);
    const auto input_type = packed.unpack<ScalarType>();
    return {grads[0].defined() ? grads[0].to(input_type) : grads[0]};
  }
};

// torch.func's transforms are running (as torch._C._are_functorch_transforms_active tells), or x
// is one of their tensor wrappers (a dead one, left by a transform that ended, included).
bool functorch_involved(const at::Tensor& x) {
  using c10::DispatchKey;
  const c10::DispatchKeySet included = c10::impl::tls_local_dispatch_key_set().included_;
  const c10::DispatchKeySet wrappers({DispatchKey::FuncTorchGradWrapper, DispatchKey::FuncTorchBatched});
  return included.has(DispatchKey::FuncTorchDynamicLayerFrontMode) ||
         included.has(DispatchKey::FuncTorchDynamicLayerBackMode) || x.key_set().has_any(wrappers);
}

}  // namespace

at::Tensor cast_input(const at::Tensor& x, ScalarType dtype) {
  if (x.scalar_type() == dtype) return x;
  // ATen's own cast where its node is needed: x with a forward-mode tangent, or torch.func's
  // transforms, whose tensor wrappers take their autograd from the dispatcher.
  if (!torch::autograd::compute_requires_grad(x) || x._fw_grad(/*level=*/0).defined() ||
      functorch_involved(x)) {
    return x.to(dtype);
  }
  at::Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    out = x.to(dtype);
  }
  auto node = make_node<InputCastBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(x));
  node->input_type_ = x.scalar_type();
  torch::autograd::set_history(out, node);
  return out;
}

PyObject* autocast_input(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 2 && THPVariable_Check(args[0]) && THPDtype_Check(args[1]),
                   "csext._C.autocast_input takes (x, dtype)");
  if (at::impl::torch_function_mode_enabled() || !THPVariable_CheckExact(args[0])) {
    return PyObject_CallMethod(args[0], "to", "O", args[1]);  // __torch_function__ sees x.to
  }
  const ScalarType dtype = reinterpret_cast<THPDtype*>(args[1])->scalar_type;
  return THPVariable_Wrap(cast_input(THPVariable_Unpack(args[0]), dtype));
  END_HANDLE_TH_ERRORS
}

}  // namespace csext

// csext._C, the Python module, and its one job: the `cpp` and `cuda` backends' eager calls of the
// gated ops, made without boxing. `torch.ops.csext.gated_linear(...)` converts every argument
// into an IValue through the schema before the dispatcher runs the op, which costs a small layer
// more host time than the gate itself (bench/host.py); these functions take the arguments through
// pybind11 (torch/extension.h) and call the same op through the same dispatcher, typed. Only
// csext/backends/aten.py calls them, once csext.functional has checked the arguments, and only in
// eager mode on plain tensors (torch.compile, torch.export and torch.jit.trace see torch.ops).
// The same arguments as the ops' schemas (csrc/ops.cpp), stride, padding and dilation as pairs.
#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <optional>

namespace csext {
namespace {

using at::ScalarType;

at::Tensor gate(const at::Tensor& weight, const at::Tensor& mask_logits, const at::Tensor& beta, bool hard,
                double penalty, ScalarType dtype) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("csext::gate", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool,
                                               double, std::optional<ScalarType>)>();
  return op.call(weight, mask_logits, beta, hard, penalty, dtype);
}

at::Tensor gated_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask_logits,
                        const at::Tensor& beta, const std::optional<at::Tensor>& bias, bool hard, double penalty,
                        ScalarType dtype) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("csext::gated_linear", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, bool, double, std::optional<ScalarType>)>();
  return op.call(x, weight, mask_logits, beta, bias, hard, penalty, dtype);
}

at::Tensor gated_conv2d(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask_logits,
                        const at::Tensor& beta, const std::optional<at::Tensor>& bias,
                        const std::array<int64_t, 2>& stride, const std::array<int64_t, 2>& padding,
                        const std::array<int64_t, 2>& dilation, int64_t groups, bool hard, double penalty,
                        ScalarType dtype) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("csext::gated_conv2d", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                            int64_t, bool, double, std::optional<ScalarType>)>();
  return op.call(x, weight, mask_logits, beta, bias, stride, padding, dilation, groups, hard, penalty, dtype);
}

}  // namespace
}  // namespace csext

// Importing csext._C also loads this library, whose static initialisers register the ops.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Without the GIL, as ATen's own bindings run their ops.
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def("gate", &csext::gate, "csext::gate, called typed", no_gil);
  m.def("gated_linear", &csext::gated_linear, "csext::gated_linear, called typed", no_gil);
  m.def("gated_conv2d", &csext::gated_conv2d, "csext::gated_conv2d, called typed (stride, padding, dilation: pairs)",
        no_gil);
}

// The autograd node of the triton backend's fused linear layer (csext/_triton.py).
//
// The layer's kernels are launched from Python, forward and backward. In eager mode its
// forward launches the fused GEMM, then hands the output to triton_linear_node, which makes it
// the output of this node; the node's backward calls the Python backward that _triton.py set
// (set_triton_linear_backward). That is the work of a torch.autograd.Function, less its
// Python: the ctx object, save_for_backward, Function.apply's and the backward's own wrappers.
// Compiled autograd gets the same Python backward, told to call the layer's custom ops, which
// it can trace, instead of launching the kernels.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/saved_variable.h>

#include <array>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "nodes.h"
#include "triton_node.h"

namespace csext {
namespace {

using at::ScalarType;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using torch::dynamo::autograd::CompiledNodeArgs;
using torch::dynamo::autograd::PackedArgs;
using torch::dynamo::autograd::SwapSavedVariables;

// _triton._linear_node_backward; set once, never released (no exit-order issue).
PyObject* python_backward = nullptr;

struct Gil {
  PyGILState_STATE state = PyGILState_Ensure();
  ~Gil() { PyGILState_Release(state); }
};

// The Python exception set now, carried to whoever called backward (as PyNode carries it).
[[noreturn]] void throw_python_error() {
  python_error error;
  error.persist();
  throw std::move(error);
}

// What the backward reads besides the incoming gradient. Edges: x, weight, mask_logits, bias.
struct LinearState {
  at::Tensor input, weight, mask_logits, beta;
  bool hard = false;
  double penalty = 0.0;
  ScalarType bias_type = ScalarType::Float;
  std::array<bool, 4> needs = {};

  // (dL/dx, dL/dw, dL/ds, dL/db) from the Python backward, undefined where it gives None.
  variable_list backward(const at::Tensor& grad, bool compiled) const {
    const Gil gil;
    PyObject* args = PyTuple_New(10);
    if (args == nullptr) throw_python_error();
    PyTuple_SET_ITEM(args, 0, PyBool_FromLong(compiled));
    PyTuple_SET_ITEM(args, 1, THPVariable_Wrap(grad));
    PyTuple_SET_ITEM(args, 2, THPVariable_Wrap(input));
    PyTuple_SET_ITEM(args, 3, THPVariable_Wrap(weight));
    PyTuple_SET_ITEM(args, 4, THPVariable_Wrap(mask_logits));
    PyTuple_SET_ITEM(args, 5, THPVariable_Wrap(beta));
    PyTuple_SET_ITEM(args, 6, PyBool_FromLong(hard));
    PyTuple_SET_ITEM(args, 7, PyFloat_FromDouble(penalty));
    PyObject* dtype = reinterpret_cast<PyObject*>(torch::getTHPDtype(bias_type));
    Py_INCREF(dtype);
    PyTuple_SET_ITEM(args, 8, dtype);
    PyTuple_SET_ITEM(args, 9, Py_BuildValue("(OOOO)", needs[0] ? Py_True : Py_False, needs[1] ? Py_True : Py_False,
                                            needs[2] ? Py_True : Py_False, needs[3] ? Py_True : Py_False));
    PyObject* result = PyObject_Call(python_backward, args, nullptr);
    Py_DECREF(args);
    if (result == nullptr) throw_python_error();
    variable_list grads(4);
    const bool four = PyTuple_Check(result) && PyTuple_GET_SIZE(result) == 4;
    for (Py_ssize_t i = 0; four && i < 4; ++i) {
      PyObject* item = PyTuple_GET_ITEM(result, i);
      if (THPVariable_Check(item)) grads[i] = THPVariable_Unpack(item);
    }
    Py_DECREF(result);
    TORCH_CHECK(four, "csext: the triton linear backward must return 4 gradients");
    return grads;
  }

  void pack(PackedArgs& packed) const {
    for (const at::Tensor& t : {input, weight, mask_logits, beta}) packed.pack(t);
    packed.pack(hard);
    packed.pack(penalty);
    packed.pack(bias_type);
    packed.pack(needs);
  }

  static LinearState unpack(PackedArgs& packed) {
    LinearState state;
    for (at::Tensor* t : {&state.input, &state.weight, &state.mask_logits, &state.beta}) {
      *t = packed.unpack<at::Tensor>();
    }
    state.hard = packed.unpack<bool>();
    state.penalty = packed.unpack<double>();
    state.bias_type = packed.unpack<ScalarType>();
    state.needs = packed.unpack<std::array<bool, 4>>();
    return state;
  }
};

// Saves x, w and s as autograd.Function's save_for_backward would (version checks, saved-tensor
// hooks), and beta, a 0-dim float32 tensor that takes no gradient, as it is.
struct TritonGatedLinearBackward : public torch::autograd::Node {
  SavedVariable input_, weight_, mask_logits_;
  at::Tensor beta_;
  bool hard_ = false;
  double penalty_ = 0.0;
  ScalarType bias_type_ = ScalarType::Float;

  std::string name() const override { return "csext::TritonGatedLinearBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    input_.reset_data();
    weight_.reset_data();
    mask_logits_.reset_data();
  }

  LinearState state() const {
    return {input_.unpack(), weight_.unpack(), mask_logits_.unpack(), beta_, hard_, penalty_, bias_type_,
            {task_should_compute_output(0), task_should_compute_output(1), task_should_compute_output(2),
             task_should_compute_output(3)}};
  }

  variable_list apply(variable_list&& grads) override {
    if (!grads[0].defined()) return variable_list(4);
    LinearState state;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      state = this->state();
    }
    return state.backward(grads[0], /*compiled=*/false);
  }

  void compiled_args(CompiledNodeArgs& args) const override {
    for (const SavedVariable* v : {&input_, &weight_, &mask_logits_}) args.collect(*v, false);
    args.collect(beta_);
    args.collect(hard_);
    args.collect(penalty_);
    args.collect(bias_type_);
  }

  variable_list apply_with_saved(const variable_list& grads, SwapSavedVariables& saved) override {
    for (SavedVariable* v : {&input_, &weight_, &mask_logits_}) saved.before(*v);
    saved.before(beta_);
    PackedArgs packed;
    state().pack(packed);
    variable_list result = call_compiled(*this, saved, name(), &functional, grads, packed.vec());
    for (SavedVariable* v : {&input_, &weight_, &mask_logits_}) saved.after(*v);
    saved.after(beta_);
    return result;
  }

  static variable_list functional(const variable_list& grads, const std::vector<at::IValue>& args) {
    PackedArgs packed(args);
    const LinearState state = LinearState::unpack(packed);
    // Every edge that takes a gradient gets a tensor, as compiled autograd wants (s has no edge
    // under the hard mask).
    return grads[0].defined() ? state.backward(grads[0], /*compiled=*/true) : variable_list(4);
  }
};

bool has_tangent(const at::Tensor& t) { return t.defined() && t._fw_grad(/*level=*/0).defined(); }

}  // namespace

PyObject* set_triton_linear_backward(PyObject*, PyObject* fn) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(PyCallable_Check(fn), "csext._C.set_triton_linear_backward takes a callable");
  Py_INCREF(fn);
  Py_XDECREF(python_backward);
  python_backward = fn;
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyObject* triton_linear_node(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 8, "csext._C.triton_linear_node takes 8 arguments, got ", nargs);
  TORCH_CHECK(python_backward != nullptr, "csext._C.triton_linear_node: no backward set");
  for (int i : {0, 1, 2, 3, 4}) {
    TORCH_CHECK_TYPE(THPVariable_Check(args[i]), "csext._C.triton_linear_node: argument ", i, " must be a tensor");
  }
  TORCH_CHECK_TYPE(args[5] == Py_None || THPVariable_Check(args[5]),
                   "csext._C.triton_linear_node: bias must be a tensor or None");
  const at::Tensor& out = THPVariable_Unpack(args[0]);
  const at::Tensor& input = THPVariable_Unpack(args[1]);
  const at::Tensor& weight = THPVariable_Unpack(args[2]);
  const at::Tensor& mask_logits = THPVariable_Unpack(args[3]);
  std::optional<at::Tensor> bias;
  if (args[5] != Py_None) bias = THPVariable_Unpack(args[5]);
  const int hard = PyObject_IsTrue(args[6]);
  const double penalty = PyFloat_AsDouble(args[7]);
  if (hard == -1 || (penalty == -1.0 && PyErr_Occurred())) return nullptr;
  // The hard mask is a step: s takes no gradient through it, and has no edge here (as on the
  // torch backend, whose (s > 0) leaves s out of the graph).
  const at::Tensor no_edge;
  const at::Tensor& mask_edge = hard ? no_edge : mask_logits;
  TORCH_CHECK_NOT_IMPLEMENTED(
      !has_tangent(input) && !has_tangent(weight) && !has_tangent(mask_edge) && !(bias && has_tangent(*bias)),
      "csext: the triton backend's fused linear layer has no forward-mode AD (jvp); use backend "
      "'torch', 'cpp' or 'cuda' for it");
  if (!torch::autograd::compute_requires_grad(input, weight, mask_edge, bias)) {
    Py_INCREF(args[0]);
    return args[0];
  }
  auto node = make_node<TritonGatedLinearBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(input, weight, mask_edge, bias));
  node->input_ = SavedVariable(input, /*is_output=*/false);
  node->weight_ = SavedVariable(weight, /*is_output=*/false);
  node->mask_logits_ = SavedVariable(mask_logits, /*is_output=*/false);
  node->beta_ = THPVariable_Unpack(args[4]);
  node->hard_ = hard == 1;
  node->penalty_ = penalty;
  if (bias) node->bias_type_ = bias->scalar_type();
  torch::autograd::set_history(out, node);
  Py_INCREF(args[0]);
  return args[0];
  END_HANDLE_TH_ERRORS
}

}  // namespace csext

// The autograd nodes of the triton backend's gate and fused linear layer (csext/_triton.py).
//
// Their kernels are launched from Python, forward and backward. In eager mode the forward
// launches its kernel, then hands the output to triton_gate_node or triton_linear_node, which
// make it the output of a node of this file; the node's backward calls the Python backward that
// _triton.py set (set_triton_backwards). That is the work of a torch.autograd.Function, less its
// Python: the ctx object, save_for_backward, Function.apply's and the backward's own wrappers.
// Compiled autograd gets the same Python backward, told to call the custom ops, which it can
// trace, instead of launching the kernels.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/autograd/variable.h>

#include <array>
#include <cstddef>
#include <mutex>
#include <optional>
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

// What sets the two nodes apart. Their Python backwards are called as
//   backward(compiled, grad, *saved, beta, hard, penalty, [bias dtype,] needs)
// and return one gradient (or None) per edge; `needs` says which edges want one.
struct Gate {
  static constexpr const char* kName = "csext::TritonGateBackward";
  static constexpr const char* kWhat = "gate";
  static constexpr size_t kSaved = 2;  // weight, mask_logits
  static constexpr size_t kEdges = 2;  // weight, mask_logits
  static constexpr bool kHasBias = false;
  static inline PyObject* backward = nullptr;  // _triton._gate_node_backward, never released
};

struct Linear {
  static constexpr const char* kName = "csext::TritonGatedLinearBackward";
  static constexpr const char* kWhat = "fused linear layer";
  static constexpr size_t kSaved = 3;  // x, weight, mask_logits
  static constexpr size_t kEdges = 4;  // x, weight, mask_logits, bias
  static constexpr bool kHasBias = true;
  static inline PyObject* backward = nullptr;  // _triton._linear_node_backward
};

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

PyObject* new_ref(PyObject* obj) {
  Py_INCREF(obj);
  return obj;
}

// What a backward reads besides the incoming gradient.
template <class Op>
struct State {
  std::array<at::Tensor, Op::kSaved> saved;
  at::Tensor beta;
  bool hard = false;
  double penalty = 0.0;
  ScalarType bias_type = ScalarType::Float;
  std::array<bool, Op::kEdges> needs = {};

  // One gradient per edge from the Python backward, undefined where it gives None.
  variable_list backward(const at::Tensor& grad, bool compiled) const {
    const Gil gil;
    std::vector<PyObject*> items = {PyBool_FromLong(compiled), THPVariable_Wrap(grad)};
    for (const at::Tensor& t : saved) items.push_back(THPVariable_Wrap(t));
    items.push_back(THPVariable_Wrap(beta));
    items.push_back(PyBool_FromLong(hard));
    items.push_back(PyFloat_FromDouble(penalty));
    if (Op::kHasBias) items.push_back(new_ref(reinterpret_cast<PyObject*>(torch::getTHPDtype(bias_type))));
    PyObject* flags = PyTuple_New(Op::kEdges);
    for (size_t i = 0; flags != nullptr && i < Op::kEdges; ++i) {
      PyTuple_SET_ITEM(flags, i, PyBool_FromLong(needs[i]));
    }
    items.push_back(flags);
    PyObject* args = PyTuple_New(static_cast<Py_ssize_t>(items.size()));
    bool complete = args != nullptr;
    for (size_t i = 0; i < items.size(); ++i) {
      complete = complete && items[i] != nullptr;
      if (args != nullptr && items[i] != nullptr) PyTuple_SET_ITEM(args, i, items[i]);  // steals it
      else Py_XDECREF(items[i]);
    }
    if (!complete) {
      Py_XDECREF(args);
      throw_python_error();
    }
    PyObject* result = PyObject_Call(Op::backward, args, nullptr);
    Py_DECREF(args);
    if (result == nullptr) throw_python_error();
    variable_list grads(Op::kEdges);
    const bool fits = PyTuple_Check(result) && PyTuple_GET_SIZE(result) == static_cast<Py_ssize_t>(Op::kEdges);
    for (size_t i = 0; fits && i < Op::kEdges; ++i) {
      PyObject* item = PyTuple_GET_ITEM(result, i);
      if (THPVariable_Check(item)) grads[i] = THPVariable_Unpack(item);
    }
    Py_DECREF(result);
    TORCH_CHECK(fits, Op::kName, ": the Python backward must return ", Op::kEdges, " gradients");
    return grads;
  }

  void pack(PackedArgs& packed) const {
    for (const at::Tensor& t : saved) packed.pack(t);
    packed.pack(beta);
    packed.pack(hard);
    packed.pack(penalty);
    packed.pack(bias_type);
    packed.pack(needs);
  }

  static State unpack(PackedArgs& packed) {
    State state;
    for (at::Tensor& t : state.saved) t = packed.unpack<at::Tensor>();
    state.beta = packed.unpack<at::Tensor>();
    state.hard = packed.unpack<bool>();
    state.penalty = packed.unpack<double>();
    state.bias_type = packed.unpack<ScalarType>();
    state.needs = packed.unpack<std::array<bool, Op::kEdges>>();
    return state;
  }
};

// Saves its tensors as autograd.Function's save_for_backward would (version checks, saved-tensor
// hooks), and beta, a 0-dim float32 tensor that takes no gradient, as it is.
template <class Op>
struct TritonBackward : public torch::autograd::Node {
  std::array<SavedVariable, Op::kSaved> saved_;
  at::Tensor beta_;
  bool hard_ = false;
  double penalty_ = 0.0;
  ScalarType bias_type_ = ScalarType::Float;

  std::string name() const override { return Op::kName; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable& v : saved_) v.reset_data();
  }

  State<Op> state() const {
    State<Op> state;
    for (size_t i = 0; i < Op::kSaved; ++i) state.saved[i] = saved_[i].unpack();
    state.beta = beta_;
    state.hard = hard_;
    state.penalty = penalty_;
    state.bias_type = bias_type_;
    for (size_t i = 0; i < Op::kEdges; ++i) state.needs[i] = task_should_compute_output(i);
    return state;
  }

  variable_list apply(variable_list&& grads) override {
    if (!grads[0].defined()) return variable_list(Op::kEdges);
    State<Op> state;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      state = this->state();
    }
    return state.backward(grads[0], /*compiled=*/false);
  }

  void compiled_args(CompiledNodeArgs& args) const override {
    for (const SavedVariable& v : saved_) args.collect(v, false);
    args.collect(beta_);
    args.collect(hard_);
    args.collect(penalty_);
    args.collect(bias_type_);
  }

  variable_list apply_with_saved(const variable_list& grads, SwapSavedVariables& saved) override {
    for (SavedVariable& v : saved_) saved.before(v);
    saved.before(beta_);
    PackedArgs packed;
    state().pack(packed);
    variable_list result = call_compiled(*this, saved, name(), &functional, grads, packed.vec());
    for (SavedVariable& v : saved_) saved.after(v);
    saved.after(beta_);
    return result;
  }

  // Every edge that takes a gradient gets a tensor, as compiled autograd wants (s has no edge
  // under the hard mask).
  static variable_list functional(const variable_list& grads, const std::vector<at::IValue>& args) {
    PackedArgs packed(args);
    const State<Op> state = State<Op>::unpack(packed);
    return grads[0].defined() ? state.backward(grads[0], /*compiled=*/true) : variable_list(Op::kEdges);
  }
};

bool has_tangent(const at::Tensor& t) { return t.defined() && t._fw_grad(/*level=*/0).defined(); }

bool is_tensor(PyObject* obj) { return THPVariable_Check(obj); }

// args[0] (the output) made that of a new TritonBackward<Op> node, which saves `saved` and has
// one edge per `edges` entry (an undefined tensor: none), where one of them takes a gradient;
// args[0] itself otherwise.
template <class Op>
PyObject* attach(PyObject* const* args, const std::array<at::Tensor, Op::kSaved>& saved,
                 const std::array<at::Tensor, Op::kEdges>& edges, const at::Tensor& beta, bool hard, double penalty,
                 ScalarType bias_type) {
  for (const at::Tensor& t : edges) {
    TORCH_CHECK_NOT_IMPLEMENTED(!has_tangent(t), "csext: the triton backend's ", Op::kWhat,
                                " has no forward-mode AD (jvp); use backend 'torch', 'cpp' or 'cuda' for it");
  }
  bool needs_grad = false;
  for (const at::Tensor& t : edges) needs_grad = needs_grad || (t.defined() && t.requires_grad());
  if (!needs_grad || !at::GradMode::is_enabled()) return new_ref(args[0]);
  TORCH_CHECK(Op::backward != nullptr, "csext._C: no backward set for ", Op::kName);
  auto node = make_node<TritonBackward<Op>>();
  std::vector<torch::autograd::Edge> next_edges;
  next_edges.reserve(Op::kEdges);
  for (const at::Tensor& t : edges) {
    next_edges.push_back(t.defined() ? torch::autograd::impl::gradient_edge(t) : torch::autograd::Edge());
  }
  node->set_next_edges(std::move(next_edges));
  for (size_t i = 0; i < Op::kSaved; ++i) node->saved_[i] = SavedVariable(saved[i], /*is_output=*/false);
  node->beta_ = beta;
  node->hard_ = hard;
  node->penalty_ = penalty;
  node->bias_type_ = bias_type;
  torch::autograd::set_history(THPVariable_Unpack(args[0]), node);
  return new_ref(args[0]);
}

// hard and penalty from Python objects; false where one is not a number (a Python error set).
bool read_flags(PyObject* hard_obj, PyObject* penalty_obj, bool& hard, double& penalty) {
  const int truth = PyObject_IsTrue(hard_obj);
  if (truth == -1) return false;
  hard = truth == 1;
  penalty = PyFloat_AsDouble(penalty_obj);
  return !(penalty == -1.0 && PyErr_Occurred());
}

}  // namespace

PyObject* set_triton_backwards(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 2 && PyCallable_Check(args[0]) && PyCallable_Check(args[1]),
                   "csext._C.set_triton_backwards takes two callables: the gate's and the linear layer's backward");
  for (PyObject** slot : {&Gate::backward, &Linear::backward}) Py_XDECREF(*slot);
  Gate::backward = new_ref(args[0]);
  Linear::backward = new_ref(args[1]);
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// The hard mask is a step: s takes no gradient through it, and has no edge in either node (as
// on the torch backend, whose (s > 0) leaves s out of the graph).

PyObject* triton_gate_node(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 6 && is_tensor(args[0]) && is_tensor(args[1]) && is_tensor(args[2]) &&
                       is_tensor(args[3]),
                   "csext._C.triton_gate_node takes (w_eff, weight, mask_logits, beta, hard, penalty)");
  bool hard = false;
  double penalty = 0.0;
  if (!read_flags(args[4], args[5], hard, penalty)) return nullptr;
  const at::Tensor& weight = THPVariable_Unpack(args[1]);
  const at::Tensor& mask_logits = THPVariable_Unpack(args[2]);
  return attach<Gate>(args, {weight, mask_logits}, {weight, hard ? at::Tensor() : mask_logits},
                      THPVariable_Unpack(args[3]), hard, penalty, ScalarType::Float);
  END_HANDLE_TH_ERRORS
}

PyObject* triton_linear_node(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 8 && is_tensor(args[0]) && is_tensor(args[1]) && is_tensor(args[2]) &&
                       is_tensor(args[3]) && is_tensor(args[4]) && (args[5] == Py_None || is_tensor(args[5])),
                   "csext._C.triton_linear_node takes (y, x, weight, mask_logits, beta, bias or None, hard, "
                   "penalty)");
  bool hard = false;
  double penalty = 0.0;
  if (!read_flags(args[6], args[7], hard, penalty)) return nullptr;
  const at::Tensor& input = THPVariable_Unpack(args[1]);
  const at::Tensor& weight = THPVariable_Unpack(args[2]);
  const at::Tensor& mask_logits = THPVariable_Unpack(args[3]);
  const at::Tensor bias = args[5] == Py_None ? at::Tensor() : THPVariable_Unpack(args[5]);
  return attach<Linear>(args, {input, weight, mask_logits}, {input, weight, hard ? at::Tensor() : mask_logits, bias},
                        THPVariable_Unpack(args[4]), hard, penalty,
                        bias.defined() ? bias.scalar_type() : ScalarType::Float);
  END_HANDLE_TH_ERRORS
}

}  // namespace csext

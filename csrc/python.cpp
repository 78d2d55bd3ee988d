// csext._C, the Python module. Importing it loads this library, whose static initialisers
// register the ops (ops.cpp, autograd.cpp, cuda/ops_cuda.cpp). Its functions are the eager fast
// path of csext.functional.gated_linear and gated_conv2d on the cpp and cuda backends: one C call
// that checks the arguments, casts x as autocast would (with input_cast.cpp's node) and calls the
// layer op through the dispatcher, in place of the Python checks and the boxed torch.ops call;
// and the checks alone (linear_input, conv2d_input) for the triton backend's layers, whose ops
// are Python; and the autograd nodes of the triton gate and fused linear layer (triton_node.cpp).
// A small layer on a GPU runs at the speed of its host code, so these microseconds count
// (bench/host.py).
//
// The fast path's functions take what csext.functional takes as valid, or less, and never
// explain: for any other argument they return None, and the Python path runs, which raises the
// error that names the argument. A tensor subclass or an active __torch_function__ mode also
// gets None (the Python path hands it to __torch_function__), and so does a call under
// torch.jit.trace (the Python path checks whether torch.onnx.export traces, which needs the
// reference's ops); dispatcher-level machinery (autograd, functorch, __torch_dispatch__ modes)
// sees the same op call either way.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/ScalarOps.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>

#include <array>
#include <cmath>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

#include "gate_checks.h"
#include "input_cast.h"
#include "triton_node.h"

namespace csext {
namespace {

using at::ScalarType;

// A float or int (not bool) with lowest <= value < inf, as check_beta and check_penalty take.
bool read_number(PyObject* obj, double lowest, double& value) {
  if (PyFloat_Check(obj)) {
    value = PyFloat_AS_DOUBLE(obj);
  } else if (PyLong_Check(obj) && !PyBool_Check(obj)) {
    value = PyLong_AsDouble(obj);
    if (value == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
  } else {
    return false;
  }
  return value >= lowest && value < INFINITY;  // NaN fails both
}

bool read_int(PyObject* obj, int64_t& value) {
  if (!PyLong_Check(obj) || PyBool_Check(obj)) return false;
  int overflow = 0;
  value = PyLong_AsLongLongAndOverflow(obj, &overflow);
  if (overflow != 0 || (value == -1 && PyErr_Occurred())) {
    PyErr_Clear();
    return false;
  }
  return true;
}

// An int, or a tuple or list of two ints (a conv2d stride, padding or dilation).
bool read_pair(PyObject* obj, std::array<int64_t, 2>& pair) {
  if (PyTuple_Check(obj) || PyList_Check(obj)) {
    return PySequence_Fast_GET_SIZE(obj) == 2 && read_int(PySequence_Fast_GET_ITEM(obj, 0), pair[0]) &&
           read_int(PySequence_Fast_GET_ITEM(obj, 1), pair[1]);
  }
  if (!read_int(obj, pair[0])) return false;
  pair[1] = pair[0];
  return true;
}

// beta as the ops take it: a 0-dim float64 CPU tensor (csext/_ops.py beta_tensor), one per value
// in use, so that a call allocates none.
at::Tensor beta_tensor(double beta) {
  static std::mutex mutex;
  static auto* cache = new std::vector<std::pair<double, at::Tensor>>();  // never freed: no exit-order issue
  std::lock_guard<std::mutex> lock(mutex);
  for (const auto& [value, tensor] : *cache) {
    if (value == beta) return tensor;
  }
  if (cache->size() >= 64) cache->clear();
  // Made without the dispatcher: under torch.func.grad, at::scalar_tensor would give a wrapper
  // whose level dies with the transform.
  cache->emplace_back(beta, at::detail::scalar_tensor_static(beta, ScalarType::Double, at::kCPU));
  return cache->back().second;
}

// The arguments both layers share, once taken.
struct Layer {
  at::Tensor x, weight, mask_logits;
  std::optional<at::Tensor> bias;
  bool hard = false;
  double beta = 1.0, penalty = 0.0;
  ScalarType dtype = ScalarType::Float;
};

// args: x, weight, mask_logits, beta, bias, hard, penalty. The checks of
// functional._check_layer_args and _layer_input, and (with cast_x) its autocast cast of x
// (cast_input: the same values, csext's node).
std::optional<Layer> take_layer(PyObject* const* args, int64_t weight_dim,
                                bool (*x_fits)(const at::Tensor& x, const at::Tensor& weight), bool cast_x = true) {
  PyObject *x_obj = args[0], *weight_obj = args[1], *mask_logits_obj = args[2], *bias_obj = args[4];
  // Exactly torch.Tensor or nn.Parameter: a subclass may override __torch_function__.
  if (at::impl::torch_function_mode_enabled() || torch::jit::tracer::isTracing() ||
      !THPVariable_CheckExact(x_obj) || !THPVariable_CheckExact(weight_obj) ||
      !THPVariable_CheckExact(mask_logits_obj) || (bias_obj != Py_None && !THPVariable_CheckExact(bias_obj)) ||
      !PyBool_Check(args[5])) {
    return std::nullopt;
  }
  Layer layer;
  if (!read_number(args[3], 1.0, layer.beta) || !read_number(args[6], 0.0, layer.penalty)) return std::nullopt;
  layer.hard = args[5] == Py_True;
  layer.x = THPVariable_Unpack(x_obj);
  layer.weight = THPVariable_Unpack(weight_obj);
  layer.mask_logits = THPVariable_Unpack(mask_logits_obj);
  const at::Tensor &x = layer.x, &weight = layer.weight, &mask_logits = layer.mask_logits;
  const ScalarType weight_type = weight.scalar_type();
  const bool fp64 = weight_type == ScalarType::Double;
  if (weight.dim() != weight_dim || !x_fits(x, weight) || weight.sizes() != mask_logits.sizes() ||
      !is_gate_dtype(weight_type) || mask_logits.scalar_type() != (fp64 ? ScalarType::Double : ScalarType::Float)) {
    return std::nullopt;
  }
  const at::Device device = weight.device();
  if (!(device.is_cpu() || device.is_cuda()) || mask_logits.device() != device || x.device() != device) {
    return std::nullopt;
  }
  if (bias_obj != Py_None) {
    layer.bias = THPVariable_Unpack(bias_obj);
    if (layer.bias->device() != device) return std::nullopt;
  }
  if (!fp64 && at::autocast::is_autocast_enabled(device.type())) {
    layer.dtype = at::autocast::get_autocast_dtype(device.type());
    const ScalarType x_type = x.scalar_type();
    if (x_type != layer.dtype && x.is_floating_point() && x_type != ScalarType::Double) {
      if (cast_x) layer.x = cast_input(x, layer.dtype);
      return layer;
    }
  } else {
    layer.dtype = weight_type;
    if (layer.bias && layer.bias->scalar_type() != layer.dtype) return std::nullopt;
  }
  if (layer.x.scalar_type() != layer.dtype) return std::nullopt;
  return layer;
}

// The op runs without the GIL, as ATen's own Python bindings run theirs.
struct ReleaseGil {
  PyThreadState* state = PyEval_SaveThread();
  ~ReleaseGil() { PyEval_RestoreThread(state); }
};

bool wrong_count(const char* name, Py_ssize_t nargs, Py_ssize_t expected) {
  if (nargs == expected) return false;
  PyErr_Format(PyExc_TypeError, "csext._C.%s takes %zd arguments, got %zd", name, expected, nargs);
  return true;
}

bool linear_fits(const at::Tensor& x, const at::Tensor& weight) {
  return x.dim() >= 1 && x.size(-1) == weight.size(1);
}

// gated_linear(x, weight, mask_logits, beta, bias, hard, penalty) -> Tensor or None
PyObject* gated_linear(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (wrong_count("gated_linear", nargs, 7)) return nullptr;
  std::optional<Layer> layer = take_layer(args, 2, linear_fits);
  if (!layer) Py_RETURN_NONE;
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("csext::gated_linear", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, bool, double, std::optional<ScalarType>)>();
  at::Tensor out;
  {
    ReleaseGil no_gil;
    out = op.call(layer->x, layer->weight, layer->mask_logits, beta_tensor(layer->beta), layer->bias,
                  layer->hard, layer->penalty, layer->dtype);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

// linear_input(x, weight, mask_logits, beta, bias, hard, penalty) -> (x, dtype) or None: the
// checks of gated_linear alone, for the triton backend's layer (Python): x as given, not cast
// under autocast (its kernels cast it), and the dtype its GEMMs run in.
PyObject* linear_input(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (wrong_count("linear_input", nargs, 7)) return nullptr;
  std::optional<Layer> layer = take_layer(args, 2, linear_fits, /*cast_x=*/false);
  if (!layer) Py_RETURN_NONE;
  PyObject* dtype = reinterpret_cast<PyObject*>(torch::getTHPDtype(layer->dtype));  // borrowed
  return PyTuple_Pack(2, args[0], dtype);  // x's own Python object, as x came in
  END_HANDLE_TH_ERRORS
}

struct Conv {
  std::array<int64_t, 2> stride{}, padding{}, dilation{};
  int64_t groups = 0;
};

// args: those of take_layer, then stride, padding, dilation, groups; x batched (N, C, H, W),
// padding numeric.
std::optional<Layer> take_conv(PyObject* const* args, Conv& conv) {
  if (!read_pair(args[7], conv.stride) || !read_pair(args[8], conv.padding) ||
      !read_pair(args[9], conv.dilation) || !read_int(args[10], conv.groups) || conv.groups < 1) {
    return std::nullopt;
  }
  auto fits = [](const at::Tensor& x, const at::Tensor&) { return x.dim() == 4; };  // channels: below
  std::optional<Layer> layer = take_layer(args, 4, fits);
  if (!layer || layer->x.size(1) != layer->weight.size(1) * conv.groups) return std::nullopt;
  return layer;
}

// gated_conv2d(x, weight, mask_logits, beta, bias, hard, penalty, stride, padding, dilation,
// groups) -> Tensor or None
PyObject* gated_conv2d(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (wrong_count("gated_conv2d", nargs, 11)) return nullptr;
  Conv conv;
  std::optional<Layer> layer = take_conv(args, conv);
  if (!layer) Py_RETURN_NONE;
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("csext::gated_conv2d", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef,
                            at::IntArrayRef, int64_t, bool, double, std::optional<ScalarType>)>();
  at::Tensor out;
  {
    ReleaseGil no_gil;
    out = op.call(layer->x, layer->weight, layer->mask_logits, beta_tensor(layer->beta), layer->bias,
                  conv.stride, conv.padding, conv.dilation, conv.groups, layer->hard, layer->penalty,
                  layer->dtype);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

// conv2d_input(the arguments of gated_conv2d) -> Tensor or None: its checks alone, for the
// triton backend's convolution (Python), as linear_input.
PyObject* conv2d_input(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (wrong_count("conv2d_input", nargs, 11)) return nullptr;
  Conv conv;
  std::optional<Layer> layer = take_conv(args, conv);
  if (!layer) Py_RETURN_NONE;
  return THPVariable_Wrap(std::move(layer->x));
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"gated_linear", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&gated_linear)),
     METH_FASTCALL, "Eager fast path of csext.functional.gated_linear: a tensor, or None to take the Python path."},
    {"gated_conv2d", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&gated_conv2d)),
     METH_FASTCALL, "Eager fast path of csext.functional.gated_conv2d: a tensor, or None to take the Python path."},
    {"linear_input", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&linear_input)),
     METH_FASTCALL, "csext.functional.gated_linear's checks: (x, compute dtype), or None to take the Python path."},
    {"conv2d_input", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&conv2d_input)),
     METH_FASTCALL, "csext.functional.gated_conv2d's checks: x (cast under autocast), or None to take the Python path."},
    {"autocast_input", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&autocast_input)),
     METH_FASTCALL, "x cast to the autocast dtype, its gradient widened back by csext::cast (input_cast.cpp)."},
    {"triton_gate_node", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&triton_gate_node)),
     METH_FASTCALL, "The triton gate's output, made that of its autograd node where a gradient is needed."},
    {"triton_linear_node", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&triton_linear_node)),
     METH_FASTCALL, "The triton fused linear layer's output, made that of its autograd node where a gradient is needed."},
    {"set_triton_backwards", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&set_triton_backwards)),
     METH_FASTCALL, "Sets the Python backwards that the triton nodes call: the gate's, the linear layer's."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace
}  // namespace csext

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, csext::methods};
  return PyModule_Create(&module_def);
}

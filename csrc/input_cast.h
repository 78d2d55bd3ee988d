// A gated layer's autocast cast of its input, with a node of csext's (input_cast.cpp).
#pragma once

#include <Python.h>

#include <ATen/ATen.h>

namespace csext {

// x in `dtype`, as autocast casts a layer's input (x.to(dtype)); where x takes a gradient, the
// output's node is csext::InputCastBackward, whose backward widens the gradient through
// csext::cast instead of ATen's copy. x itself where it is in `dtype` already.
at::Tensor cast_input(const at::Tensor& x, at::ScalarType dtype);

// autocast_input(x, dtype) -> cast_input(x, dtype), for csext.functional (the triton backend's
// linear layer above TRITON_FUSED_MAX_ROWS); x.to(dtype) for a tensor subclass or under a
// __torch_function__ mode.
PyObject* autocast_input(PyObject* module, PyObject* const* args, Py_ssize_t nargs);

}  // namespace csext

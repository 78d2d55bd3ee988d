// csext._C's functions for the triton backend's fused linear layer (triton_node.cpp).
#pragma once

#include <Python.h>

namespace csext {

// set_triton_linear_backward(fn): the Python backward that the layer's nodes call.
PyObject* set_triton_linear_backward(PyObject* module, PyObject* fn);

// triton_linear_node(y, x, weight, mask_logits, beta, bias, hard, penalty) -> y, made the output
// of a TritonGatedLinearBackward node where x, weight, mask_logits or bias takes a gradient.
PyObject* triton_linear_node(PyObject* module, PyObject* const* args, Py_ssize_t nargs);

}  // namespace csext

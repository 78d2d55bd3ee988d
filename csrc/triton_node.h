// csext._C's functions for the triton backend's gate and fused linear layer (triton_node.cpp).
#pragma once

#include <Python.h>

namespace csext {

// set_triton_backwards(gate_backward, linear_backward): the Python backwards the nodes call.
PyObject* set_triton_backwards(PyObject* module, PyObject* const* args, Py_ssize_t nargs);

// triton_gate_node(w_eff, weight, mask_logits, beta, hard, penalty) -> w_eff, made the output of
// a TritonGateBackward node where weight or (soft mask) mask_logits takes a gradient.
PyObject* triton_gate_node(PyObject* module, PyObject* const* args, Py_ssize_t nargs);

// triton_linear_node(y, x, weight, mask_logits, beta, bias, hard, penalty) -> y, likewise with a
// TritonGatedLinearBackward node (edges x, weight, mask_logits, bias).
PyObject* triton_linear_node(PyObject* module, PyObject* const* args, Py_ssize_t nargs);

}  // namespace csext

"""The `triton` backend: the Triton kernels of csext.kernels behind two entry points,
`gate` and `gated_linear`, used by csext.functional. Imported only where Triton can run: on
CUDA tensors, or on the CPU under TRITON_INTERPRET=1.

Each op exists once as a plain function that launches the kernels (`_*_impl`). Under
torch.compile the entry points call them through torch.library custom ops with fake and
autograd registrations (no graph break, opcheck-clean):

    csext::triton_gate, csext::triton_gate_backward   elementwise gate and its backward
    csext::triton_gated_linear                        y = x @ (w * m)^T + b, one fused GEMM
    csext::triton_gated_linear_grad_input             dx = G @ (w * m), fused
    csext::triton_gated_linear_grad_weight            dL/dw, dL/ds from the G^T x epilogue, dL/db

In eager mode they call them through torch.autograd.Function, which costs a fraction of a
custom op's Python dispatch per call (under torch.func's transforms and forward-mode AD,
through twins of those Functions written as the transforms require, with vmap and jvp
rules). Where csext._C is built, the eager gate and fused linear layer go further: their
forward launches its kernel here, and csext._C makes the output that of a C++ node
(csrc/triton_node.cpp) whose backward calls back into this module, with less Python per call
than a Function's. Every route shares one backward (`_gate_grads`, `_linear_grads`), handed
the op set to call; with grad mode on in it (create_graph=True, torch.func), or in a
forward-mode dual level, it builds the gradients from csext.reference in torch ops instead,
differentiable again. Under autocast the fused linear takes x uncast, in any float dtype, with
the compute dtype beside it: its GEMMs cast x's tiles, and dL/dx comes back in x's dtype, so
the layer needs no cast of x and no autograd node for one. beta travels as a 0-dim float32
tensor on the tensors' device (see device_beta). The kernels launch through kernels/launch.py's
Launcher, which skips Triton's per-call Python once a call's specialization is compiled.
"""

from types import SimpleNamespace

import torch

from . import _ops, reference
from .kernels import gate as gate_kernels
from .kernels import gated_matmul as matmul_kernels

_C = _ops._C if _ops.extension_loaded() else None
_unwrap_if_dead = torch._C._functorch.unwrap_if_dead


def device_beta(beta: float, device: torch.device) -> torch.Tensor:
    """beta as the kernels read it: a 0-dim float32 tensor on `device` (see _ops.beta_tensor).
    A CUDA graph being captured gets a tensor of its own, filled inside the graph and kept in its
    memory pool: the kernels read beta through a pointer, and a cached tensor could be evicted,
    and its memory reused, while the graph still replays."""
    if device.type == "cuda" and not torch.compiler.is_compiling() and torch.cuda.is_current_stream_capturing():
        return torch.full((), float(beta), dtype=torch.float32, device=device)
    return _ops.beta_tensor(beta, device, torch.float32)


def _precision(dtype: torch.dtype, device: torch.device) -> str:
    """tl.dot's float32 mode, following torch's matmul setting as cuBLAS would."""
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


# --- the ops, as plain functions ---------------------------------------------------------------


def _gate_impl(weight, mask_logits, beta, hard: bool, penalty: float, dtype: torch.dtype):
    layout = _ops._kernel_layout(weight, mask_logits)
    w, s = weight.contiguous(memory_format=layout), mask_logits.contiguous(memory_format=layout)
    out = torch.empty_like(w, dtype=dtype, memory_format=layout)
    gate_kernels.gate_forward(w, s, beta, out, hard)
    return out


def _gate_backward_impl(grad, weight, mask_logits, beta, penalty: float):
    layout = _ops._kernel_layout(grad, weight, mask_logits)
    g, w, s = (t.contiguous(memory_format=layout) for t in (grad, weight, mask_logits))
    grad_weight, grad_mask_logits = torch.empty_like(w), torch.empty_like(s)
    gate_kernels.gate_backward(g, w, s, beta, penalty, grad_weight, grad_mask_logits)
    return grad_weight, grad_mask_logits


def _linear_impl(x, weight, mask_logits, beta, bias, hard: bool, penalty: float, dtype: torch.dtype):
    """x (M, K) -> (M, N) in the compute dtype `dtype`. Under autocast x may have another (float32
    x under bf16): the kernel casts its tiles, in place of autocast's pass over x."""
    out = x.new_empty((x.shape[0], weight.shape[0]), dtype=dtype)
    matmul_kernels.gated_matmul(x, weight, mask_logits, beta, bias, out, hard, _precision(dtype, x.device), dtype)
    return out


def _linear_grad_input_impl(grad, weight, mask_logits, beta, hard: bool, dtype: torch.dtype):
    """dL/dx = G (M, N) @ (w * m) (N, K), computed in G's dtype and stored in x's, `dtype`."""
    out = grad.new_empty((grad.shape[0], weight.shape[1]), dtype=dtype)
    matmul_kernels.gated_matmul(grad, weight, mask_logits, beta, None, out, hard,
                                _precision(grad.dtype, grad.device), grad.dtype, transposed=True)
    return out


def _linear_grad_weight_impl(grad, x, weight, mask_logits, beta, hard: bool, penalty: float, need_mask_grad: bool,
                             need_bias_grad: bool):
    """(dL/dw, dL/ds, dL/db) from G^T @ x, dL/db in float32; dL/ds is empty where it is not needed
    (hard, or no grad), dL/db where need_bias_grad is False."""
    weight, mask_logits = weight.contiguous(), mask_logits.contiguous()
    grad_weight = torch.empty_like(weight)
    need_mask_grad = need_mask_grad and not hard
    grad_mask_logits = torch.empty_like(mask_logits) if need_mask_grad else mask_logits.new_empty(0)
    grad_bias = grad.new_empty(grad.shape[1] if need_bias_grad else 0, dtype=torch.float32)
    matmul_kernels.gated_weight_grad(grad, x, weight, mask_logits, beta, penalty, grad_weight,
                                     grad_mask_logits if need_mask_grad else None,
                                     grad_bias if need_bias_grad else None, hard, _precision(grad.dtype, grad.device))
    return grad_weight, grad_mask_logits, grad_bias


EAGER = SimpleNamespace(gate=_gate_impl, gate_backward=_gate_backward_impl, linear=_linear_impl,
                        linear_grad_input=_linear_grad_input_impl, linear_grad_weight=_linear_grad_weight_impl)


# --- one backward per op, for both routes ---------------------------------------------------------


def _differentiable_backward() -> bool:
    """The backward builds a graph (create_graph=True, torch.func), or runs in a forward-mode AD
    dual level, where its gradients must carry their tangents (forward over reverse)."""
    return torch.is_grad_enabled() or reference.transforms_active()


def _gate_grads(ops, grad, weight, mask_logits, beta, hard: bool, penalty: float, needs):
    """(dL/dw, dL/ds) of the gate, None where `needs` (w, s) wants none; s gets none under the
    hard mask."""
    need_w, need_s = needs
    if _differentiable_backward():
        grad_weight, grad_mask_logits = reference.gate_grads(grad, weight, mask_logits, beta, hard, penalty)
        return grad_weight if need_w else None, grad_mask_logits if need_s else None
    if hard or not need_s:
        # dL/dw = G * m is the forward with G in place of w; s gets no gradient.
        return (ops.gate(grad, mask_logits, beta, hard, 0.0, weight.dtype) if need_w else None), None
    return ops.gate_backward(grad, weight, mask_logits, beta, penalty)


def _gate_backward(ops, ctx, grad):
    """_gate_grads, as the Functions and the custom op return them."""
    weight, mask_logits, beta = ctx.saved_tensors
    grad_weight, grad_mask_logits = _gate_grads(ops, grad, weight, mask_logits, beta, ctx.hard, ctx.penalty,
                                                ctx.needs_input_grad[:2])
    return grad_weight, grad_mask_logits, None, None, None, None


def _gate_node_backward(compiled, grad, weight, mask_logits, beta, hard, penalty, needs):
    """The backward of csext._C's node for the gate (eager route), through the custom ops where
    compiled autograd traces it."""
    return _gate_grads(COMPILED if compiled else _ops_now(), grad, weight, mask_logits, beta, hard, penalty, needs)


def _linear_grads(ops, grad, x, weight, mask_logits, beta, hard: bool, penalty: float, bias_dtype, needs):
    """(dL/dx, dL/dw, dL/ds, dL/db) of the fused layer, each None where `needs` (x, w, s, bias)
    wants none; s gets none under the hard mask."""
    if _differentiable_backward():
        return _linear_grads_with_graph(grad, x, weight, mask_logits, beta, hard, penalty, bias_dtype, needs)
    need_x, need_w, need_s, need_b = needs
    grad_x = grad_weight = grad_mask_logits = grad_bias = None
    if need_x:
        grad_x = ops.linear_grad_input(grad, weight, mask_logits, beta, hard, x.dtype)
    if need_w or (need_s and not hard):  # dL/db beside them, from the G tiles the GEMM loads
        grad_weight, grad_mask_logits, grad_bias = ops.linear_grad_weight(
            grad, x, weight, mask_logits, beta, hard, penalty, bool(need_s), bool(need_b))
        grad_weight = grad_weight if need_w else None
        grad_mask_logits = grad_mask_logits if need_s and not hard else None
    elif need_b:
        grad_bias = grad.sum(0, dtype=torch.float32)
    if not need_b:
        grad_bias = None
    elif grad_bias.dtype != bias_dtype:  # summed in float32
        grad_bias = grad_bias.to(bias_dtype)
    return grad_x, grad_weight, grad_mask_logits, grad_bias


def _linear_backward(ops, ctx, grad):
    """_linear_grads, as the Functions and the custom op return them."""
    x, weight, mask_logits, beta = ctx.saved_tensors
    need_x, need_w, need_s, _, need_b = ctx.needs_input_grad[:5]
    grad_x, grad_weight, grad_mask_logits, grad_bias = _linear_grads(
        ops, grad, x, weight, mask_logits, beta, ctx.hard, ctx.penalty, ctx.bias_dtype, (need_x, need_w, need_s, need_b))
    return grad_x, grad_weight, grad_mask_logits, None, grad_bias, None, None, None


def _linear_node_backward(compiled, grad, x, weight, mask_logits, beta, hard, penalty, bias_dtype, needs):
    """The backward of csext._C's node for the layer (eager route), through the custom ops where
    compiled autograd traces it."""
    return _linear_grads(COMPILED if compiled else _ops_now(), grad, x, weight, mask_logits, beta, hard, penalty,
                         bias_dtype, needs)


# With grad mode on in a backward (create_graph=True: a loss on gradients, a Hessian-vector
# product; and torch.func's grad), or in a forward-mode dual level, the kernels' gradients would
# have no history and no tangents: _gate_grads and this build them from csext.reference with
# torch ops instead, differentiable again.
# torch.compile traces the kernel backwards (grad mode is off there).


def _linear_grads_with_graph(grad, x, weight, mask_logits, beta, hard, penalty, bias_dtype, needs):
    """The fused layer's gradients as those of the reference gate then the matmul. dL/dx takes a
    gate without penalty: a loss on dL/dx that passes back through this layer's own node has lam
    added there, once, as on the torch backend."""
    need_x, need_w, need_s, need_b = needs
    grad_x = grad_weight = grad_mask_logits = grad_bias = None
    if need_x:
        grad_x = grad.matmul(reference.gate(weight, mask_logits, beta, hard, 0.0, grad.dtype)).to(x.dtype)
    if need_w or need_s:
        grad_weight, grad_mask_logits = reference.gate_grads(
            grad.t().matmul(x.to(grad.dtype)), weight, mask_logits, beta, hard, penalty)
        grad_weight, grad_mask_logits = grad_weight if need_w else None, grad_mask_logits if need_s else None
    if need_b:
        grad_bias = grad.sum(0, dtype=torch.float32).to(bias_dtype)
    return grad_x, grad_weight, grad_mask_logits, grad_bias


def _gate_setup(ctx, inputs, output):
    weight, mask_logits, beta, hard, penalty, _ = inputs
    ctx.save_for_backward(weight, mask_logits, beta)
    ctx.hard, ctx.penalty = hard, penalty


def _linear_setup(ctx, inputs, output):
    x, weight, mask_logits, beta, bias, hard, penalty, _ = inputs
    ctx.save_for_backward(x, weight, mask_logits, beta)
    ctx.hard, ctx.penalty = hard, penalty
    ctx.bias_dtype = bias.dtype if bias is not None else None


# --- eager route: autograd.Function ---------------------------------------------------------------


def _ops_now():
    """The op set for a backward: the custom ops where Dynamo traces it (compiled autograd),
    which it cannot do through the Launcher's raw launches."""
    return COMPILED if torch.compiler.is_compiling() else EAGER


class _GateFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        _gate_setup(ctx, inputs, None)
        return _gate_impl(*inputs)

    @staticmethod
    def backward(ctx, grad):
        return _gate_backward(_ops_now(), ctx, grad)


class _LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        _linear_setup(ctx, inputs, None)
        return _linear_impl(*inputs)

    @staticmethod
    def backward(ctx, grad):
        return _linear_backward(_ops_now(), ctx, grad)


# The same two for torch.func's transforms (grad, jacrev, vmap, jvp) and forward-mode AD:
# forward and setup_context apart, as they require, a vmap rule and a jvp. Not the eager
# default: Function.apply then binds the arguments with inspect.signature on every call, 40 us
# more per forward+backward on the CI machine.


# The jvp rules write the tangents in torch ops (csext.reference), as the backward does with grad
# mode on: the transforms around a jvp rule (jacfwd's vmap, hessian's grad) batch and
# differentiate what it calls, which Triton's launches cannot take.


def _gate_tangent(weight, mask_logits, beta, hard: bool, dtype: torch.dtype, weight_t, mask_logits_t):
    """The tangent of w_eff = w * m, w_t * m + w * m'(s) * s_t (the hard mask is flat: s_t adds
    nothing), in `dtype`; None where neither w nor s has a tangent."""
    tangent = None
    if weight_t is not None:
        tangent = reference.gate(weight_t, mask_logits, beta, hard, 0.0, dtype)
    if mask_logits_t is not None and not hard:
        # dL/ds of the gate with s_t in place of dL/dw_eff is w * m'(s) * s_t
        term = reference.gate_grads(mask_logits_t, weight, mask_logits, beta)[1].to(dtype)
        tangent = term if tangent is None else tangent + term
    return tangent


def _gate_setup_for_transforms(ctx, inputs, output):
    _gate_setup(ctx, inputs, output)
    ctx.save_for_forward(*inputs[:3])
    ctx.dtype = inputs[5]


def _linear_setup_for_transforms(ctx, inputs, output):
    _linear_setup(ctx, inputs, output)
    ctx.save_for_forward(*inputs[:4])
    ctx.dtype = inputs[7]


def _batch_first(t, dim, size):
    """t with its vmapped dimension first or, not batched, expanded along a new first one."""
    return t.movedim(dim, 0) if dim is not None else t.expand(size, *t.shape)


class _GateFunctionForTransforms(_GateFunction):
    forward = staticmethod(_gate_impl)
    setup_context = staticmethod(_gate_setup_for_transforms)

    @staticmethod
    def jvp(ctx, weight_t, mask_logits_t, *_):
        weight, mask_logits, beta = ctx.saved_tensors
        tangent = _gate_tangent(weight, mask_logits, beta, ctx.hard, ctx.dtype, weight_t, mask_logits_t)
        return tangent if tangent is not None else torch.zeros_like(weight, dtype=ctx.dtype)

    @staticmethod
    def vmap(info, in_dims, weight, mask_logits, beta, hard, penalty, dtype):
        if in_dims[2] is not None:
            raise ValueError("csext: the triton gate cannot be vmapped over beta")
        # elementwise: the gate of a batch is the batch of gates
        weight, mask_logits = (_batch_first(t, d, info.batch_size) for t, d in zip((weight, mask_logits), in_dims))
        return _GateFunctionForTransforms.apply(weight, mask_logits, beta, hard, penalty, dtype), 0


class _LinearFunctionForTransforms(_LinearFunction):
    forward = staticmethod(_linear_impl)
    setup_context = staticmethod(_linear_setup_for_transforms)

    @staticmethod
    def jvp(ctx, x_t, weight_t, mask_logits_t, beta_t, bias_t, *_):
        """x_t (w * m)^T + x w_eff_t^T + b_t, in the compute dtype."""
        x, weight, mask_logits, beta = ctx.saved_tensors
        dtype = ctx.dtype
        tangent = torch.zeros((x.shape[0], weight.shape[0]), dtype=dtype, device=x.device)
        if x_t is not None:
            tangent = tangent + x_t.to(dtype) @ reference.gate(weight, mask_logits, beta, ctx.hard, 0.0, dtype).t()
        w_eff_t = _gate_tangent(weight, mask_logits, beta, ctx.hard, dtype, weight_t, mask_logits_t)
        if w_eff_t is not None:
            tangent = tangent + x.to(dtype) @ w_eff_t.t()
        if bias_t is not None:
            tangent = tangent + bias_t.to(dtype)
        return tangent

    @staticmethod
    def vmap(info, in_dims, x, weight, mask_logits, beta, bias, hard, penalty, dtype):
        if in_dims[3] is not None:
            raise ValueError("csext: the triton gated_linear cannot be vmapped over beta")
        n = info.batch_size
        if all(d is None for d in in_dims[1:5]):  # only x: its batch is more rows
            x = x.movedim(in_dims[0], 0)
            y = _LinearFunctionForTransforms.apply(x.flatten(0, 1), weight, mask_logits, beta, bias, hard, penalty,
                                                   dtype)
            return y.unflatten(0, x.shape[:2]), 0
        # weights, mask logits or biases batched: one layer per sample
        x, weight, mask_logits = (_batch_first(t, d, n) for t, d in zip((x, weight, mask_logits), in_dims))
        biases = [None] * n if bias is None else _batch_first(bias, in_dims[4], n)
        return torch.stack([_LinearFunctionForTransforms.apply(x[i], weight[i], mask_logits[i], beta, biases[i],
                                                               hard, penalty, dtype) for i in range(n)]), 0


# --- compiled route: torch.library custom ops -----------------------------------------------------


@torch.library.custom_op("csext::triton_gate", mutates_args=())
def triton_gate(weight: torch.Tensor, mask_logits: torch.Tensor, beta: torch.Tensor, hard: bool,
                penalty: float, dtype: torch.dtype) -> torch.Tensor:
    return _gate_impl(weight, mask_logits, beta, hard, penalty, dtype)


@triton_gate.register_fake
def _(weight, mask_logits, beta, hard, penalty, dtype):
    return torch.empty_like(weight, dtype=dtype, memory_format=_ops._kernel_layout(weight, mask_logits))


@torch.library.custom_op("csext::triton_gate_backward", mutates_args=())
def triton_gate_backward(grad: torch.Tensor, weight: torch.Tensor, mask_logits: torch.Tensor,
                         beta: torch.Tensor, penalty: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _gate_backward_impl(grad, weight, mask_logits, beta, penalty)


@triton_gate_backward.register_fake
def _(grad, weight, mask_logits, beta, penalty):
    layout = _ops._kernel_layout(grad, weight, mask_logits)
    return torch.empty_like(weight, memory_format=layout), torch.empty_like(mask_logits, memory_format=layout)


@torch.library.custom_op("csext::triton_gated_linear", mutates_args=())
def triton_gated_linear(x: torch.Tensor, weight: torch.Tensor, mask_logits: torch.Tensor, beta: torch.Tensor,
                        bias: torch.Tensor | None, hard: bool, penalty: float, dtype: torch.dtype) -> torch.Tensor:
    return _linear_impl(x, weight, mask_logits, beta, bias, hard, penalty, dtype)


@triton_gated_linear.register_fake
def _(x, weight, mask_logits, beta, bias, hard, penalty, dtype):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=dtype)


@torch.library.custom_op("csext::triton_gated_linear_grad_input", mutates_args=())
def triton_gated_linear_grad_input(grad: torch.Tensor, weight: torch.Tensor, mask_logits: torch.Tensor,
                                   beta: torch.Tensor, hard: bool, dtype: torch.dtype) -> torch.Tensor:
    return _linear_grad_input_impl(grad, weight, mask_logits, beta, hard, dtype)


@triton_gated_linear_grad_input.register_fake
def _(grad, weight, mask_logits, beta, hard, dtype):
    return grad.new_empty((grad.shape[0], weight.shape[1]), dtype=dtype)


@torch.library.custom_op("csext::triton_gated_linear_grad_weight", mutates_args=())
def triton_gated_linear_grad_weight(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                    mask_logits: torch.Tensor, beta: torch.Tensor, hard: bool, penalty: float,
                                    need_mask_grad: bool, need_bias_grad: bool
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _linear_grad_weight_impl(grad, x, weight, mask_logits, beta, hard, penalty, need_mask_grad, need_bias_grad)


@triton_gated_linear_grad_weight.register_fake
def _(grad, x, weight, mask_logits, beta, hard, penalty, need_mask_grad, need_bias_grad):
    grad_mask_logits = torch.empty_like(mask_logits) if need_mask_grad and not hard else mask_logits.new_empty(0)
    grad_bias = grad.new_empty(grad.shape[1] if need_bias_grad else 0, dtype=torch.float32)
    return torch.empty_like(weight, memory_format=torch.contiguous_format), grad_mask_logits, grad_bias


COMPILED = SimpleNamespace(gate=triton_gate, gate_backward=triton_gate_backward, linear=triton_gated_linear,
                           linear_grad_input=triton_gated_linear_grad_input,
                           linear_grad_weight=triton_gated_linear_grad_weight)

triton_gate.register_autograd(lambda ctx, grad: _gate_backward(COMPILED, ctx, grad), setup_context=_gate_setup)
triton_gated_linear.register_autograd(lambda ctx, grad: _linear_backward(COMPILED, ctx, grad),
                                      setup_context=_linear_setup)
if _C is not None:
    _C.set_triton_backwards(_gate_node_backward, _linear_node_backward)


# --- entry points ---------------------------------------------------------------------------------


def _traced() -> bool:
    """Whether a graph is being built of the call: by Dynamo, or by torch.jit.trace (which records
    ops, not the eager route's raw launches). Either gets the custom ops."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def gate(weight, mask_logits, beta, hard: bool, penalty: float, dtype: torch.dtype):
    """w * m in `dtype` (beta a device tensor), differentiable."""
    if _traced():
        return triton_gate(weight, mask_logits, beta, hard, penalty, dtype)
    if reference.transforms_active():  # the C++ nodes define no forward-mode AD
        return _GateFunctionForTransforms.apply(weight, mask_logits, beta, hard, penalty, dtype)
    if _C is None:
        return _GateFunction.apply(weight, mask_logits, beta, hard, penalty, dtype)
    # As _GateFunction, with csext._C's node in place of the Function's (see gated_linear).
    weight, mask_logits = _unwrap_if_dead(weight), _unwrap_if_dead(mask_logits)
    return _C.triton_gate_node(_gate_impl(weight, mask_logits, beta, hard, penalty, dtype), weight, mask_logits, beta,
                               hard, penalty)


def gated_linear(x, weight, mask_logits, beta, bias, hard: bool, penalty: float, dtype: torch.dtype):
    """x (M, K) @ (w * m)^T + bias in the compute dtype `dtype` (beta a device tensor),
    differentiable; x in that dtype or, under autocast, in one autocast would cast to it."""
    if _traced():
        return triton_gated_linear(x, weight, mask_logits, beta, bias, hard, penalty, dtype)
    if reference.transforms_active():  # the C++ nodes define no forward-mode AD
        return _LinearFunctionForTransforms.apply(x, weight, mask_logits, beta, bias, hard, penalty, dtype)
    if _C is None:
        return _LinearFunction.apply(x, weight, mask_logits, beta, bias, hard, penalty, dtype)
    # As _LinearFunction, with csext._C's node in place of the Function's: less Python per call.
    # Tensors left behind by an ended torch.func transform are unwrapped, as Function.apply does
    # (beta is csext's own, never one of them).
    x, weight, mask_logits = _unwrap_if_dead(x), _unwrap_if_dead(weight), _unwrap_if_dead(mask_logits)
    bias = _unwrap_if_dead(bias) if bias is not None else None
    y = _linear_impl(x, weight, mask_logits, beta, bias, hard, penalty, dtype)
    return _C.triton_linear_node(y, x, weight, mask_logits, beta, bias, hard, penalty)

"""The `triton` backend: the Triton kernels of csext.kernels. Imported only where Triton can run:
on CUDA tensors, or on the CPU under TRITON_INTERPRET=1.

    gate     the elementwise gate (kernels/gate.py); convolutions gate their weight with it
    linear   up to FUSED_MAX_ROWS rows of x, fused GEMMs that gate each weight tile as they load
             it (kernels/gated_matmul.py); above, and for one logit per output unit, the
             elementwise gate and ATen's matmul

Each kernel launch is also a torch.library custom op with a fake (shape) kernel, opaque to
torch.compile and torch.export; in eager mode on plain tensors the launch is called directly
(common.plain_eager_call), since a custom op's Python dispatch costs a small layer more host time
than its kernels. Each differentiable op has one setup and one backward, used by its
torch.autograd.Function (setup_context, a vmap rule), the one route of eager mode, torch.compile
(fullgraph), torch.export and torch.func's grad, vjp, jacrev and vmap; they are also the op's
registered autograd, for a graph that holds the op itself (torch.jit.trace, an exported program).
There is no forward-mode AD (torch.func.jvp, jacfwd, hessian): Dynamo cannot trace a Function
that defines one. Where the backward itself must be differentiable (create_graph=True,
torch.func), it is written in torch ops (csext.reference) instead of the kernels, whose outputs
have no history.
"""

import math

import torch
import torch.nn.functional as F

from .. import reference
from ..kernels import gate as gate_kernels
from ..kernels import gated_matmul as matmul_kernels
from .common import beta_tensor, kernel_layout, plain_eager_call


# Up to this many rows of x a gated linear layer runs as fused GEMMs; above, the elementwise
# kernel writes the gated weight once and ATen runs the GEMMs, since the fused GEMMs gate each
# weight tile once per tile of rows (bench/README.md).
FUSED_MAX_ROWS = 1024


def device_beta(beta: float, device: torch.device) -> torch.Tensor:
    """beta as the kernels read it: a 0-dim float32 tensor on `device`. A CUDA graph being
    captured gets one of its own, kept in its memory pool: a cached tensor could be evicted, and
    its memory reused, while the graph still replays."""
    if device.type == "cuda" and not torch.compiler.is_compiling() and torch.cuda.is_current_stream_capturing():
        return torch.full((), float(beta), dtype=torch.float32, device=device)
    return beta_tensor(beta, device, torch.float32)


def _precision(dtype: torch.dtype, device: torch.device) -> str:
    """tl.dot's float32 mode, following torch's matmul setting as cuBLAS would."""
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


# --- the kernels' launches, and each as a custom op ---------------------------------------------


def _launch_gate(weight: torch.Tensor, mask_logits: torch.Tensor, beta: torch.Tensor, hard: bool, penalty: float,
                 dtype: torch.dtype) -> torch.Tensor:
    """w * m in `dtype`; `penalty` (lam) is for the backward."""
    layout = kernel_layout(weight, mask_logits)
    w, s = weight.contiguous(memory_format=layout), mask_logits.contiguous(memory_format=layout)
    out = torch.empty_like(w, dtype=dtype, memory_format=layout)
    gate_kernels.gate_forward(w, s, beta, out, hard)
    return out


triton_gate = torch.library.custom_op("csext::triton_gate", _launch_gate, mutates_args=())


@triton_gate.register_fake
def _(weight, mask_logits, beta, hard, penalty, dtype):
    return torch.empty_like(weight, dtype=dtype, memory_format=kernel_layout(weight, mask_logits))


def _launch_gate_backward(grad: torch.Tensor, weight: torch.Tensor, mask_logits: torch.Tensor,
                          beta: torch.Tensor, penalty: float) -> tuple[torch.Tensor, torch.Tensor]:
    layout = kernel_layout(grad, weight, mask_logits)
    g, w, s = (t.contiguous(memory_format=layout) for t in (grad, weight, mask_logits))
    grad_weight, grad_mask_logits = torch.empty_like(w), torch.empty_like(s)
    gate_kernels.gate_backward(g, w, s, beta, penalty, grad_weight, grad_mask_logits)
    return grad_weight, grad_mask_logits


triton_gate_backward = torch.library.custom_op("csext::triton_gate_backward", _launch_gate_backward, mutates_args=())


@triton_gate_backward.register_fake
def _(grad, weight, mask_logits, beta, penalty):
    layout = kernel_layout(grad, weight, mask_logits)
    return torch.empty_like(weight, memory_format=layout), torch.empty_like(mask_logits, memory_format=layout)


def _launch_linear(x: torch.Tensor, weight: torch.Tensor, mask_logits: torch.Tensor, beta: torch.Tensor,
                   bias: torch.Tensor | None, hard: bool, penalty: float, dtype: torch.dtype) -> torch.Tensor:
    """x (M, K) @ (w * m)^T + bias in the compute dtype `dtype`; x may have another float dtype
    (autocast's input): the kernel casts its tiles, in place of a pass over x. `penalty` (lam) is
    for the backward."""
    out = x.new_empty((x.shape[0], weight.shape[0]), dtype=dtype)
    matmul_kernels.gated_matmul(x, weight, mask_logits, beta, bias, out, hard, _precision(dtype, x.device), dtype)
    return out


triton_gated_linear = torch.library.custom_op("csext::triton_gated_linear", _launch_linear, mutates_args=())


@triton_gated_linear.register_fake
def _(x, weight, mask_logits, beta, bias, hard, penalty, dtype):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=dtype)


def _launch_linear_grad_input(grad: torch.Tensor, weight: torch.Tensor, mask_logits: torch.Tensor,
                              beta: torch.Tensor, hard: bool, dtype: torch.dtype) -> torch.Tensor:
    """dL/dx = G (M, N) @ (w * m) (N, K), computed in G's dtype and stored in x's, `dtype`."""
    out = grad.new_empty((grad.shape[0], weight.shape[1]), dtype=dtype)
    matmul_kernels.gated_matmul(grad, weight, mask_logits, beta, None, out, hard,
                                _precision(grad.dtype, grad.device), grad.dtype, transposed=True)
    return out


triton_gated_linear_grad_input = torch.library.custom_op("csext::triton_gated_linear_grad_input",
                                                         _launch_linear_grad_input, mutates_args=())


@triton_gated_linear_grad_input.register_fake
def _(grad, weight, mask_logits, beta, hard, dtype):
    return grad.new_empty((grad.shape[0], weight.shape[1]), dtype=dtype)


def _launch_linear_grad_weight(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask_logits: torch.Tensor,
                               beta: torch.Tensor, hard: bool, penalty: float, need_mask_grad: bool,
                               need_bias_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dL/dw, dL/ds, dL/db) from the epilogue of G^T @ x, dL/db in float32; dL/ds is empty where
    it is not needed (or the mask is hard), dL/db where need_bias_grad is False."""
    weight, mask_logits = weight.contiguous(), mask_logits.contiguous()
    grad_weight = torch.empty_like(weight)
    need_mask_grad = need_mask_grad and not hard
    grad_mask_logits = torch.empty_like(mask_logits) if need_mask_grad else mask_logits.new_empty(0)
    grad_bias = grad.new_empty(grad.shape[1] if need_bias_grad else 0, dtype=torch.float32)
    matmul_kernels.gated_weight_grad(grad, x, weight, mask_logits, beta, penalty, grad_weight,
                                     grad_mask_logits if need_mask_grad else None,
                                     grad_bias if need_bias_grad else None, hard, _precision(grad.dtype, grad.device))
    return grad_weight, grad_mask_logits, grad_bias


triton_gated_linear_grad_weight = torch.library.custom_op("csext::triton_gated_linear_grad_weight",
                                                          _launch_linear_grad_weight, mutates_args=())


@triton_gated_linear_grad_weight.register_fake
def _(grad, x, weight, mask_logits, beta, hard, penalty, need_mask_grad, need_bias_grad):
    grad_mask_logits = torch.empty_like(mask_logits) if need_mask_grad and not hard else mask_logits.new_empty(0)
    grad_bias = grad.new_empty(grad.shape[1] if need_bias_grad else 0, dtype=torch.float32)
    return torch.empty_like(weight, memory_format=torch.contiguous_format), grad_mask_logits, grad_bias


# --- autograd ------------------------------------------------------------------------------------


def _differentiable_backward() -> bool:
    """The backward builds a graph (create_graph=True, torch.func's transforms): its gradients
    must come from torch ops, which record their history, not from the kernels."""
    return torch.is_grad_enabled() or torch._C._are_functorch_transforms_active()


def _batch_first(t, dim, size):
    """t with its vmapped dimension first or, not batched, expanded along a new first one."""
    return t.movedim(dim, 0) if dim is not None else t.expand(size, *t.shape)


# One setup and one backward per op, shared by its autograd.Function (the route of every call)
# and by the op's own autograd registration, which serves graphs that hold the op itself
# (programs of torch.export). Their inputs are the op's: one None per non-tensor input.


def _gate_setup(ctx, inputs, output):
    weight, mask_logits, beta, ctx.hard, ctx.penalty, _ = inputs
    ctx.save_for_backward(weight, mask_logits, beta)


def _gate_backward(ctx, grad):
    weight, mask_logits, beta = ctx.saved_tensors
    need_weight, need_mask_logits = ctx.needs_input_grad[:2]
    grad_weight = grad_mask_logits = None
    if _differentiable_backward():
        grad_weight, grad_mask_logits = reference.gate_grads(grad, weight, mask_logits, beta, ctx.hard, ctx.penalty)
    elif ctx.hard or not need_mask_logits:  # dL/dw = G * m is the forward with G in place of w
        if need_weight:
            gate = _launch_gate if plain_eager_call(grad, mask_logits) else triton_gate
            grad_weight = gate(grad, mask_logits, beta, ctx.hard, 0.0, weight.dtype)
    else:
        gate_backward = _launch_gate_backward if plain_eager_call(grad, weight) else triton_gate_backward
        grad_weight, grad_mask_logits = gate_backward(grad, weight, mask_logits, beta, ctx.penalty)
    return (grad_weight if need_weight else None, grad_mask_logits if need_mask_logits else None,
            None, None, None, None)


def _linear_setup(ctx, inputs, output):
    x, weight, mask_logits, beta, bias, ctx.hard, ctx.penalty, _ = inputs
    ctx.save_for_backward(x, weight, mask_logits, beta)
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _linear_backward(ctx, grad):
    x, weight, mask_logits, beta = ctx.saved_tensors
    need_x, need_w, need_s, _, need_b = ctx.needs_input_grad[:5]
    hard, penalty = ctx.hard, ctx.penalty
    grad_x = grad_weight = grad_mask_logits = grad_bias = None
    if _differentiable_backward():  # the gradients of the reference gate and matmul
        if need_x:  # lam enters once, where the loss reaches the layer's own node again
            grad_x = grad.matmul(reference.gate(weight, mask_logits, beta, hard, 0.0, grad.dtype)).to(x.dtype)
        if need_w or need_s:
            grad_weight, grad_mask_logits = reference.gate_grads(grad.t().matmul(x.to(grad.dtype)), weight,
                                                                 mask_logits, beta, hard, penalty)
        if need_b:
            grad_bias = grad.sum(0, dtype=torch.float32)
    else:
        eager = plain_eager_call(grad, x, weight, mask_logits)
        if need_x:
            grad_input = _launch_linear_grad_input if eager else triton_gated_linear_grad_input
            grad_x = grad_input(grad, weight, mask_logits, beta, hard, x.dtype)
        if need_w or (need_s and not hard):  # dL/db beside them, from the G tiles the GEMM loads
            grad_weights = _launch_linear_grad_weight if eager else triton_gated_linear_grad_weight
            grad_weight, grad_mask_logits, grad_bias = grad_weights(grad, x, weight, mask_logits, beta, hard, penalty,
                                                                    need_s, need_b)
        elif need_b:
            grad_bias = grad.sum(0, dtype=torch.float32)
    if need_b and grad_bias.dtype != ctx.bias_dtype:  # summed in float32
        grad_bias = grad_bias.to(ctx.bias_dtype)
    return (grad_x, grad_weight if need_w else None, grad_mask_logits if need_s and not hard else None, None,
            grad_bias if need_b else None, None, None, None)


triton_gate.register_autograd(_gate_backward, setup_context=_gate_setup)
triton_gated_linear.register_autograd(_linear_backward, setup_context=_linear_setup)


class _Gate(torch.autograd.Function):
    """w * m in `dtype`; the backward adds lam's gradient to that of the mask logits."""

    @staticmethod
    def forward(weight, mask_logits, beta, hard: bool, penalty: float, dtype: torch.dtype):
        gate = _launch_gate if plain_eager_call(weight, mask_logits) else triton_gate
        return gate(weight, mask_logits, beta, hard, penalty, dtype)

    setup_context = staticmethod(_gate_setup)
    backward = staticmethod(_gate_backward)

    @staticmethod
    def vmap(info, in_dims, weight, mask_logits, beta, hard, penalty, dtype):
        if in_dims[2] is not None:
            raise ValueError("csext: the triton gate cannot be vmapped over beta")
        weight, mask_logits = (_batch_first(t, d, info.batch_size) for t, d in zip((weight, mask_logits), in_dims))
        if weight.shape != mask_logits.shape:  # one logit per channel: one call per batch element
            return torch.stack([_Gate.apply(w, s, beta, hard, penalty, dtype)
                                for w, s in zip(weight, mask_logits)]), 0
        # elementwise: the gate of a batch is the batch of gates
        return _Gate.apply(weight, mask_logits, beta, hard, penalty, dtype), 0


class _FusedLinear(torch.autograd.Function):
    """x (M, K) @ (w * m)^T + bias in the compute dtype, by the fused GEMMs; under autocast x
    comes uncast and dL/dx goes back in x's dtype."""

    @staticmethod
    def forward(x, weight, mask_logits, beta, bias, hard: bool, penalty: float, dtype: torch.dtype):
        linear = _launch_linear if plain_eager_call(x, weight, mask_logits, bias) else triton_gated_linear
        return linear(x, weight, mask_logits, beta, bias, hard, penalty, dtype)

    setup_context = staticmethod(_linear_setup)
    backward = staticmethod(_linear_backward)

    @staticmethod
    def vmap(info, in_dims, x, weight, mask_logits, beta, bias, hard, penalty, dtype):
        if in_dims[3] is not None:
            raise ValueError("csext: the triton gated_linear cannot be vmapped over beta")
        n = info.batch_size
        if all(d is None for d in in_dims[1:5]):  # only x: its batch is more rows
            x = x.movedim(in_dims[0], 0)
            y = _FusedLinear.apply(x.flatten(0, 1), weight, mask_logits, beta, bias, hard, penalty, dtype)
            return y.unflatten(0, x.shape[:2]), 0
        # weights, mask logits or biases batched: one layer per sample
        x, weight, mask_logits = (_batch_first(t, d, n) for t, d in zip((x, weight, mask_logits), in_dims))
        biases = [None] * n if bias is None else _batch_first(bias, in_dims[4], n)
        return torch.stack([_FusedLinear.apply(x[i], weight[i], mask_logits[i], beta, biases[i], hard, penalty,
                                               dtype) for i in range(n)]), 0


# --- the backend interface -----------------------------------------------------------------------

WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def gate(weight, mask_logits, beta: float, hard: bool, penalty: float, dtype: torch.dtype) -> torch.Tensor:
    if hard:  # the ticket mask passes s no gradient: no edge to it
        mask_logits = mask_logits.detach()
    apply = triton_gate if torch.jit.is_tracing() else _Gate.apply  # a traced graph holds ops, not Functions
    return apply(weight, mask_logits, device_beta(beta, weight.device), hard, penalty, dtype)


def linear(x, weight, mask_logits, beta: float, bias, hard: bool, penalty: float, dtype: torch.dtype) -> torch.Tensor:
    rows = x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # (-1, K) fails for K = 0
    # A traced or symbolic row count takes the path that suits every size: a branch on it would
    # bake it in, or bound a dynamic batch to FUSED_MAX_ROWS (an error in torch.export).
    # One logit per output unit (channel granularity) takes the unfused path too: the fused GEMMs
    # gate per weight.
    if (torch.jit.is_tracing() or isinstance(rows.shape[0], torch.SymInt) or rows.shape[0] > FUSED_MAX_ROWS
            or mask_logits.shape != weight.shape):
        y = F.linear(rows.to(dtype), gate(weight, mask_logits, beta, hard, penalty, dtype), bias)
    else:
        if hard:
            mask_logits = mask_logits.detach()
        y = _FusedLinear.apply(rows, weight, mask_logits, device_beta(beta, weight.device), bias, hard, penalty,
                               dtype)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])


def conv2d(x, weight, mask_logits, beta: float, bias, stride, padding, dilation, groups: int, hard: bool,
           penalty: float, dtype: torch.dtype) -> torch.Tensor:
    return F.conv2d(x.to(dtype), gate(weight, mask_logits, beta, hard, penalty, dtype), bias, stride, padding,
                    dilation, groups)

"""The `triton` backend: the Triton kernels of csext.kernels behind two entry points,
`gate` and `gated_linear`, used by csext.functional. Imported only where Triton can run: on
CUDA tensors, or on the CPU under TRITON_INTERPRET=1.

Each op exists once as a plain function that launches the kernels (`_*_impl`). Under
torch.compile the entry points call them through torch.library custom ops with fake and
autograd registrations (no graph break, opcheck-clean):

    csext::triton_gate, csext::triton_gate_backward   elementwise gate and its backward
    csext::triton_gated_linear                        y = x @ (w * m)^T + b, one fused GEMM
    csext::triton_gated_linear_grad_input             dx = G @ (w * m), fused
    csext::triton_gated_linear_grad_weight            dL/dw, dL/ds from the G^T x epilogue

In eager mode they call them through torch.autograd.Function, which costs a fraction of a
custom op's Python dispatch per call. Both routes share one backward (`_gate_backward`,
`_linear_backward`), handed the op set to call. beta travels as a 0-dim float32 tensor on the
tensors' device (see device_beta). The kernels launch through kernels/launch.py's Launcher, which
skips Triton's per-call Python once a call's specialization is compiled.
"""

from types import SimpleNamespace

import torch

from . import _ops, reference
from .kernels import gate as gate_kernels
from .kernels import gated_matmul as matmul_kernels

def device_beta(beta: float, device: torch.device) -> torch.Tensor:
    """beta as the kernels read it: a 0-dim float32 tensor on `device` (see _ops.beta_tensor)."""
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


def _linear_impl(x, weight, mask_logits, beta, bias, hard: bool, penalty: float):
    """x (M, K) in the compute dtype -> (M, N) in that dtype."""
    out = x.new_empty((x.shape[0], weight.shape[0]))
    matmul_kernels.gated_matmul(x, weight, mask_logits, beta, bias, out, hard, _precision(x.dtype, x.device))
    return out


def _linear_grad_input_impl(grad, weight, mask_logits, beta, hard: bool):
    """dL/dx = G (M, N) @ (w * m) (N, K), in G's dtype."""
    out = grad.new_empty((grad.shape[0], weight.shape[1]))
    matmul_kernels.gated_matmul(grad, weight.t(), mask_logits.t(), beta, None, out, hard,
                                _precision(grad.dtype, grad.device))
    return out


def _linear_grad_weight_impl(grad, x, weight, mask_logits, beta, hard: bool, penalty: float, need_mask_grad: bool):
    """(dL/dw, dL/ds) from G^T @ x; dL/ds is empty where it is not needed (hard, or no grad)."""
    weight, mask_logits = weight.contiguous(), mask_logits.contiguous()
    grad_weight = torch.empty_like(weight)
    need_mask_grad = need_mask_grad and not hard
    grad_mask_logits = torch.empty_like(mask_logits) if need_mask_grad else mask_logits.new_empty(0)
    matmul_kernels.gated_weight_grad(grad, x, weight, mask_logits, beta, penalty, grad_weight,
                                     grad_mask_logits if need_mask_grad else None, hard,
                                     _precision(grad.dtype, grad.device))
    return grad_weight, grad_mask_logits


EAGER = SimpleNamespace(gate=_gate_impl, gate_backward=_gate_backward_impl, linear=_linear_impl,
                        linear_grad_input=_linear_grad_input_impl, linear_grad_weight=_linear_grad_weight_impl)


# --- one backward per op, for both routes ---------------------------------------------------------


def _gate_backward(ops, ctx, grad):
    weight, mask_logits, beta = ctx.saved_tensors
    if torch.is_grad_enabled():
        return _gate_backward_with_graph(ctx, grad, weight, mask_logits, beta)
    grad_weight = grad_mask_logits = None
    if ctx.hard or not ctx.needs_input_grad[1]:
        # dL/dw = G * m is the forward with G in place of w; s gets no gradient.
        if ctx.needs_input_grad[0]:
            grad_weight = ops.gate(grad, mask_logits, beta, ctx.hard, 0.0, weight.dtype)
    else:
        grad_weight, grad_mask_logits = ops.gate_backward(grad, weight, mask_logits, beta, ctx.penalty)
    return grad_weight, grad_mask_logits, None, None, None, None


def _linear_backward(ops, ctx, grad):
    x, weight, mask_logits, beta = ctx.saved_tensors
    if torch.is_grad_enabled():
        return _linear_backward_with_graph(ctx, grad, x, weight, mask_logits, beta)
    need_x, need_w, need_s, _, need_b = ctx.needs_input_grad[:5]
    grad_x = grad_weight = grad_mask_logits = grad_bias = None
    if need_x:
        grad_x = ops.linear_grad_input(grad, weight, mask_logits, beta, ctx.hard)
    if need_w or (need_s and not ctx.hard):
        grad_weight, grad_mask_logits = ops.linear_grad_weight(
            grad, x, weight, mask_logits, beta, ctx.hard, ctx.penalty, bool(need_s))
        grad_weight = grad_weight if need_w else None
        grad_mask_logits = grad_mask_logits if need_s and not ctx.hard else None
    if need_b:
        grad_bias = grad.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    return grad_x, grad_weight, grad_mask_logits, None, grad_bias, None, None


# create_graph=True (a loss on gradients: a gradient penalty, a Hessian-vector product): the
# kernels' gradients would have no history, so the backwards build them from csext.reference's
# gate with torch ops, as the torch backend does (grad mode is on in such a backward; it is off
# where torch.compile traces one, which keeps the kernels).


def _reference_gate_grads(grad, weight, mask_logits, beta, hard, penalty, need_w, need_s):
    """(dL/dw, dL/ds) from grad = dL/dw_eff through the reference gate, differentiable again;
    None where not needed (and for s under the hard mask)."""
    wanted = [t for t, need in ((weight, need_w), (mask_logits, need_s)) if need]
    if not wanted:
        return None, None
    w_eff = reference.gate(weight, mask_logits, beta, hard, penalty, grad.dtype)
    found = iter(torch.autograd.grad(w_eff, wanted, grad, create_graph=True, allow_unused=True))
    return (next(found) if need_w else None), (next(found) if need_s else None)


def _gate_backward_with_graph(ctx, grad, weight, mask_logits, beta):
    need_w, need_s = ctx.needs_input_grad[:2]
    grads = _reference_gate_grads(grad, weight, mask_logits, beta, ctx.hard, ctx.penalty, need_w, need_s)
    return *grads, None, None, None, None


def _linear_backward_with_graph(ctx, grad, x, weight, mask_logits, beta):
    """The fused layer's gradients as those of the reference gate then the matmul. dL/dx takes a
    gate without penalty: a loss on dL/dx that passes back through this layer's own node has lam
    added there, once, as on the torch backend."""
    need_x, need_w, need_s, _, need_b = ctx.needs_input_grad[:5]
    grad_x = grad_weight = grad_mask_logits = grad_bias = None
    if need_x:
        grad_x = grad.matmul(reference.gate(weight, mask_logits, beta, ctx.hard, 0.0, x.dtype))
    if need_w or need_s:
        grad_weight, grad_mask_logits = _reference_gate_grads(
            grad.t().matmul(x), weight, mask_logits, beta, ctx.hard, ctx.penalty, need_w, need_s)
    if need_b:
        grad_bias = grad.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    return grad_x, grad_weight, grad_mask_logits, None, grad_bias, None, None


def _gate_setup(ctx, inputs, output):
    weight, mask_logits, beta, hard, penalty, _ = inputs
    ctx.save_for_backward(weight, mask_logits, beta)
    ctx.hard, ctx.penalty = hard, penalty


def _linear_setup(ctx, inputs, output):
    x, weight, mask_logits, beta, bias, hard, penalty = inputs
    ctx.save_for_backward(x, weight, mask_logits, beta)
    ctx.hard, ctx.penalty = hard, penalty
    ctx.bias_dtype = bias.dtype if bias is not None else None


# --- eager route: autograd.Function ---------------------------------------------------------------


class _GateFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, mask_logits, beta, hard, penalty, dtype):
        _gate_setup(ctx, (weight, mask_logits, beta, hard, penalty, dtype), None)
        return _gate_impl(weight, mask_logits, beta, hard, penalty, dtype)

    @staticmethod
    def backward(ctx, grad):
        return _gate_backward(EAGER, ctx, grad)


class _LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, mask_logits, beta, bias, hard, penalty):
        _linear_setup(ctx, (x, weight, mask_logits, beta, bias, hard, penalty), None)
        return _linear_impl(x, weight, mask_logits, beta, bias, hard, penalty)

    @staticmethod
    def backward(ctx, grad):
        return _linear_backward(EAGER, ctx, grad)


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
                        bias: torch.Tensor | None, hard: bool, penalty: float) -> torch.Tensor:
    return _linear_impl(x, weight, mask_logits, beta, bias, hard, penalty)


@triton_gated_linear.register_fake
def _(x, weight, mask_logits, beta, bias, hard, penalty):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("csext::triton_gated_linear_grad_input", mutates_args=())
def triton_gated_linear_grad_input(grad: torch.Tensor, weight: torch.Tensor, mask_logits: torch.Tensor,
                                   beta: torch.Tensor, hard: bool) -> torch.Tensor:
    return _linear_grad_input_impl(grad, weight, mask_logits, beta, hard)


@triton_gated_linear_grad_input.register_fake
def _(grad, weight, mask_logits, beta, hard):
    return grad.new_empty((grad.shape[0], weight.shape[1]))


@torch.library.custom_op("csext::triton_gated_linear_grad_weight", mutates_args=())
def triton_gated_linear_grad_weight(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                    mask_logits: torch.Tensor, beta: torch.Tensor, hard: bool, penalty: float,
                                    need_mask_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _linear_grad_weight_impl(grad, x, weight, mask_logits, beta, hard, penalty, need_mask_grad)


@triton_gated_linear_grad_weight.register_fake
def _(grad, x, weight, mask_logits, beta, hard, penalty, need_mask_grad):
    grad_mask_logits = torch.empty_like(mask_logits) if need_mask_grad and not hard else mask_logits.new_empty(0)
    return torch.empty_like(weight, memory_format=torch.contiguous_format), grad_mask_logits


COMPILED = SimpleNamespace(gate=triton_gate, gate_backward=triton_gate_backward, linear=triton_gated_linear,
                           linear_grad_input=triton_gated_linear_grad_input,
                           linear_grad_weight=triton_gated_linear_grad_weight)

triton_gate.register_autograd(lambda ctx, grad: _gate_backward(COMPILED, ctx, grad), setup_context=_gate_setup)
triton_gated_linear.register_autograd(lambda ctx, grad: _linear_backward(COMPILED, ctx, grad),
                                      setup_context=_linear_setup)


# --- entry points ---------------------------------------------------------------------------------


def gate(weight, mask_logits, beta, hard: bool, penalty: float, dtype: torch.dtype):
    """w * m in `dtype` (beta a device tensor), differentiable."""
    if torch.compiler.is_compiling():
        return triton_gate(weight, mask_logits, beta, hard, penalty, dtype)
    return _GateFunction.apply(weight, mask_logits, beta, hard, penalty, dtype)


def gated_linear(x, weight, mask_logits, beta, bias, hard: bool, penalty: float):
    """x (M, K) @ (w * m)^T + bias in x's dtype (beta a device tensor), differentiable."""
    if torch.compiler.is_compiling():
        return triton_gated_linear(x, weight, mask_logits, beta, bias, hard, penalty)
    return _LinearFunction.apply(x, weight, mask_logits, beta, bias, hard, penalty)

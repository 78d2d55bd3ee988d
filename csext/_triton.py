"""The `triton` backend: the Triton kernels of csext.kernels as torch.library custom ops, with
fake (shape) and autograd registrations, so that they compose with torch.compile (no graph
break), opcheck and autocast. Imported by csext.functional only where Triton can run: on CUDA
tensors, or on the CPU under TRITON_INTERPRET=1.

    csext::triton_gate, csext::triton_gate_backward   elementwise gate and its backward
    csext::triton_gated_linear                        y = x @ (w * m)^T + b, one fused GEMM;
                                                      its backward is two more fused GEMMs

beta travels as a 0-dim float32 tensor on the tensors' device (see device_beta).
"""

import torch

from . import _ops
from .kernels import gate as gate_kernels
from .kernels import gated_matmul as matmul_kernels

_device_betas: dict = {}


def device_beta(beta: float, device: torch.device) -> torch.Tensor:
    """beta as the kernels read it: a 0-dim float32 tensor on `device`. Under torch.compile a
    multiply keeps it a graph input (no recompile per value); in eager mode the few values in
    use are cached, so a step costs no extra launch."""
    if torch.compiler.is_compiling():
        return torch.ones((), dtype=torch.float32, device=device) * beta
    key = (device, float(beta))
    tensor = _device_betas.get(key)
    if tensor is None:
        if len(_device_betas) >= 64:
            _device_betas.clear()
        tensor = _device_betas[key] = torch.full((), float(beta), dtype=torch.float32, device=device)
    return tensor


def _precision(dtype: torch.dtype, device: torch.device) -> str:
    """tl.dot's float32 mode, following torch's matmul setting as cuBLAS would."""
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


# --- elementwise gate -------------------------------------------------------------------------


@torch.library.custom_op("csext::triton_gate", mutates_args=())
def triton_gate(weight: torch.Tensor, mask_logits: torch.Tensor, beta: torch.Tensor, hard: bool,
                penalty: float, dtype: torch.dtype) -> torch.Tensor:
    layout = _ops._kernel_layout(weight, mask_logits)
    w, s = weight.contiguous(memory_format=layout), mask_logits.contiguous(memory_format=layout)
    out = torch.empty_like(w, dtype=dtype, memory_format=layout)
    gate_kernels.gate_forward(w, s, beta, out, hard)
    return out


@triton_gate.register_fake
def _(weight, mask_logits, beta, hard, penalty, dtype):
    return torch.empty_like(weight, dtype=dtype, memory_format=_ops._kernel_layout(weight, mask_logits))


@torch.library.custom_op("csext::triton_gate_backward", mutates_args=())
def triton_gate_backward(grad: torch.Tensor, weight: torch.Tensor, mask_logits: torch.Tensor,
                         beta: torch.Tensor, penalty: float) -> tuple[torch.Tensor, torch.Tensor]:
    layout = _ops._kernel_layout(grad, weight, mask_logits)
    g, w, s = (t.contiguous(memory_format=layout) for t in (grad, weight, mask_logits))
    grad_weight, grad_mask_logits = torch.empty_like(w), torch.empty_like(s)
    gate_kernels.gate_backward(g, w, s, beta, penalty, grad_weight, grad_mask_logits)
    return grad_weight, grad_mask_logits


@triton_gate_backward.register_fake
def _(grad, weight, mask_logits, beta, penalty):
    layout = _ops._kernel_layout(grad, weight, mask_logits)
    return torch.empty_like(weight, memory_format=layout), torch.empty_like(mask_logits, memory_format=layout)


def _gate_setup(ctx, inputs, output):
    weight, mask_logits, beta, hard, penalty, _ = inputs
    ctx.save_for_backward(weight, mask_logits, beta)
    ctx.hard, ctx.penalty = hard, penalty


def _gate_backward(ctx, grad):
    weight, mask_logits, beta = ctx.saved_tensors
    grad_weight = grad_mask_logits = None
    if ctx.hard or not ctx.needs_input_grad[1]:
        # dL/dw = G * m is the forward with G in place of w; s gets no gradient.
        if ctx.needs_input_grad[0]:
            grad_weight = triton_gate(grad, mask_logits, beta, ctx.hard, 0.0, weight.dtype)
    else:
        grad_weight, grad_mask_logits = triton_gate_backward(grad, weight, mask_logits, beta, ctx.penalty)
    return grad_weight, grad_mask_logits, None, None, None, None


triton_gate.register_autograd(_gate_backward, setup_context=_gate_setup)


# --- fused gated linear -----------------------------------------------------------------------


@torch.library.custom_op("csext::triton_gated_linear", mutates_args=())
def triton_gated_linear(x: torch.Tensor, weight: torch.Tensor, mask_logits: torch.Tensor, beta: torch.Tensor,
                        bias: torch.Tensor | None, hard: bool, penalty: float) -> torch.Tensor:
    """x (M, K) in the compute dtype -> (M, N) in that dtype."""
    out = x.new_empty((x.shape[0], weight.shape[0]))
    matmul_kernels.gated_matmul(x, weight, mask_logits, beta, bias, out, hard, _precision(x.dtype, x.device))
    return out


@triton_gated_linear.register_fake
def _(x, weight, mask_logits, beta, bias, hard, penalty):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("csext::triton_gated_linear_grad_input", mutates_args=())
def triton_gated_linear_grad_input(grad: torch.Tensor, weight: torch.Tensor, mask_logits: torch.Tensor,
                                   beta: torch.Tensor, hard: bool) -> torch.Tensor:
    """dL/dx = G (M, N) @ (w * m) (N, K), in G's dtype."""
    out = grad.new_empty((grad.shape[0], weight.shape[1]))
    matmul_kernels.gated_matmul(grad, weight.t(), mask_logits.t(), beta, None, out, hard,
                                _precision(grad.dtype, grad.device))
    return out


@triton_gated_linear_grad_input.register_fake
def _(grad, weight, mask_logits, beta, hard):
    return grad.new_empty((grad.shape[0], weight.shape[1]))


@torch.library.custom_op("csext::triton_gated_linear_grad_weight", mutates_args=())
def triton_gated_linear_grad_weight(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                    mask_logits: torch.Tensor, beta: torch.Tensor, hard: bool, penalty: float,
                                    need_mask_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dw, dL/ds) from G^T @ x; dL/ds is empty where it is not needed (hard, or no grad)."""
    weight, mask_logits = weight.contiguous(), mask_logits.contiguous()
    grad_weight = torch.empty_like(weight)
    need_mask_grad = need_mask_grad and not hard
    grad_mask_logits = torch.empty_like(mask_logits) if need_mask_grad else mask_logits.new_empty(0)
    matmul_kernels.gated_weight_grad(grad, x, weight, mask_logits, beta, penalty, grad_weight,
                                     grad_mask_logits if need_mask_grad else None, hard,
                                     _precision(grad.dtype, grad.device))
    return grad_weight, grad_mask_logits


@triton_gated_linear_grad_weight.register_fake
def _(grad, x, weight, mask_logits, beta, hard, penalty, need_mask_grad):
    grad_mask_logits = torch.empty_like(mask_logits) if need_mask_grad and not hard else mask_logits.new_empty(0)
    return torch.empty_like(weight, memory_format=torch.contiguous_format), grad_mask_logits


def _linear_setup(ctx, inputs, output):
    x, weight, mask_logits, beta, bias, hard, penalty = inputs
    ctx.save_for_backward(x, weight, mask_logits, beta)
    ctx.hard, ctx.penalty, ctx.has_bias = hard, penalty, bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _linear_backward(ctx, grad):
    x, weight, mask_logits, beta = ctx.saved_tensors
    need_x, need_w, need_s, _, need_b = ctx.needs_input_grad[:5]
    grad_x = grad_weight = grad_mask_logits = grad_bias = None
    if need_x:
        grad_x = triton_gated_linear_grad_input(grad, weight, mask_logits, beta, ctx.hard)
    if need_w or (need_s and not ctx.hard):
        grad_weight, grad_mask_logits = triton_gated_linear_grad_weight(
            grad, x, weight, mask_logits, beta, ctx.hard, ctx.penalty, bool(need_s))
        grad_weight = grad_weight if need_w else None
        grad_mask_logits = grad_mask_logits if need_s and not ctx.hard else None
    if need_b:
        grad_bias = grad.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    return grad_x, grad_weight, grad_mask_logits, None, grad_bias, None, None


triton_gated_linear.register_autograd(_linear_backward, setup_context=_linear_setup)

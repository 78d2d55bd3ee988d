"""The `torch` backend: the math of Continuous Sparsification in plain PyTorch, and the oracle of
every other backend (docs/contract.md).

    soft mask      m = sigmoid(beta * s)          hard mask  m = 1[s > 0]  (no gradient to s)
    gate           w_eff = w * m, computed in the wider of w's and m's dtype, cast to `dtype`
    penalty        P = sum(sigmoid(beta * s)); with `penalty=lam` the gate's backward adds
                   lam * dP/ds, so the task loss alone gives the gradients of task_loss + lam * P
    backward       dL/dw = G * m,  dL/ds = beta * m * (1 - m) * (G * w + lam)  (G = dL/dw_eff;
                   `gate_grads`, what autograd derives from `gate`, in differentiable torch ops)

Channel granularity is the same math with s broadcast: s has w's dimensions with size 1 on all
but the output one (one logit per output unit), m is expanded to w's shape before anything else,
so P counts a channel's gate once per weight it covers and dL/ds of a channel is the sum of the
per-weight terms over its weights.
"""

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad as _forward_ad

WEIGHT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def soft_mask(mask_logits: torch.Tensor, beta: float) -> torch.Tensor:
    return torch.sigmoid(beta * mask_logits)


def hard_mask(mask_logits: torch.Tensor) -> torch.Tensor:
    s = mask_logits.detach()
    kept = (s > 0).to(s.dtype)
    return torch.where(torch.isnan(s), s, kept)  # NaN stays NaN rather than reading as pruned


def mask(mask_logits: torch.Tensor, beta: float, hard: bool = False) -> torch.Tensor:
    return hard_mask(mask_logits) if hard else soft_mask(mask_logits, beta)


def penalty_term(mask_logits: torch.Tensor, beta: float, weights_per_logit: int = 1) -> torch.Tensor:
    """P of one layer: sum(sigmoid(beta * s)), each logit counted once per weight it gates,
    differentiable."""
    term = soft_mask(mask_logits, beta).sum()
    return term if weights_per_logit == 1 else term * weights_per_logit


class _AddPenaltyGradient(torch.autograd.Function):
    """Identity on the soft mask whose backward adds lam: the gradient of lam * sum(m)."""

    @staticmethod
    def forward(ctx, soft: torch.Tensor, penalty: float) -> torch.Tensor:
        ctx.penalty = penalty
        return soft.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad + ctx.penalty, None


class _AddPenaltyGradientForTransforms(_AddPenaltyGradient):
    """The same for torch.func's transforms and forward-mode AD, which want forward and
    setup_context apart, a vmap rule and a jvp. Not the default: Function.apply then binds the
    arguments with inspect.signature on every call, and torch.compile does not trace a custom
    jvp."""

    generate_vmap_rule = True

    @staticmethod
    def forward(soft: torch.Tensor, penalty: float) -> torch.Tensor:
        return soft.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.penalty = inputs[1]

    @staticmethod
    def jvp(ctx, soft_tangent, penalty_tangent):
        return soft_tangent  # lam acts on the backward only


class _AddPenaltyGradientToLogits(torch.autograd.Function):
    """Identity on the mask logits whose backward adds lam * dP/ds = lam * beta * m * (1 - m),
    with beta and lam tensors: the fused penalty under torch.compile (functional.py)."""

    @staticmethod
    def forward(ctx, mask_logits: torch.Tensor, beta: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(mask_logits, beta, penalty)
        return mask_logits.view_as(mask_logits)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        mask_logits, beta, penalty = ctx.saved_tensors
        m = soft_mask(mask_logits, beta)
        return grad + beta * m * (1 - m) * penalty, None, None


def add_penalty_gradient(mask_logits: torch.Tensor, beta, penalty, weights_per_logit: int = 1) -> torch.Tensor:
    """mask_logits, through a node whose backward adds the gradient of penalty * weights_per_logit
    * sum(sigmoid(beta * s)); beta and penalty enter as tensors made by a multiply, so that
    torch.compile keeps them graph inputs rather than constants to recompile for."""
    one = torch.ones((), dtype=mask_logits.dtype, device=mask_logits.device)
    return _AddPenaltyGradientToLogits.apply(mask_logits, one * beta, one * penalty * weights_per_logit)


def transforms_active() -> bool:
    """torch.func's transforms, or a torch.autograd.forward_ad dual level, are on: autograd
    Functions must then be the forms with a jvp (and a vmap rule)."""
    return torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0


def gate(
    weight: torch.Tensor,
    mask_logits: torch.Tensor,
    beta: float,
    hard: bool = False,
    penalty: float = 0.0,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """w_eff = weight * m in `dtype` (default: weight's)."""
    m = mask(mask_logits, beta, hard)
    m = m.expand_as(weight)  # one logit per channel: its gate, once per weight (no comparison: jit.trace)
    if penalty and not hard:
        m = (_AddPenaltyGradientForTransforms if transforms_active() else _AddPenaltyGradient).apply(m, penalty)
    return (weight * m).to(dtype or weight.dtype)


def gate_grads(
    grad: torch.Tensor,
    weight: torch.Tensor,
    mask_logits: torch.Tensor,
    beta: float,
    hard: bool = False,
    penalty: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dL/dw, dL/ds) of `gate` from grad = dL/dw_eff, as autograd derives them, written out so
    that a backward can return them differentiable again (create_graph=True, torch.func) with
    no autograd call of its own; dL/ds is None under the hard mask."""
    m = mask(mask_logits, beta, hard)
    g = grad.to(torch.promote_types(weight.dtype, m.dtype))  # the dtype `gate` multiplies in
    grad_weight = (g * m).to(weight.dtype)
    if hard:
        return grad_weight, None
    grad_mask_logits = beta * m * (1 - m) * (g * weight + penalty)
    grad_mask_logits = grad_mask_logits.sum_to_size(mask_logits.shape)  # a channel's: the sum over its weights
    return grad_weight, grad_mask_logits.to(mask_logits.dtype)


# The backend interface (csext.backends): the gate, then ATen's layer, in the compute dtype.


def linear(x, weight, mask_logits, beta, bias, hard: bool, penalty: float, dtype: torch.dtype) -> torch.Tensor:
    return F.linear(x.to(dtype), gate(weight, mask_logits, beta, hard, penalty, dtype), bias)


def conv2d(x, weight, mask_logits, beta, bias, stride, padding, dilation, groups: int, hard: bool, penalty: float,
           dtype: torch.dtype) -> torch.Tensor:
    return F.conv2d(x.to(dtype), gate(weight, mask_logits, beta, hard, penalty, dtype), bias, stride, padding,
                    dilation, groups)

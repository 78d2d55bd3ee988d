"""The `torch` backend: SPEC section 1 in plain PyTorch, and the oracle of every other backend.

    soft mask      m = sigmoid(beta * s)          hard mask  m = 1[s > 0]  (no gradient to s)
    gate           w_eff = w * m, computed in the wider of w's and m's dtype, cast to `dtype`
    penalty        P = sum(sigmoid(beta * s)); with `penalty=lam` the gate's backward adds
                   lam * dP/ds, so the task loss alone gives the gradients of task_loss + lam * P
"""

import torch


def soft_mask(mask_logits: torch.Tensor, beta: float) -> torch.Tensor:
    return torch.sigmoid(beta * mask_logits)


def hard_mask(mask_logits: torch.Tensor) -> torch.Tensor:
    s = mask_logits.detach()
    kept = (s > 0).to(s.dtype)
    return torch.where(torch.isnan(s), s, kept)  # NaN stays NaN rather than reading as pruned


def mask(mask_logits: torch.Tensor, beta: float, hard: bool = False) -> torch.Tensor:
    return hard_mask(mask_logits) if hard else soft_mask(mask_logits, beta)


def penalty_term(mask_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """P of one layer: sum(sigmoid(beta * s)), differentiable."""
    return soft_mask(mask_logits, beta).sum()


class _AddPenaltyGradient(torch.autograd.Function):
    """Identity on the soft mask whose backward adds lam: the gradient of lam * sum(m)."""

    @staticmethod
    def forward(ctx, soft: torch.Tensor, penalty: float) -> torch.Tensor:
        ctx.penalty = penalty
        return soft.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad + ctx.penalty, None


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
    if penalty and not hard:
        m = _AddPenaltyGradient.apply(m, penalty)
    return (weight * m).to(dtype or weight.dtype)

"""The pieces of a CS training loop (docs/contract.md section 1) a user can put in their own loop.

    beta_at(i, n, beta_final)        beta_final ** (i / (n - 1)): epoch i of n, or step i of n
    reset_mask_logits(model, ...)    s <- min(beta_final * s, s0) between rounds (or the paper
                                     code's min(s, s0), reset="official")
    param_groups(model, wd)          optimizer groups: weights with weight decay, mask logits
                                     (and biases, norm parameters) without; decay_all=True:
                                     everything but the mask logits decayed (the authors' code)
    capture / restore                the rewind point: weights and buffers, not mask logits
"""

import math

import torch
from torch import nn

from .model import gated_modules

RESETS = ("paper", "official")


def beta_at(index: int, count: int, beta_final: float = 200.0) -> float:
    """Temperature at epoch (or step) `index` of `count`: 1 at the first, beta_final at the last."""
    if count < 2:
        raise ValueError(f"a round needs at least 2 epochs (or steps) for the beta schedule, got {count}")
    if not 0 <= index < count:
        raise ValueError(f"index must lie in 0..{count - 1}, got {index}")
    if not 1.0 <= beta_final < math.inf:
        raise ValueError(f"beta_final must be a finite number >= 1, got {beta_final}")
    return beta_final ** (index / (count - 1))


@torch.no_grad()
def reset_mask_logits(model: nn.Module, beta_final: float, mask_init: float, reset: str = "paper") -> None:
    """Between rounds: s <- min(beta_final * s, s0) ("paper", docs/contract.md section 1), or min(s, s0)
    ("official", the reference code's ordering). Kept weights restart at s0; pruned ones stay
    pruned, scaled by beta_final so that the next round's beta = 1 sees the sharpened logits."""
    if reset not in RESETS:
        raise ValueError(f"reset must be one of {RESETS}, got {reset!r}")
    for _, m in gated_modules(model):
        s = m.mask_logits
        source = s * beta_final if reset == "paper" else s
        s.copy_(torch.clamp(source, max=mask_init))


def param_groups(model: nn.Module, weight_decay: float, decay_all: bool = False) -> list[dict]:
    """Weights of gated and plain layers with weight decay; mask logits, biases and 1-D
    parameters (BatchNorm) without, or with decay_all every parameter but the mask logits with
    it (as the authors' code). Mask logits get their own group, named "mask_logits"."""
    decay, no_decay, masks = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("mask_logits"):
            masks.append(p)
        elif p.dim() <= 1 and not decay_all:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "weights"},
              {"params": no_decay, "weight_decay": 0.0, "name": "biases_and_norms"}]
    if masks:
        groups.append({"params": masks, "weight_decay": 0.0, "name": "mask_logits"})
    return [g for g in groups if g["params"]]


def capture(model: nn.Module) -> dict:
    """Copies of the weights and buffers (BatchNorm statistics included), mask logits and the
    gated layers' settings (beta, hard, lam: their `_extra_state`) left out."""
    state = model.state_dict()
    return {k: v.detach().clone() for k, v in state.items()
            if torch.is_tensor(v) and not k.endswith(("mask_logits", "_extra_state"))}


@torch.no_grad()
def restore(model: nn.Module, saved: dict) -> None:
    """Load `capture`'s copies back in place (the mask logits are not touched)."""
    state = model.state_dict()
    missing = [k for k in saved if k not in state]
    if missing:
        raise ValueError(f"restore: the model has no entries {missing[:5]}")
    for k, v in saved.items():
        state[k].copy_(v)

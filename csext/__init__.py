"""csext: Continuous Sparsification (Savarese, Silva and Maire, NeurIPS 2020) for PyTorch.

Each gated weight w has mask logits s; training uses w * sigmoid(beta * s) with beta annealed
upwards and a penalty lam * sum(sigmoid(beta * s)); the ticket is the hard mask s > 0.
"""

from . import backends, export, functional, reference, schedule, search
from .model import (
    SparsityReport,
    finalize,
    gated_modules,
    mask_penalty,
    set_beta,
    set_hard,
    set_penalty,
    sparsify,
    sparsity_report,
)
from .modules import GatedConv1d, GatedConv2d, GatedHFConv1D, GatedLinear, GatedMultiheadAttention

__version__ = "0.1.0"

__all__ = [
    "GatedLinear",
    "GatedConv2d",
    "GatedConv1d",
    "GatedHFConv1D",
    "GatedMultiheadAttention",
    "functional",
    "reference",
    "backends",
    "schedule",
    "search",
    "export",
    "sparsify",
    "set_beta",
    "set_hard",
    "set_penalty",
    "mask_penalty",
    "sparsity_report",
    "SparsityReport",
    "finalize",
    "gated_modules",
]

"""csext: Continuous Sparsification (Savarese, Silva and Maire, NeurIPS 2020) for PyTorch.

Each gated weight w has mask logits s; training uses w * sigmoid(beta * s) with beta annealed
upwards and a penalty lam * sum(sigmoid(beta * s)); the ticket is the hard mask s > 0.

The library: the gated layers, their functional forms, the model-level helpers, the training
schedule, exports and the backends. The experiment application (ticket search, baselines, data
sets, command line) is csext.experiments, which this package does not import.
"""

__version__ = "0.1.0"

from . import backends, export, functional, reference, schedule  # noqa: E402
from .model import (  # noqa: E402
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
from .modules import GatedConv1d, GatedConv2d, GatedHFConv1D, GatedLinear, GatedMultiheadAttention  # noqa: E402

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


def __getattr__(name: str):
    # csext.search and the application's other old names, imported on first use (with a warning)
    from ._moved import MOVED

    if name in MOVED:
        import importlib

        return importlib.import_module(f"csext.{name}")
    raise AttributeError(f"module 'csext' has no attribute {name!r}")

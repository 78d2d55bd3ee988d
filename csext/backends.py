"""Which implementations of the gate exist here, and which one a call uses.

    torch   the pure-PyTorch reference (csext.reference), any device; the oracle of the tests
    cpp     the C++ kernels of csext._C, on CPU tensors
    cuda    the CUDA kernels of csext._C, on CUDA tensors (around cuBLAS and cuDNN)
    triton  the Triton kernels of csext.kernels: on CUDA tensors, or on CPU tensors under
            TRITON_INTERPRET=1 (Triton's interpreter: for tests, slow)
`auto` takes the fastest one available for the tensors' device and falls back to `torch`: on
the CPU `cpp`; on CUDA `cuda` (faster than `triton` at every shape measured, linear and conv:
bench/README.md), then `triton`.
"""

import importlib.util
import os

import torch

from . import _ops

NAMES = ("torch", "cpp", "triton", "cuda")
_AUTO_CUDA = ("cuda", "triton")  # the order `auto` tries on CUDA tensors


# Read once, at import: torch.compile traces resolve() and cannot trace these probes. Triton
# reads TRITON_INTERPRET when it is imported, so a later change would not take effect anyway.
_TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_TRITON_USABLE = importlib.util.find_spec("triton") is not None and (
    _TRITON_INTERPRETED or torch.cuda.is_available()
)
_CUDA_KERNELS_BUILT = _ops.extension_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key("csext::gate", "CUDA")
_AVAILABLE = tuple(
    ["torch"]
    + (["cpp"] if _ops.extension_loaded() else [])
    + (["triton"] if _TRITON_USABLE else [])
    + (["cuda"] if _CUDA_KERNELS_BUILT and torch.cuda.is_available() else [])
)


def triton_interpreted() -> bool:
    return _TRITON_INTERPRETED


def triton_usable() -> bool:
    """Triton is installed and has somewhere to run: a CUDA device, or its CPU interpreter."""
    return _TRITON_USABLE


def cuda_kernels_built() -> bool:
    """csext._C holds the CUDA kernels (built where CUDA torch and a toolkit were present)."""
    return _CUDA_KERNELS_BUILT


def available() -> list[str]:
    """The backends usable in this process, e.g. ["torch", "cpp", "triton", "cuda"]."""
    return list(_AVAILABLE)


def runs_on(backend: str, device_type: str) -> bool:
    """Whether `backend` takes tensors on `device_type` (whatever is available here)."""
    if backend == "torch":
        return True
    if backend == "cpp":
        return device_type == "cpu"
    if backend == "cuda":
        return device_type == "cuda"
    if backend == "triton":
        return device_type == "cuda" or (device_type == "cpu" and triton_interpreted())
    return False


def resolve(backend: str, device_type: str) -> str:
    """The backend a call with tensors on `device_type` runs on; errors name what is available."""
    names = _AVAILABLE
    if backend == "auto":
        if device_type == "cpu":
            return "cpp" if "cpp" in names else "torch"
        if device_type == "cuda":
            return next((b for b in _AUTO_CUDA if b in names), "torch")
        return "torch"
    if backend not in NAMES:
        raise ValueError(f"backend must be 'auto' or one of {NAMES}, got {backend!r}")
    if backend not in names:
        why = f" ({_ops.extension_error()})" if backend in ("cpp", "cuda") and not _ops.extension_loaded() else ""
        raise ValueError(f"backend {backend!r} is not available here{why}; available: {list(names)}")
    if not runs_on(backend, device_type):
        where = {"cpp": "CPU tensors", "cuda": "CUDA tensors",
                 "triton": "CUDA tensors (or CPU tensors under TRITON_INTERPRET=1)"}[backend]
        raise ValueError(f"backend {backend!r} runs on {where}, got tensors on {device_type}")
    return backend

"""The backends: which implementations of the gated ops exist here, and which one a call uses.

    torch   csext.reference: the math in plain PyTorch, any device; the oracle of every test
    cpp     csext.backends.aten on CPU tensors: the C++ ops of csext._C
    cuda    csext.backends.aten on CUDA tensors: the same ops' CUDA kernels, around cuBLAS/cuDNN
    triton  csext.backends.triton: Triton kernels, on CUDA tensors (or CPU tensors under
            TRITON_INTERPRET=1, Triton's interpreter: for tests, slow)

Each backend is one module with the same functions, which csext.functional calls once it has
checked the arguments (x, weight, mask_logits and bias are tensors that fit together; beta is a
float >= 1, penalty a float >= 0, dtype the compute dtype; padding is numeric and x batched):

    gate(weight, mask_logits, beta, hard, penalty, dtype) -> w * m in dtype
    linear(x, weight, mask_logits, beta, bias, hard, penalty, dtype) -> x (w * m)^T + b
    conv2d(x, weight, mask_logits, beta, bias, stride, padding, dilation, groups, hard, penalty,
           dtype) -> conv2d(x, w * m, b)

x may come in a float dtype that autocast casts to `dtype`; the output is in `dtype`. Each module
also lists the weight dtypes it takes (WEIGHT_DTYPES).

`auto` takes the fastest backend available for the tensors' device: on the CPU `cpp`; on CUDA
`cuda`, then `triton`; `torch` where no extension is built.
"""

import importlib.util
import os
from types import ModuleType

import torch

from .. import reference
from . import aten

NAMES = ("torch", "cpp", "triton", "cuda")
_AUTO = {"cpu": ("cpp",), "cuda": ("cuda", "triton")}  # the order `auto` tries, per device type

# Read once, at import: torch.compile traces resolve(), and Triton reads TRITON_INTERPRET when
# it is imported, so a later change would not take effect anyway.
_TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_TRITON_USABLE = importlib.util.find_spec("triton") is not None and (
    _TRITON_INTERPRETED or torch.cuda.is_available()
)
if _TRITON_USABLE:
    from . import triton
_AVAILABLE = tuple(
    ["torch"]
    + (["cpp"] if aten.loaded() else [])
    + (["triton"] if _TRITON_USABLE else [])
    + (["cuda"] if aten.cuda_kernels_built() and torch.cuda.is_available() else [])
)
_MODULES = {"torch": reference, "cpp": aten, "cuda": aten}
if _TRITON_USABLE:
    _MODULES["triton"] = triton
_RESOLVED: dict = {}  # (backend, device) -> (module, device type), for the names that resolve


def triton_interpreted() -> bool:
    return _TRITON_INTERPRETED


def triton_usable() -> bool:
    """Triton is installed and has somewhere to run: a CUDA device, or its CPU interpreter."""
    return _TRITON_USABLE


def cuda_kernels_built() -> bool:
    """csext._C holds the CUDA kernels (built where CUDA torch and a toolkit were present)."""
    return aten.cuda_kernels_built()


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
        return device_type == "cuda" or (device_type == "cpu" and _TRITON_INTERPRETED)
    return False


def resolve(backend: str, device_type: str) -> str:
    """The name of the backend a call with tensors on `device_type` runs on; errors name what is
    available."""
    if backend == "auto":
        return next((b for b in _AUTO.get(device_type, ()) if b in _AVAILABLE), "torch")
    if backend not in NAMES:
        raise ValueError(f"backend must be 'auto' or one of {NAMES}, got {backend!r}")
    if backend not in _AVAILABLE:
        why = f" ({aten.load_error()})" if backend in ("cpp", "cuda") and not aten.loaded() else ""
        raise ValueError(f"backend {backend!r} is not available here{why}; available: {list(_AVAILABLE)}")
    if not runs_on(backend, device_type):
        where = {"cpp": "CPU tensors", "cuda": "CUDA tensors",
                 "triton": "CUDA tensors (or CPU tensors under TRITON_INTERPRET=1)"}[backend]
        raise ValueError(f"backend {backend!r} runs on {where}, got tensors on {device_type}")
    return backend


def module(backend: str, device: torch.device) -> tuple[ModuleType, str]:
    """(the module that implements `backend` (or "auto") for tensors on `device`, device's type)."""
    if torch.compiler.is_compiling():  # a cache that fills while Dynamo traces would recompile
        return _MODULES[resolve(backend, device.type)], device.type
    key = (backend, device)
    found = _RESOLVED.get(key) if isinstance(backend, str) else None
    if found is None:
        found = _RESOLVED[key] = (_MODULES[resolve(backend, device.type)], device.type)
    return found

"""Which implementations of the gate exist here, and which one a call uses.

    torch   the pure-PyTorch reference (csext.reference), any device; the oracle of the tests
    cpp     the C++ extension csext._C on CPU tensors
    triton  Triton kernels (csext.kernels): not built yet
    cuda    the CUDA kernels of csext._C: not built yet
`auto` takes the fastest one available for the tensors' device and falls back to `torch`.
"""

from . import _ops

NAMES = ("torch", "cpp", "triton", "cuda")


def available() -> list[str]:
    """The backends usable in this process, e.g. ["torch", "cpp"]."""
    names = ["torch"]
    if _ops.extension_loaded():
        names.append("cpp")
    return names


def resolve(backend: str, device_type: str) -> str:
    """The backend a call with tensors on `device_type` runs on; errors name what is available."""
    if backend == "auto":
        return "cpp" if device_type == "cpu" and _ops.extension_loaded() else "torch"
    if backend not in NAMES:
        raise ValueError(f"backend must be 'auto' or one of {NAMES}, got {backend!r}")
    if backend not in available():
        why = f" ({_ops.extension_error()})" if backend == "cpp" else ""
        raise ValueError(f"backend {backend!r} is not available here{why}; available: {available()}")
    if backend == "cpp" and device_type != "cpu":
        raise ValueError(f"backend 'cpp' runs on CPU tensors, got tensors on {device_type}")
    return backend

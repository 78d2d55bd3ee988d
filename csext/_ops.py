"""The ops csext::gate and csext::gate_backward of the C++ extension: loading them, their
fake (shape) registrations, which let torch.compile and FakeTensor trace them, and their vmap
rules, which let torch.vmap run them once on a batch.

Their schemas and CPU kernels are in csrc/ops.cpp, their CUDA kernels in csrc/cuda (built
where CUDA torch is present); the math they implement is csext.reference. csrc/autograd.cpp
holds the autograd of gate and the gated layer ops csext::gated_linear / csext::gated_conv2d,
which call gate and ATen's layers through the dispatcher (so need no fake kernel of their own).
"""

import warnings

import torch

try:
    from . import _C  # noqa: F401  (loading the library registers the ops)

    _EXTENSION_ERROR = None
except (ImportError, OSError) as error:  # not built (CSEXT_NO_EXTENSION=1), or built for another torch
    _EXTENSION_ERROR = error
    warnings.warn(
        f"csext: the C++ extension csext._C is not available ({error}); using the torch backend",
        RuntimeWarning,
        stacklevel=2,
    )


def extension_loaded() -> bool:
    return _EXTENSION_ERROR is None


def extension_error() -> str:
    return "" if _EXTENSION_ERROR is None else f"csext._C did not load: {_EXTENSION_ERROR}"


_beta_tensors: dict = {}


def beta_tensor(beta: float, device=None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """beta as the ops take it: a 0-dim tensor, by default float64 on the CPU (the C++ ops; the
    Triton kernels read a float32 one on their device). Under torch.compile it is built by a
    multiply, which keeps beta a graph input instead of recompiling for each new value; in
    eager mode the few values in use are cached, so a call costs no ATen call (or launch)."""
    if torch.compiler.is_compiling():
        return torch.ones((), dtype=dtype, device=device) * beta
    if torch.jit.is_tracing():  # a cached tensor would be traced as a constant the first trace lacks
        return torch.full((), float(beta), dtype=dtype, device=device)
    key = (float(beta), device, dtype)
    tensor = _beta_tensors.get(key)
    if tensor is None:
        tensor = torch.full((), float(beta), dtype=dtype, device=device)
        # Under torch.func.grad the tensor is a wrapper whose level dies with the transform (a
        # kernel could not read it later), under a fake mode a fake one: neither is kept.
        if type(tensor) is torch.Tensor and not torch._C._functorch.is_functorch_wrapped_tensor(tensor):
            if len(_beta_tensors) >= 64:
                _beta_tensors.clear()
            _beta_tensors[key] = tensor
    return tensor


def _kernel_layout(*tensors: torch.Tensor) -> torch.memory_format:
    """The layout the kernels run in (csrc/ops.cpp, common_layout)."""
    all_contiguous = all(t.is_contiguous() for t in tensors)
    all_channels_last = all(
        t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) for t in tensors
    )
    return torch.channels_last if all_channels_last and not all_contiguous else torch.contiguous_format


if _EXTENSION_ERROR is None:

    @torch.library.register_fake("csext::gate")
    def _gate_fake(weight, mask_logits, beta, hard=False, penalty=0.0, dtype=None):
        torch._check(
            weight.shape == mask_logits.shape,
            lambda: f"csext::gate: weight and mask_logits must have the same shape, got "
            f"{tuple(weight.shape)} and {tuple(mask_logits.shape)}",
        )
        layout = _kernel_layout(weight, mask_logits)
        return torch.empty_like(weight, dtype=dtype or weight.dtype, memory_format=layout)

    @torch.library.register_fake("csext::gate_backward")
    def _gate_backward_fake(grad, weight, mask_logits, beta, penalty=0.0):
        torch._check(
            grad.shape == weight.shape == mask_logits.shape,
            lambda: "csext::gate_backward: grad, weight and mask_logits must have one shape",
        )
        layout = _kernel_layout(grad, weight, mask_logits)
        return (
            torch.empty_like(weight, memory_format=layout),
            torch.empty_like(mask_logits, memory_format=layout),
        )

    # Under torch.vmap: the gate and its backward are elementwise, so a batch of weights is one
    # call on their stack (an operand without the batch dimension broadcast to it), where vmap's
    # fallback would call the kernel once per batch element. A batched beta (vmap over the
    # temperature) takes one call per element, as the fallback would.

    def _batch_first(tensors, in_dims, batch_size):
        return [
            t.expand(batch_size, *t.shape) if dim is None else t.movedim(dim, 0)
            for t, dim in zip(tensors, in_dims)
        ]

    @torch.library.register_vmap("csext::gate")
    def _gate_vmap(info, in_dims, weight, mask_logits, beta, hard=False, penalty=0.0, dtype=None):
        weight, mask_logits = _batch_first((weight, mask_logits), in_dims[:2], info.batch_size)
        if in_dims[2] is not None:
            beta = beta.movedim(in_dims[2], 0)
            outs = [torch.ops.csext.gate(w, s, b, hard, penalty, dtype) for w, s, b in zip(weight, mask_logits, beta)]
            return torch.stack(outs), 0
        return torch.ops.csext.gate(weight, mask_logits, beta, hard, penalty, dtype), 0

    @torch.library.register_vmap("csext::gate_backward")
    def _gate_backward_vmap(info, in_dims, grad, weight, mask_logits, beta, penalty=0.0):
        grad, weight, mask_logits = _batch_first((grad, weight, mask_logits), in_dims[:3], info.batch_size)
        if in_dims[3] is not None:
            beta = beta.movedim(in_dims[3], 0)
            outs = [torch.ops.csext.gate_backward(*args, penalty) for args in zip(grad, weight, mask_logits, beta)]
            return tuple(torch.stack(o) for o in zip(*outs)), (0, 0)
        return torch.ops.csext.gate_backward(grad, weight, mask_logits, beta, penalty), (0, 0)

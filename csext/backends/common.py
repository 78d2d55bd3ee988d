"""What the fused backends share: beta as a tensor, when a call may skip torch.library's Python
dispatch, and the memory layout their kernels run in."""

import torch
from torch.overrides import has_torch_function

_beta_tensors: dict = {}


def beta_tensor(beta: float, device=None, dtype: torch.dtype = torch.float64, *, eager: bool = False) -> torch.Tensor:
    """beta as the ops take it: a 0-dim tensor, by default float64 on the CPU (the C++ ops; the
    Triton kernels read a float32 one on their device). A tensor, not a float, so that
    torch.compile keeps beta a graph input instead of recompiling for each value of the schedule;
    under torch.compile it is made by a multiply, which keeps it one. In eager mode the few values
    in use are cached, so that a call allocates nothing; `eager` says that the caller has already
    found the call to be one (plain_eager_call)."""
    if not eager:
        if torch.compiler.is_compiling():
            return torch.ones((), dtype=dtype, device=device) * beta
        if torch.jit.is_tracing():  # a cached tensor would be traced as a constant the first trace lacks
            return torch.full((), float(beta), dtype=dtype, device=device)
    key = (beta, device, dtype)
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


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def plain_eager_call(*tensors) -> bool:
    """Whether a call may enter its kernels directly rather than through torch.library's op: eager
    mode on plain tensors (not fake, functional or distributed ones, which need the op's own
    handling), and nothing that must see the op (a tracer, a __torch_function__ mode)."""
    for t in tensors:
        if type(t) not in _PLAIN and t is not None:
            return False
    return not (torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()
                or has_torch_function(tensors))


def kernel_layout(*tensors: torch.Tensor) -> torch.memory_format:
    """The layout the kernels run in: channels_last where every operand already is (convolution
    weights stay channels_last), else contiguous (csrc/gate_checks.h, common_layout)."""
    all_contiguous = all(t.is_contiguous() for t in tensors)
    all_channels_last = all(
        t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) for t in tensors
    )
    return torch.channels_last if all_channels_last and not all_contiguous else torch.contiguous_format

"""The `cpp` and `cuda` backends: the ops of the C++ extension csext._C, one op per call.

    csext::gate, csext::gate_backward    the gate and its backward (CPU: csrc/ops.cpp, CUDA:
                                         csrc/cuda), whose math is csext.reference
    csext::gated_linear, gated_conv2d    a gated layer as one op and one autograd node: the gate,
                                         then ATen's linear or convolution (csrc/autograd.cpp)

Their schemas are in csrc/ops.cpp and their autograd (forward-mode too) in csrc/autograd.cpp.
This module loads the library and registers what torch.compile and torch.func need in Python:
the fake (shape) kernels of the gate ops and their vmap rules; the layer ops call the gate ops
and ATen's layers through the dispatcher, so they need none of their own.

Each call goes to the op through the dispatcher. In eager mode on plain tensors it enters through
csext._C's typed call (csrc/fast_path.cpp), which skips the boxing of torch.ops' arguments; under
torch.compile, torch.export and torch.jit.trace, for tensor subclasses (fake, functional and
distributed tensors among them) and under __torch_function__ modes, through torch.ops.
"""

import warnings

import torch
from torch.nn.modules.utils import _pair
from torch.overrides import has_torch_function

from .common import beta_tensor, kernel_layout

try:
    from .. import _C  # loading the library registers the ops

    _LOAD_ERROR = None
except (ImportError, OSError) as error:  # not built (CSEXT_NO_EXTENSION=1), or built for another torch
    _C, _LOAD_ERROR = None, error
    warnings.warn(f"csext: the C++ extension csext._C is not available ({error}); using the torch backend",
                  RuntimeWarning, stacklevel=2)



def loaded() -> bool:
    return _LOAD_ERROR is None


def load_error() -> str:
    return "" if _LOAD_ERROR is None else f"csext._C did not load: {_LOAD_ERROR}"


def cuda_kernels_built() -> bool:
    return loaded() and torch._C._dispatch_has_kernel_for_dispatch_key("csext::gate", "CUDA")


def _pairs(value):
    return value if type(value) is tuple else _pair(value)  # the layers pass tuples already


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _unboxed(x, weight, mask_logits, bias=None) -> bool:
    """Whether a call may take csext._C's typed entry: eager mode on plain tensors (not fake,
    functional or distributed ones, whose modes must make beta too), with nothing that must see
    the call as torch.ops (a tracer, a __torch_function__ mode)."""
    return (type(x) in _PLAIN and type(weight) in _PLAIN and type(mask_logits) in _PLAIN
            and (bias is None or type(bias) in _PLAIN) and not has_torch_function((x,))
            and not (torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()))


def gate(weight, mask_logits, beta: float, hard: bool, penalty: float, dtype: torch.dtype) -> torch.Tensor:
    if _unboxed(weight, weight, mask_logits):
        return _C.gate(weight, mask_logits, beta, hard, penalty, dtype)
    return torch.ops.csext.gate.default(weight, mask_logits, beta_tensor(beta), hard, penalty, dtype)


def linear(x, weight, mask_logits, beta: float, bias, hard: bool, penalty: float, dtype: torch.dtype) -> torch.Tensor:
    if x.dtype is not dtype:  # autocast's cast of the input
        x = x.to(dtype)
    if _unboxed(x, weight, mask_logits, bias):
        return _C.gated_linear(x, weight, mask_logits, beta, bias, hard, penalty, dtype)
    return torch.ops.csext.gated_linear.default(x, weight, mask_logits, beta_tensor(beta), bias, hard, penalty, dtype)


def conv2d(x, weight, mask_logits, beta: float, bias, stride, padding, dilation, groups: int, hard: bool,
           penalty: float, dtype: torch.dtype) -> torch.Tensor:
    if x.dtype is not dtype:
        x = x.to(dtype)
    if _unboxed(x, weight, mask_logits, bias):
        return _C.gated_conv2d(x, weight, mask_logits, beta, bias, _pairs(stride), _pairs(padding),
                               _pairs(dilation), groups, hard, penalty, dtype)
    return torch.ops.csext.gated_conv2d.default(x, weight, mask_logits, beta_tensor(beta), bias, stride, padding,
                                                dilation, groups, hard, penalty, dtype)


if loaded():

    @torch.library.register_fake("csext::gate")
    def _gate_fake(weight, mask_logits, beta, hard=False, penalty=0.0, dtype=None):
        torch._check(weight.shape == mask_logits.shape,
                     lambda: f"csext::gate: weight and mask_logits must have the same shape, got "
                     f"{tuple(weight.shape)} and {tuple(mask_logits.shape)}")
        layout = kernel_layout(weight, mask_logits)
        return torch.empty_like(weight, dtype=dtype or weight.dtype, memory_format=layout)

    @torch.library.register_fake("csext::gate_backward")
    def _gate_backward_fake(grad, weight, mask_logits, beta, penalty=0.0):
        torch._check(grad.shape == weight.shape == mask_logits.shape,
                     lambda: "csext::gate_backward: grad, weight and mask_logits must have one shape")
        layout = kernel_layout(grad, weight, mask_logits)
        return torch.empty_like(weight, memory_format=layout), torch.empty_like(mask_logits, memory_format=layout)

    # Under torch.vmap the gate and its backward are elementwise, so a batch of weights is one call
    # on their stack (an operand without the batch dimension broadcast to it), where vmap's
    # fallback would call the kernel once per batch element. A batched beta (vmap over the
    # temperature) takes one call per element, as the fallback would.

    def _batch_first(tensors, in_dims, batch_size):
        return [t.expand(batch_size, *t.shape) if dim is None else t.movedim(dim, 0)
                for t, dim in zip(tensors, in_dims)]

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

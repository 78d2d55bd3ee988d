"""The `cpp` and `cuda` backends: the ops of the C++ extension csext._C, one op per call.

    csext::gate, csext::gate_backward    the gate and its backward (CPU: csrc/ops.cpp, CUDA:
                                         csrc/cuda), whose math is csext.reference
    csext::gated_linear, gated_conv2d    a gated layer as one op and one autograd node: the gate,
                                         then ATen's linear or convolution (csrc/autograd.cpp)

Their schemas are in csrc/ops.cpp and their autograd (forward-mode too) in csrc/autograd.cpp.
This module loads the library and registers what torch.compile and torch.func need in Python:
the fake (shape) kernels of the gate ops and their vmap rules; the layer ops call the gate ops
and ATen's layers through the dispatcher, so they need none of their own.

Each call goes to the op through the dispatcher: in eager mode on plain tensors through csext._C's
typed call (csrc/fast_path.cpp), which skips the boxing of torch.ops' arguments, else through
torch.ops (common.plain_eager_call says which).
"""

import json
import os
import warnings
from importlib.machinery import EXTENSION_SUFFIXES

import torch

from .common import beta_tensor, kernel_layout, plain_eager_call


def _load():
    """(csext._C, None), or (None, why it did not load, in one line that says what to type)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    root = os.path.dirname(package)
    if os.path.exists(os.path.join(root, "setup.py")):  # a checkout, built in place
        build = f"`make setup` (or `pip install --no-build-isolation -e .`) in {root}"
    else:
        build = "`pip install --no-build-isolation .` from the csext source"
    binaries = [os.path.join(package, "_C" + suffix) for suffix in EXTENSION_SUFFIXES]
    binary = next((path for path in binaries if os.path.exists(path)), None)
    if binary is None:  # a source tree never built, or a CSEXT_NO_EXTENSION=1 install
        return None, f"it is not built (no _C{EXTENSION_SUFFIXES[0]} in {package}); build it with {build}"
    try:
        with open(os.path.join(package, "_build.json")) as f:
            built_for = f"torch {json.load(f)['torch']}"
    except (OSError, ValueError, KeyError, TypeError):
        built_for = "an unknown torch (no readable _build.json beside it)"
    # A binary built against another torch's headers may crash or compute garbage: never load it.
    if built_for != f"torch {torch.__version__}":
        return None, f"it was built for {built_for}, but this is torch {torch.__version__}; rebuild it with {build}"
    try:
        from .. import _C  # loading the library registers the ops
    except (ImportError, OSError) as error:
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        return None, f"{binary}: {reason}; rebuild it with {build}"
    return _C, None


_C, _LOAD_ERROR = _load()
if _LOAD_ERROR is not None:
    warnings.warn(f"csext._C did not load: {_LOAD_ERROR}; using the torch backend", RuntimeWarning, stacklevel=2)


WEIGHT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def loaded() -> bool:
    return _LOAD_ERROR is None


def load_error() -> str:
    return "" if _LOAD_ERROR is None else f"csext._C did not load: {_LOAD_ERROR}"


def cuda_kernels_built() -> bool:
    return loaded() and torch._C._dispatch_has_kernel_for_dispatch_key("csext::gate", "CUDA")


def gate(weight, mask_logits, beta: float, hard: bool, penalty: float, dtype: torch.dtype) -> torch.Tensor:
    if plain_eager_call(weight, mask_logits):
        return _C.gate(weight, mask_logits, beta_tensor(beta, eager=True), hard, penalty, dtype)
    return torch.ops.csext.gate.default(weight, mask_logits, beta_tensor(beta), hard, penalty, dtype)


def linear(x, weight, mask_logits, beta: float, bias, hard: bool, penalty: float, dtype: torch.dtype) -> torch.Tensor:
    if x.dtype is not dtype:  # autocast's cast of the input
        x = x.to(dtype)
    if plain_eager_call(x, weight, mask_logits, bias):
        return _C.gated_linear(x, weight, mask_logits, beta_tensor(beta, eager=True), bias, hard, penalty, dtype)
    return torch.ops.csext.gated_linear.default(x, weight, mask_logits, beta_tensor(beta), bias, hard, penalty, dtype)


def conv2d(x, weight, mask_logits, beta: float, bias, stride, padding, dilation, groups: int, hard: bool,
           penalty: float, dtype: torch.dtype) -> torch.Tensor:
    if x.dtype is not dtype:
        x = x.to(dtype)
    args = stride, padding, dilation, groups, hard, penalty, dtype
    if plain_eager_call(x, weight, mask_logits, bias):
        return _C.gated_conv2d(x, weight, mask_logits, beta_tensor(beta, eager=True), bias, *args)
    return torch.ops.csext.gated_conv2d.default(x, weight, mask_logits, beta_tensor(beta), bias, *args)


if loaded():

    def _check_mask_shape(op, weight, mask_logits):
        """mask_logits of weight's shape, or (rows, 1, ...): one logit per leading row (csrc/gate_checks.h)."""
        rows = [weight.shape[0]] + [1] * (weight.dim() - 1) if weight.dim() else []
        torch._check(weight.shape == mask_logits.shape or list(mask_logits.shape) == rows,
                     lambda: f"{op}: mask_logits must have the shape of weight {tuple(weight.shape)} or one logit "
                     f"per row, got {tuple(mask_logits.shape)}")

    def _per_element(op, outputs, batched):
        """op on each element of the batch, where one logit per channel keeps the gate from being
        one call on the stack."""
        outs = [op(*args) for args in zip(*batched)]
        return (torch.stack(outs), 0) if outputs == 1 else (tuple(torch.stack(o) for o in zip(*outs)), (0, 0))

    @torch.library.register_fake("csext::gate")
    def _gate_fake(weight, mask_logits, beta, hard=False, penalty=0.0, dtype=None):
        _check_mask_shape("csext::gate", weight, mask_logits)
        layout = kernel_layout(weight, mask_logits)
        return torch.empty_like(weight, dtype=dtype or weight.dtype, memory_format=layout)

    @torch.library.register_fake("csext::gate_backward")
    def _gate_backward_fake(grad, weight, mask_logits, beta, penalty=0.0):
        torch._check(grad.shape == weight.shape, lambda: "csext::gate_backward: grad must have weight's shape")
        _check_mask_shape("csext::gate_backward", weight, mask_logits)
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
        if weight.shape != mask_logits.shape:
            betas = beta.movedim(in_dims[2], 0) if in_dims[2] is not None else [beta] * info.batch_size
            return _per_element(lambda w, s, b: torch.ops.csext.gate(w, s, b, hard, penalty, dtype), 1,
                                (weight, mask_logits, betas))
        if in_dims[2] is not None:
            beta = beta.movedim(in_dims[2], 0)
            outs = [torch.ops.csext.gate(w, s, b, hard, penalty, dtype) for w, s, b in zip(weight, mask_logits, beta)]
            return torch.stack(outs), 0
        return torch.ops.csext.gate(weight, mask_logits, beta, hard, penalty, dtype), 0

    @torch.library.register_vmap("csext::gate_backward")
    def _gate_backward_vmap(info, in_dims, grad, weight, mask_logits, beta, penalty=0.0):
        grad, weight, mask_logits = _batch_first((grad, weight, mask_logits), in_dims[:3], info.batch_size)
        if weight.shape != mask_logits.shape:
            betas = beta.movedim(in_dims[3], 0) if in_dims[3] is not None else [beta] * info.batch_size
            return _per_element(lambda g, w, s, b: torch.ops.csext.gate_backward(g, w, s, b, penalty), 2,
                                (grad, weight, mask_logits, betas))
        if in_dims[3] is not None:
            beta = beta.movedim(in_dims[3], 0)
            outs = [torch.ops.csext.gate_backward(*args, penalty) for args in zip(grad, weight, mask_logits, beta)]
            return tuple(torch.stack(o) for o in zip(*outs)), (0, 0)
        return torch.ops.csext.gate_backward(grad, weight, mask_logits, beta, penalty), (0, 0)

"""Functional forms of the gated layers: the gate (w_eff = w * m) on a chosen backend, then
ATen's own linear or convolution.

Every check here reads shapes, dtypes and devices only, never tensor values: no call costs a
device synchronisation, and NaN in the mask logits flows through to outputs and gradients.
"""

import math

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from . import _ops, backends, reference

_triton = None
if backends.triton_usable():
    from . import _triton  # registers the csext::triton_* ops (torch.compile's route)

_WEIGHT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_beta(beta) -> None:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta must be a float, got {type(beta).__name__}")
    # Comparisons, not math.isfinite: torch.compile traces them without a graph break.
    if not 1.0 <= beta < math.inf:
        raise ValueError(f"beta must be a finite number >= 1, got {beta}")


def check_penalty(penalty) -> None:
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)):
        raise TypeError(f"penalty must be a float, got {type(penalty).__name__}")
    if not 0.0 <= penalty < math.inf:
        raise ValueError(f"penalty must be a finite number >= 0, got {penalty}")


def check_mask_scale(mask_scale) -> None:
    if isinstance(mask_scale, bool) or not isinstance(mask_scale, (int, float)) or not 0.0 < mask_scale < math.inf:
        raise ValueError(f"mask_scale must be a finite number > 0, got {mask_scale!r}")


def _sizes_differ(a, b) -> bool:
    """a != b, for sizes; False under torch.jit.trace, where sizes are traced values and each
    comparison would print a TracerWarning (a mismatch then fails in the op itself)."""
    return not torch.jit.is_tracing() and a != b


def check_gate_args(weight: torch.Tensor, mask_logits: torch.Tensor, beta, penalty) -> None:
    if not isinstance(weight, torch.Tensor) or not isinstance(mask_logits, torch.Tensor):
        raise TypeError("weight and mask_logits must be tensors")
    if _sizes_differ(weight.shape, mask_logits.shape):
        raise ValueError(
            f"weight and mask_logits must have the same shape, got weight {tuple(weight.shape)} "
            f"and mask_logits {tuple(mask_logits.shape)}"
        )
    if weight.dtype not in _WEIGHT_DTYPES:
        raise TypeError(f"weight must be float32, float64, bfloat16 or float16, got {weight.dtype}")
    wanted = torch.float64 if weight.dtype == torch.float64 else torch.float32
    if mask_logits.dtype != wanted:
        raise TypeError(
            f"mask_logits must be {wanted} (float32, or float64 beside a float64 weight), "
            f"got {mask_logits.dtype} with a {weight.dtype} weight"
        )
    if weight.device != mask_logits.device:
        raise ValueError(
            f"weight and mask_logits must be on the same device, got {weight.device} and {mask_logits.device}"
        )
    check_beta(beta)
    check_penalty(penalty)


def _check_layer_args(x, weight, mask_logits, beta, bias, penalty, mask_scale) -> str:
    """The checks both gated layers make beside their shape checks; returns weight's device type."""
    check_gate_args(weight, mask_logits, beta, penalty)
    device = weight.device
    if x.device != device:
        raise ValueError(f"x must be on the device of weight ({device}), got {x.device}")
    if bias is not None and bias.device != device:
        raise ValueError(f"bias must be on the device of weight ({device}), got {bias.device}")
    check_mask_scale(mask_scale)
    return device.type


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None, channel_dim: int) -> torch.Tensor:
    if bias is None:
        return y
    shape = [1] * y.dim()
    shape[channel_dim] = -1
    return y + bias.to(y.dtype).view(shape)


def _autocast_applies(weight: torch.Tensor, device_type: str) -> bool:
    """Autocast is on for weight's device and would cast it (it never casts float64; the meta
    device has no autocast and would raise)."""
    return weight.dtype != torch.float64 and device_type != "meta" and torch.is_autocast_enabled(device_type)


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the matmul or convolution runs in: autocast's where it is on, else weight's."""
    device_type = weight.device.type
    if _autocast_applies(weight, device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def gate(
    weight: torch.Tensor,
    mask_logits: torch.Tensor,
    beta: float,
    *,
    hard: bool = False,
    penalty: float = 0.0,
    dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The effective weight w * m, in `dtype` (default: weight's), with m the soft mask
    sigmoid(beta * mask_logits) or, with `hard`, the ticket mask 1[mask_logits > 0].

    `penalty` (lam) enters the backward only: the gradient of the mask logits gains that of
    lam * sum(sigmoid(beta * mask_logits)).
    """
    check_gate_args(weight, mask_logits, beta, penalty)
    name, mask_logits, penalty = _backend_for_call(backend, weight.device.type, mask_logits, beta, hard, penalty)
    return _gate(weight, mask_logits, beta, hard, penalty, dtype, name)


def _exporting_to_onnx() -> bool:
    """torch.onnx.export is tracing the model, with torch.jit (dynamo=False) or torch.export."""
    # torch.onnx.is_in_onnx_export costs microseconds; the checks before it, a tenth of one
    return (torch.jit.is_tracing() or torch.compiler.is_exporting()) and torch.onnx.is_in_onnx_export()


def _backend_for_call(backend: str, device_type: str, mask_logits, beta, hard, penalty):
    """(backend name, mask_logits, penalty) for a call with tensors on `device_type`. In an
    ONNX export every backend runs as the torch reference, whose ops (sigmoid, mul, greater)
    ONNX has and csext's ops are not, and lam, which acts in the backward alone, is left out."""
    name = backends.resolve(backend, device_type)  # refuses a bad backend in an export too
    if _exporting_to_onnx():
        return "torch", mask_logits, 0.0
    return (name, *_penalty_for_compile(mask_logits, beta, hard, penalty, name))


def _penalty_for_compile(mask_logits, beta, hard, penalty, name: str):
    """(mask_logits, penalty) for backend `name`. Under torch.compile lam leaves the ops of the
    fused backends, where it is a float argument and each new value recompiled (a schedule of
    lam soon hit Dynamo's recompile limit, an error under fullgraph=True), for a node on the mask
    logits that adds its gradient with lam a graph input, as beta is. The torch backend's
    autograd Function keeps lam symbolic itself."""
    if not torch.compiler.is_compiling() or not penalty or name == "torch":
        return mask_logits, penalty
    if hard:  # no gradient reaches the mask logits: lam has nothing to act on
        return mask_logits, 0.0
    return reference.add_penalty_gradient(mask_logits, beta, penalty), 0.0


def _gate(weight, mask_logits, beta, hard, penalty, dtype, name: str) -> torch.Tensor:
    """gate() once its arguments are checked, on the resolved backend `name`."""
    if name in ("cpp", "cuda"):
        # .default skips the overload lookup of the packet: a few microseconds a call
        return torch.ops.csext.gate.default(weight, mask_logits, _ops.beta_tensor(beta), bool(hard), float(penalty), dtype)
    if name == "triton":
        _check_triton_dtype(weight)
        beta_on_device = _triton.device_beta(beta, weight.device)
        return _triton.gate(weight, mask_logits, beta_on_device, bool(hard), float(penalty), dtype or weight.dtype)
    return reference.gate(weight, mask_logits, beta, hard=hard, penalty=penalty, dtype=dtype)


# Backends whose gated layers are one op and one autograd node (csrc/autograd.cpp): the gate,
# then ATen's linear or convolution. A small layer on a GPU costs what its host code costs;
# bench/host.py measures what one op and node instead of two of each saves.
_LAYER_OPS = ("cpp", "cuda")

# In eager mode, a call whose backend is a layer op first tries the C++ fast path of csext._C
# (csrc/python.cpp): the checks below, autocast's cast of x and the op call in one C call. A
# call on the triton backend takes the C checks alone (csext._C.linear_input, which returns x
# uncast and the compute dtype; conv2d_input, which casts x), then the Triton layer. Either
# returns None for anything it does not take, and the call goes on here, where bad input gets
# its error.
_EAGER = getattr(_ops, "_C", None)
_EAGER_ROUTES: dict = {}  # (backend, device type) -> "layer op", "triton" or None


def _eager_route(backend, weight):
    """What of the C++ fast path may take this call: "layer op", "triton" or None (eager mode
    only)."""
    if (_EAGER is None or torch.compiler.is_compiling() or not isinstance(backend, str)
            or not isinstance(weight, torch.Tensor)):
        return None
    key = (backend, weight.device.type)
    route = _EAGER_ROUTES.get(key, False)
    if route is False:
        try:
            name = backends.resolve(backend, key[1])
        except ValueError:  # a bad backend: the checked path raises it, after the other checks
            name = None
        route = _EAGER_ROUTES[key] = "layer op" if name in _LAYER_OPS else "triton" if name == "triton" else None
    return route


def _check_triton_dtype(weight: torch.Tensor) -> None:
    if weight.dtype == torch.float64:
        raise TypeError("backend 'triton' takes float32, bfloat16 or float16 weights, got float64; "
                        "use backend 'torch', 'cpp' or 'cuda' for float64")


# Up to this many rows of x, the triton backend runs a gated linear layer as fused GEMMs that
# gate each weight tile as they load it; above, the elementwise kernel writes the gated weight
# once and cuBLAS runs the GEMMs, since the per-tile gating is repeated for every tile of rows.
# On an H100 (bench/README.md, K = N = 4096, bf16) the fused path was ahead at 128 and 256 rows
# and behind at 2048 and 8192; the switch sits between the measured sizes.
TRITON_FUSED_MAX_ROWS = 1024


def _layer_input(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cast: bool = True):
    """(x, dtype) for a gated layer: dtype is what the matmul or convolution runs in, and x is
    cast to it as autocast casts F.linear's and F.conv2d's input (with `cast` False, x is left
    for the kernels to cast). Outside autocast, x and bias must have weight's dtype, as F.linear
    and F.conv2d demand (one error for every backend)."""
    device_type = weight.device.type
    if _autocast_applies(weight, device_type):
        dtype = torch.get_autocast_dtype(device_type)
        if x.dtype != dtype and x.is_floating_point() and x.dtype != torch.float64:
            return (x.to(dtype) if cast else x), dtype
    else:
        dtype = weight.dtype
        if bias is not None and bias.dtype != dtype:
            raise TypeError(f"bias must have the dtype of weight ({dtype}), got {bias.dtype}")
    if x.dtype != dtype:
        raise TypeError(f"x must have the dtype of weight ({dtype}), got {x.dtype}")
    return x, dtype


def _autocast_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x cast to the compute dtype, as autocast casts a layer's input. In eager mode csext._C
    makes the cast's node, whose backward widens dL/dx back to x's dtype with csext::cast, on
    CUDA a vectorized kernel where ATen's cast is not (csrc/input_cast.cpp); the values are the
    same."""
    if x.dtype == dtype or _EAGER is None or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return x.to(dtype)
    return _EAGER.autocast_input(x, dtype)


def _triton_linear(x, weight, mask_logits, beta, bias, hard, penalty, mask_scale, dtype):
    """gated_linear on the triton backend, fused or not: x (..., K) in the compute dtype `dtype`
    or, under autocast, not yet cast to it."""
    _check_triton_dtype(weight)
    # Batched x as rows (not (-1, K): K may be 0); a 2-D x as it is, without a view's autograd node
    rows = x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    fused_bias = bias if mask_scale == 1.0 else None  # added in the GEMM's epilogue
    # A traced (torch.jit.trace) or symbolic (dynamic shapes of torch.compile and torch.export) row
    # count takes the path that suits every size: a branch on it would bake it in, or add a guard
    # that bounds a dynamic batch to TRITON_FUSED_MAX_ROWS (an error in torch.export)
    if (torch.jit.is_tracing() or isinstance(rows.shape[0], torch.SymInt)
            or rows.shape[0] > TRITON_FUSED_MAX_ROWS):
        w_eff = _gate(weight, mask_logits, beta, hard, penalty, dtype, "triton")
        y = F.linear(_autocast_input(rows, dtype), w_eff, fused_bias)
    else:
        # The GEMMs cast x's tiles and round dL/dx as autocast's cast would: no pass over memory,
        # no op and no autograd node for it. The layer keeps x as given for the backward.
        beta_on_device = _triton.device_beta(beta, weight.device)
        y = _triton.gated_linear(rows, weight, mask_logits, beta_on_device, fused_bias, bool(hard), float(penalty),
                                 dtype)
    if x.dim() != 2:
        y = y.reshape(*x.shape[:-1], weight.shape[0])
    if mask_scale == 1.0:
        return y
    return _add_bias(y * mask_scale, bias, channel_dim=-1)


def gated_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask_logits: torch.Tensor,
    beta: float,
    bias: torch.Tensor | None = None,
    *,
    hard: bool = False,
    penalty: float = 0.0,
    backend: str = "auto",
    mask_scale: float = 1.0,
) -> torch.Tensor:
    """y = x @ (c * w * m)^T + b, for x of shape (..., in_features), with c = mask_scale."""
    route = _eager_route(backend, weight) if mask_scale == 1.0 else None
    if route == "layer op":
        y = _EAGER.gated_linear(x, weight, mask_logits, beta, bias, hard, penalty)
        if y is not None:
            return y
    elif route == "triton":
        taken = _EAGER.linear_input(x, weight, mask_logits, beta, bias, hard, penalty)
        if taken is not None:  # (x, the compute dtype): the fused GEMMs cast x themselves
            x_in, dtype = taken
            return _triton_linear(x_in, weight, mask_logits, beta, bias, hard, penalty, 1.0, dtype)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if x.dim() < 1 or _sizes_differ(x.shape[-1], weight.shape[1]):
        raise ValueError(
            f"x must have shape (..., {weight.shape[1]}) to match in_features, got {tuple(x.shape)}"
        )
    device_type = _check_layer_args(x, weight, mask_logits, beta, bias, penalty, mask_scale)
    name, mask_logits, penalty = _backend_for_call(backend, device_type, mask_logits, beta, hard, penalty)
    x, dtype = _layer_input(x, weight, bias, cast=name != "triton")
    if name == "triton":
        return _triton_linear(x, weight, mask_logits, beta, bias, hard, penalty, mask_scale, dtype)
    if name in _LAYER_OPS and mask_scale == 1.0:
        return torch.ops.csext.gated_linear.default(
            x, weight, mask_logits, _ops.beta_tensor(beta), bias, bool(hard), float(penalty), dtype)
    w_eff = _gate(weight, mask_logits, beta, hard, penalty, dtype, name)
    if mask_scale == 1.0:
        return F.linear(x, w_eff, bias)
    return _add_bias(F.linear(x, w_eff) * mask_scale, bias, channel_dim=-1)  # c scales the output, not the weight


def _explicit_padding(padding: str, kernel_size, stride, dilation):
    """'valid' or 'same' as the symmetric padding F.conv2d would apply, for the layer op; the
    string itself where that takes more (asymmetric 'same', a stride: F.conv2d handles or
    refuses those)."""
    if padding == "valid":
        return 0
    stride, dilation = _pair(stride), _pair(dilation)
    totals = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
    if padding != "same" or stride != (1, 1) or any(t % 2 for t in totals):
        return padding
    return tuple(t // 2 for t in totals)


def gated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask_logits: torch.Tensor,
    beta: float,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    *,
    hard: bool = False,
    penalty: float = 0.0,
    backend: str = "auto",
    mask_scale: float = 1.0,
) -> torch.Tensor:
    """conv2d(x, c * w * m, b) for x of shape (N, C_in, H, W) or (C_in, H, W), c = mask_scale."""
    route = _eager_route(backend, weight) if mask_scale == 1.0 else None
    if route == "layer op":
        y = _EAGER.gated_conv2d(x, weight, mask_logits, beta, bias, hard, penalty, stride, padding, dilation, groups)
        if y is not None:
            return y
    elif route == "triton":
        x_in = _EAGER.conv2d_input(x, weight, mask_logits, beta, bias, hard, penalty, stride, padding, dilation, groups)
        if x_in is not None:
            w_eff = _gate(weight, mask_logits, beta, hard, penalty, x_in.dtype, "triton")
            return F.conv2d(x_in, w_eff, bias, stride, padding, dilation, groups)
    if weight.dim() != 4:
        raise ValueError(
            f"weight must be 4-D (out_channels, in_channels/groups, kH, kW), got shape {tuple(weight.shape)}"
        )
    in_channels = weight.shape[1] * groups
    if x.dim() not in (3, 4) or _sizes_differ(x.shape[-3], in_channels):
        raise ValueError(
            f"x must have shape (N, {in_channels}, H, W) or ({in_channels}, H, W) to match "
            f"in_channels, got {tuple(x.shape)}"
        )
    device_type = _check_layer_args(x, weight, mask_logits, beta, bias, penalty, mask_scale)
    name, mask_logits, penalty = _backend_for_call(backend, device_type, mask_logits, beta, hard, penalty)
    x, dtype = _layer_input(x, weight, bias)
    if isinstance(padding, str) and name in _LAYER_OPS:
        padding = _explicit_padding(padding, weight.shape[2:], stride, dilation)
    if name in _LAYER_OPS and mask_scale == 1.0 and x.dim() == 4 and not isinstance(padding, str):
        return torch.ops.csext.gated_conv2d.default(
            x, weight, mask_logits, _ops.beta_tensor(beta), bias, stride, padding, dilation, groups, bool(hard),
            float(penalty), dtype)
    w_eff = _gate(weight, mask_logits, beta, hard, penalty, dtype, name)
    if mask_scale == 1.0:
        return F.conv2d(x, w_eff, bias, stride, padding, dilation, groups)
    return _add_bias(F.conv2d(x, w_eff, None, stride, padding, dilation, groups) * mask_scale, bias, channel_dim=-3)


def _gated_weight(x, weight, mask_logits, beta, bias, hard, penalty, backend, mask_scale):
    """(x, c * w * m) for the layers that gate their weight with the backend's gate kernel and
    then call ATen (gated_conv1d, gated_hf_conv1d), both in the compute dtype: x cast as autocast
    casts a layer's input, after the checks every gated layer makes."""
    device_type = _check_layer_args(x, weight, mask_logits, beta, bias, penalty, mask_scale)
    name, mask_logits, penalty = _backend_for_call(backend, device_type, mask_logits, beta, hard, penalty)
    x, dtype = _layer_input(x, weight, bias)
    w_eff = _gate(weight, mask_logits, beta, hard, penalty, dtype, name)
    return x, (w_eff if mask_scale == 1.0 else w_eff * mask_scale)


def gated_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask_logits: torch.Tensor,
    beta: float,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    *,
    hard: bool = False,
    penalty: float = 0.0,
    backend: str = "auto",
    mask_scale: float = 1.0,
) -> torch.Tensor:
    """conv1d(x, c * w * m, b) for x of shape (N, C_in, L) or (C_in, L), c = mask_scale: the
    backend's gate kernel (lam in its backward), then ATen's convolution."""
    if weight.dim() != 3:
        raise ValueError(f"weight must be 3-D (out_channels, in_channels/groups, kernel_size), got shape "
                         f"{tuple(weight.shape)}")
    in_channels = weight.shape[1] * groups
    if x.dim() not in (2, 3) or _sizes_differ(x.shape[-2], in_channels):
        raise ValueError(f"x must have shape (N, {in_channels}, L) or ({in_channels}, L) to match in_channels, "
                         f"got {tuple(x.shape)}")
    x, w_eff = _gated_weight(x, weight, mask_logits, beta, bias, hard, penalty, backend, mask_scale)
    return F.conv1d(x, w_eff, bias, stride, padding, dilation, groups)


def gated_hf_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask_logits: torch.Tensor,
    beta: float,
    bias: torch.Tensor | None = None,
    *,
    hard: bool = False,
    penalty: float = 0.0,
    backend: str = "auto",
    mask_scale: float = 1.0,
) -> torch.Tensor:
    """transformers' Conv1D (GPT-2's linear layers) with its weight gated: x (c * w * m) + b, the
    weight stored (in_features, out_features), for x of shape (..., in_features). The backend's
    gate kernel (lam in its backward), then torch.addmm as Conv1D computes."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (in_features, out_features), as Conv1D stores it, got shape "
                         f"{tuple(weight.shape)}")
    if x.dim() < 1 or _sizes_differ(x.shape[-1], weight.shape[0]):
        raise ValueError(f"x must have shape (..., {weight.shape[0]}) to match in_features, got {tuple(x.shape)}")
    x, w_eff = _gated_weight(x, weight, mask_logits, beta, bias, hard, penalty, backend, mask_scale)
    flat = x.reshape(-1, x.shape[-1])
    y = flat @ w_eff if bias is None else torch.addmm(bias.to(w_eff.dtype), flat, w_eff)
    return y.view(*x.shape[:-1], weight.shape[1])


__all__ = ["gate", "gated_linear", "gated_conv2d", "gated_conv1d", "gated_hf_conv1d", "compute_dtype",
           "check_gate_args"]

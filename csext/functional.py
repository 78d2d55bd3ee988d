"""Functional forms of the gated layers. Each one checks its arguments (here, and nowhere else),
picks a backend module from csext.backends, and calls it:

    gated_linear(x, ...)  ->  checks  ->  _backend: backends.module(backend, device)  ->  impl.linear

The checks read shapes, dtypes and devices only, never tensor values: no call costs a device
synchronisation, and NaN in the mask logits flows through to outputs and gradients. Three
things are done once, here, by the functions named for them: `_backend` (the torch reference
while torch.onnx.export traces), `_penalty_as_graph_input` (lam under torch.compile) and
`_scale_output` (mask_scale).
"""

import math
import warnings

import torch
import torch.nn.functional as F

from . import backends, reference

_WEIGHT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


# --- checks --------------------------------------------------------------------------------------


def check_beta(beta) -> None:
    if type(beta) is float and 1.0 <= beta < math.inf:  # the common case first: a call's cost counts
        return
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta must be a float, got {type(beta).__name__}")
    # Comparisons, not math.isfinite: torch.compile traces them without a graph break.
    if not 1.0 <= beta < math.inf:
        raise ValueError(f"beta must be a finite number >= 1, got {beta}")


def check_penalty(penalty) -> None:
    if type(penalty) is float and 0.0 <= penalty < math.inf:
        return
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)):
        raise TypeError(f"penalty must be a float, got {type(penalty).__name__}")
    if not 0.0 <= penalty < math.inf:
        raise ValueError(f"penalty must be a finite number >= 0, got {penalty}")


def check_mask_scale(mask_scale) -> None:
    if isinstance(mask_scale, bool) or not isinstance(mask_scale, (int, float)) or not 0.0 < mask_scale < math.inf:
        raise ValueError(f"mask_scale must be a finite number > 0, got {mask_scale!r}")


def _channel_form(weight: torch.Tensor, mask_logits: torch.Tensor, out_dim: int) -> bool:
    """Whether mask_logits holds one logit per output unit of weight: weight's dimensions, with size 1
    on all but `out_dim` (channel granularity)."""
    shape = list(weight.shape)
    if mask_logits.dim() != len(shape) or not shape:
        return False
    shape = [1] * len(shape)
    shape[out_dim] = weight.shape[out_dim]
    return list(mask_logits.shape) == shape


def _check_weight_and_mask(weight: torch.Tensor, mask_logits: torch.Tensor, tracing: bool, out_dim: int = 0) -> bool:
    """weight and mask_logits: tensors of one device, in dtypes the kernels take, mask_logits of
    weight's shape or of its channel form (_channel_form); returns whether it is the channel form.
    Under torch.jit.trace (`tracing`) sizes are traced values, and comparing them would print a
    TracerWarning each time: the form is then read with those warnings off."""
    if type(weight) not in _PLAIN_TENSORS or type(mask_logits) not in _PLAIN_TENSORS:  # isinstance costs more
        if not isinstance(weight, torch.Tensor) or not isinstance(mask_logits, torch.Tensor):
            raise TypeError("weight and mask_logits must be tensors")
    channel = False
    if tracing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            channel = weight.shape != mask_logits.shape
    elif weight.shape != mask_logits.shape:
        channel = _channel_form(weight, mask_logits, out_dim)
        if not channel:
            unit_shape = [1] * weight.dim()
            if unit_shape:
                unit_shape[out_dim] = weight.shape[out_dim]
            raise ValueError(f"mask_logits must have the shape of weight {tuple(weight.shape)}, or "
                             f"{tuple(unit_shape)} for one logit per output unit, got {tuple(mask_logits.shape)}")
    weight_dtype = weight.dtype
    if weight_dtype not in _WEIGHT_DTYPES:
        raise TypeError(f"weight must be float32, float64, bfloat16 or float16, got {weight_dtype}")
    wanted = torch.float64 if weight_dtype is torch.float64 else torch.float32
    if mask_logits.dtype is not wanted:
        raise TypeError(f"mask_logits must be {wanted} (float32, or float64 beside a float64 weight), "
                        f"got {mask_logits.dtype} with a {weight_dtype} weight")
    if weight.device != mask_logits.device:
        raise ValueError(f"weight and mask_logits must be on the same device, got {weight.device} and "
                         f"{mask_logits.device}")
    return channel


def check_gate_args(weight: torch.Tensor, mask_logits: torch.Tensor, beta, penalty) -> bool:
    """The checks of gate's arguments: weight and mask_logits, beta, penalty; returns whether the
    mask logits are in channel form."""
    channel = _check_weight_and_mask(weight, mask_logits, torch.jit.is_tracing())
    check_beta(beta)
    check_penalty(penalty)
    return channel


def _autocast_dtype(weight_dtype: torch.dtype, device_type: str) -> torch.dtype | None:
    """Autocast's dtype where it is on for the device and would cast the weight (it never casts
    float64; the meta device has no autocast and would raise), else None."""
    if weight_dtype is torch.float64 or device_type == "meta" or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the matmul or convolution runs in: autocast's where it is on, else weight's."""
    return _autocast_dtype(weight.dtype, weight.device.type) or weight.dtype


def _check_layer(x, weight, mask_logits, beta, bias, penalty, mask_scale, backend: str, tracing: bool,
                 out_dim: int = 0):
    """The checks every gated layer makes beside its shape checks; returns (backend module,
    compute dtype, whether the mask logits are in channel form). Under autocast x may come in any
    float dtype autocast casts; outside it, x and bias must have weight's dtype, as F.linear and
    F.conv2d demand. The common case is tested first, inline: a small layer's call costs about as
    much as these steps."""
    channel = _check_weight_and_mask(weight, mask_logits, tracing, out_dim)
    if type(beta) is not float or not 1.0 <= beta < math.inf:
        check_beta(beta)  # raises, or passes an int
    if type(penalty) is not float or not 0.0 <= penalty < math.inf:
        check_penalty(penalty)
    if type(mask_scale) is not float or mask_scale != 1.0:
        check_mask_scale(mask_scale)
    device, weight_dtype = weight.device, weight.dtype
    if x.device != device:
        raise ValueError(f"x must be on the device of weight ({device}), got {x.device}")
    if bias is not None and bias.device != device:
        raise ValueError(f"bias must be on the device of weight ({device}), got {bias.device}")
    impl, device_type = _backend(backend, weight, device, tracing)
    dtype = _autocast_dtype(weight_dtype, device_type)
    if dtype is not None:
        if x.is_floating_point() and x.dtype is not torch.float64:
            return impl, dtype, channel
    else:
        dtype = weight_dtype
        if bias is not None and bias.dtype is not dtype:
            raise TypeError(f"bias must have the dtype of weight ({dtype}), got {bias.dtype}")
    if x.dtype is not dtype:
        raise TypeError(f"x must have the dtype of weight ({dtype}), got {x.dtype}")
    return impl, dtype, channel


# --- the three things done once ------------------------------------------------------------------


def _exporting_to_onnx(tracing: bool) -> bool:
    """torch.onnx.export is tracing the model, with torch.jit (`tracing`; dynamo=False) or torch.export."""
    return (tracing or torch.compiler.is_exporting()) and torch.onnx.is_in_onnx_export()


def _backend(backend: str, weight: torch.Tensor, device: torch.device, tracing: bool):
    """(backend module, device type) for a call on weight's device, after the checks; the torch
    reference instead while torch.onnx.export traces: ONNX has its ops (sigmoid, mul), not csext's."""
    impl, device_type = backends.module(backend, device)
    if impl is reference:
        return impl, device_type
    if weight.dtype not in impl.WEIGHT_DTYPES:
        name = backends.resolve(backend, device_type)
        raise TypeError(f"backend {name!r} takes {', '.join(str(d) for d in impl.WEIGHT_DTYPES)} weights, got "
                        f"{weight.dtype}; use backend 'torch', 'cpp' or 'cuda' for it")
    return (reference if _exporting_to_onnx(tracing) else impl), device_type


def _penalty_as_graph_input(impl, mask_logits, beta, hard: bool, penalty: float, weight: torch.Tensor):
    """(mask_logits, penalty) as `impl` takes them. Under torch.compile lam leaves the fused ops,
    where it is a float argument and each new value would recompile (a schedule of lam soon hits
    Dynamo's recompile limit, an error under fullgraph=True), for a node on the mask logits that
    adds its gradient with lam a graph input, as beta is. The torch reference keeps lam symbolic
    itself."""
    if impl is reference or not torch.compiler.is_compiling():
        return mask_logits, penalty
    if hard:  # no gradient reaches the mask logits: lam has nothing to act on
        return mask_logits, 0.0
    return reference.add_penalty_gradient(mask_logits, beta, penalty, weight.numel() // mask_logits.numel()), 0.0


def _gated_bias(impl, bias, mask_logits, beta, hard: bool):
    """The bias of a channel-gated layer times its unit's mask, so that a unit gated off goes whole
    (docs/contract.md section 1); lam counts weights only, so the bias's gate carries none."""
    if bias is None:
        return None
    return impl.gate(bias, mask_logits.reshape(bias.shape), beta, bool(hard), 0.0, bias.dtype)


def _scale_output(y: torch.Tensor, mask_scale: float, bias: torch.Tensor | None, channel_dim: int) -> torch.Tensor:
    """c * layer(x, w * m) + b: c scales the gated layer's output (computed without bias), which
    equals the layer with the weight c * w * m."""
    y = y * mask_scale
    if bias is None:
        return y
    shape = [1] * y.dim()
    shape[channel_dim] = -1
    return y + bias.to(y.dtype).view(shape)


# --- the functional forms ------------------------------------------------------------------------


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
    if dtype is not None and (dtype not in _WEIGHT_DTYPES
                              or (dtype is torch.float64) != (weight.dtype is torch.float64)):
        raise TypeError(f"dtype must be float32, bfloat16 or float16 (float64 only for a float64 weight), "
                        f"got {dtype} for a {weight.dtype} weight")
    impl, _ = _backend(backend, weight, weight.device, torch.jit.is_tracing())
    if penalty:
        mask_logits, penalty = _penalty_as_graph_input(impl, mask_logits, beta, hard, penalty, weight)
    return impl.gate(weight, mask_logits, beta, bool(hard), float(penalty), dtype or weight.dtype)


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
    tracing = torch.jit.is_tracing()
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if x.dim() < 1 or (not tracing and x.shape[-1] != weight.shape[1]):
        raise ValueError(f"x must have shape (..., {weight.shape[1]}) to match in_features, got {tuple(x.shape)}")
    impl, dtype, channel = _check_layer(x, weight, mask_logits, beta, bias, penalty, mask_scale, backend, tracing)
    if channel:
        bias = _gated_bias(impl, bias, mask_logits, beta, hard)
    if penalty:
        mask_logits, penalty = _penalty_as_graph_input(impl, mask_logits, beta, hard, penalty, weight)
    if mask_scale == 1.0:
        return impl.linear(x, weight, mask_logits, beta, bias, bool(hard), float(penalty), dtype)
    y = impl.linear(x, weight, mask_logits, beta, None, bool(hard), float(penalty), dtype)
    return _scale_output(y, mask_scale, bias, channel_dim=-1)


def _pair_of_ints(name: str, value) -> tuple[int, int]:
    """stride, padding or dilation as the (height, width) pair every backend takes."""
    if type(value) is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        return value  # the layers pass pairs already
    if isinstance(value, (tuple, list)) and len(value) == 1:
        value = value[0]
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        return tuple(value)
    raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")


def _numeric_padding(x: torch.Tensor, padding: str, kernel_size, stride, dilation):
    """(x, padding) with padding as numbers, as F.conv2d would pad for 'valid' or 'same': 'same'
    pads symmetrically where it can and puts the odd element on the right and bottom, in x."""
    if padding == "valid":
        return x, 0
    if padding != "same":
        raise ValueError(f"padding must be 'valid', 'same' or numbers, got {padding!r}")
    if _pair_of_ints("stride", stride) != (1, 1):
        raise ValueError("padding='same' is not supported for strided convolutions")
    totals = [d * (k - 1) for d, k in zip(_pair_of_ints("dilation", dilation), kernel_size)]
    if any(t % 2 for t in totals):
        x = F.pad(x, (0, totals[1] % 2, 0, totals[0] % 2))
    return x, tuple(t // 2 for t in totals)


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
    tracing = torch.jit.is_tracing()
    if weight.dim() != 4:
        raise ValueError(
            f"weight must be 4-D (out_channels, in_channels/groups, kH, kW), got shape {tuple(weight.shape)}")
    in_channels = weight.shape[1] * groups
    if x.dim() not in (3, 4) or (not tracing and x.shape[-3] != in_channels):
        raise ValueError(f"x must have shape (N, {in_channels}, H, W) or ({in_channels}, H, W) to match "
                         f"in_channels, got {tuple(x.shape)}")
    impl, dtype, channel = _check_layer(x, weight, mask_logits, beta, bias, penalty, mask_scale, backend, tracing)
    if channel:
        bias = _gated_bias(impl, bias, mask_logits, beta, hard)
    if penalty:
        mask_logits, penalty = _penalty_as_graph_input(impl, mask_logits, beta, hard, penalty, weight)
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    if isinstance(padding, str):
        x, padding = _numeric_padding(x, padding, weight.shape[2:], stride, dilation)
    stride, padding = _pair_of_ints("stride", stride), _pair_of_ints("padding", padding)
    dilation = _pair_of_ints("dilation", dilation)
    layer_bias = bias if mask_scale == 1.0 else None
    y = impl.conv2d(x, weight, mask_logits, beta, layer_bias, stride, padding, dilation, groups, bool(hard),
                    float(penalty), dtype)
    if mask_scale != 1.0:
        y = _scale_output(y, mask_scale, bias, channel_dim=1)
    return y.squeeze(0) if unbatched else y


def _gated_weight(x, weight, mask_logits, beta, bias, hard, penalty, backend, mask_scale, tracing, out_dim=0):
    """(compute dtype, c * w * m, bias) for the layers that gate their weight with the backend's
    gate and then call ATen (gated_conv1d, gated_hf_conv1d), after the checks every gated layer
    makes; the bias is gated with its unit under channel granularity. The kernels take one logit
    per leading row, so a weight whose units are its columns (out_dim 1) is gated transposed."""
    impl, dtype, channel = _check_layer(x, weight, mask_logits, beta, bias, penalty, mask_scale, backend, tracing,
                                        out_dim)
    if channel:
        bias = _gated_bias(impl, bias, mask_logits, beta, hard)
    if penalty:
        mask_logits, penalty = _penalty_as_graph_input(impl, mask_logits, beta, hard, penalty, weight)
    if channel and out_dim == 1:
        w_eff = impl.gate(weight.t(), mask_logits.t(), beta, bool(hard), float(penalty), dtype).t()
    else:
        w_eff = impl.gate(weight, mask_logits, beta, bool(hard), float(penalty), dtype)
    return dtype, (w_eff if mask_scale == 1.0 else w_eff * mask_scale), bias


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
    backend's gate (lam in its backward), then ATen's convolution."""
    tracing = torch.jit.is_tracing()
    if weight.dim() != 3:
        raise ValueError(f"weight must be 3-D (out_channels, in_channels/groups, kernel_size), got shape "
                         f"{tuple(weight.shape)}")
    in_channels = weight.shape[1] * groups
    if x.dim() not in (2, 3) or (not tracing and x.shape[-2] != in_channels):
        raise ValueError(f"x must have shape (N, {in_channels}, L) or ({in_channels}, L) to match in_channels, "
                         f"got {tuple(x.shape)}")
    dtype, w_eff, bias = _gated_weight(x, weight, mask_logits, beta, bias, hard, penalty, backend, mask_scale, tracing)
    return F.conv1d(x.to(dtype), w_eff, bias, stride, padding, dilation, groups)


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
    gate (lam in its backward), then torch.addmm as Conv1D computes."""
    tracing = torch.jit.is_tracing()
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (in_features, out_features), as Conv1D stores it, got shape "
                         f"{tuple(weight.shape)}")
    if x.dim() < 1 or (not tracing and x.shape[-1] != weight.shape[0]):
        raise ValueError(f"x must have shape (..., {weight.shape[0]}) to match in_features, got {tuple(x.shape)}")
    dtype, w_eff, bias = _gated_weight(x, weight, mask_logits, beta, bias, hard, penalty, backend, mask_scale,
                                       tracing, out_dim=1)
    flat = x.to(dtype).reshape(-1, x.shape[-1])
    y = flat @ w_eff if bias is None else torch.addmm(bias.to(w_eff.dtype), flat, w_eff)
    return y.view(*x.shape[:-1], weight.shape[1])


__all__ = ["gate", "gated_linear", "gated_conv2d", "gated_conv1d", "gated_hf_conv1d", "compute_dtype",
           "check_gate_args"]

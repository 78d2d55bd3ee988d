"""GatedLinear and GatedConv2d: nn.Linear and nn.Conv2d with a learned mask (docs/contract.md section 2);
GatedConv1d: the same for nn.Conv1d; GatedMultiheadAttention: nn.MultiheadAttention with both
projections gated; GatedHFConv1D: transformers' Conv1D (GPT-2's linear layers), without
importing transformers.

They take the plain layers' arguments, initialise the same way and keep their parameter names
(all but GatedHFConv1D subclass them); each adds
    mask_logits  s, float32 (float64 beside a float64 weight), = mask_init: one logit per weight
                 (granularity "weight", the paper's), or with granularity "channel" (all but the
                 attention) one per output unit, shape (out, 1, ...) ((1, nf) for GatedHFConv1D),
                 broadcast over the unit's weights and gating its bias too
    beta         temperature of the soft mask sigmoid(beta * s), >= 1
    hard         use the ticket mask 1[s > 0] instead (no gradient reaches s)
    penalty      lam: each backward pass through a call of the layer adds the gradient of
                 lam * sum(sigmoid(beta * s)), as if that term were in the loss, unscaled; where the
                 loss is scaled (GradScaler, gradient accumulation) or the layer is called more
                 than once per forward, leave it 0 and add lam * csext.mask_penalty(model) to the loss
    mask_scale   c, the effective weight is c * w * m (default 1; 1 / sigmoid(s0) is the authors'
                 mask, docs/contract.md section 1; their penalty is then c * lam, which the layer's
                 penalty does not include: set it yourself, as the search's --rescale does)
    backend      "auto", "torch", "cpp", "cuda" or "triton" (csext.backends)
beta, hard, penalty, mask_init and mask_scale travel in the state_dict (as `_extra_state`, a
float64 tensor, so that safetensors can hold it).
torch.fx.symbolic_trace records each layer's call as one node (gated_linear, gated_conv2d,
gated_conv1d, gated_hf_conv1d), with beta, hard, penalty and backend as they are when traced.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import functional, reference
from .functional import gated_conv1d, gated_conv2d, gated_hf_conv1d, gated_linear

# FX's symbolic tracing records these calls as nodes instead of tracing their checks, which
# branch on shapes (torch.fx.wrap patches the names this module calls them by).
torch.fx.wrap("gated_linear")
torch.fx.wrap("gated_conv2d")
torch.fx.wrap("gated_conv1d")
torch.fx.wrap("gated_hf_conv1d")


def _mask_logits_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if weight_dtype == torch.float64 else torch.float32


class _Gated:
    """What the gated layers add to their plain parent: mask logits, beta, hard, penalty."""

    weight: nn.Parameter
    mask_logits: nn.Parameter
    _out_dim = 0  # the weight's dimension that indexes output units

    def _mask_shape(self, weight_shape, granularity: str) -> tuple:
        """The mask logits' shape: weight's, or for channel granularity 1 on all but the output dimension."""
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be 'weight' or 'channel', got {granularity!r}")
        if granularity == "weight":
            return tuple(weight_shape)
        shape = [1] * len(weight_shape)
        shape[self._out_dim] = weight_shape[self._out_dim]
        return tuple(shape)

    @property
    def granularity(self) -> str:
        """'weight' (one mask logit per weight) or 'channel' (one per output unit), read from the
        mask logits' shape."""
        return "weight" if self.mask_logits.shape == self.weight.shape else "channel"

    def weights_per_logit(self) -> int:
        """How many weights each mask logit gates (1, or a unit's fan-in)."""
        return self.weight.numel() // max(self.mask_logits.numel(), 1)

    def _init_gate(self, mask_init: float, granularity: str = "weight") -> None:
        if not math.isfinite(mask_init):
            raise ValueError(f"mask_init must be a finite number, got {mask_init}")
        shape = self._mask_shape(self.weight.shape, granularity)
        self.mask_init = float(mask_init)
        self.beta = 1.0
        self.hard = False
        self.penalty = 0.0
        self.mask_scale = 1.0
        self.backend = "auto"
        self.mask_logits = nn.Parameter(
            torch.full(
                shape,
                self.mask_init,
                dtype=_mask_logits_dtype(self.weight.dtype),
                device=self.weight.device,
            )
        )

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if "mask_logits" in self._parameters:  # absent while the parent's __init__ runs
            with torch.no_grad():
                self.mask_logits.fill_(self.mask_init)

    def _gated_parameters(self) -> tuple:
        """(weight, mask_logits, bias) for the forward: read from _parameters, where
        nn.Module.__getattr__ would find them at several times the cost (a small layer's call
        counts it), or as attributes where they are not there (torch.nn.utils.parametrize and
        prune move them)."""
        params = self._parameters
        try:
            return params["weight"], params["mask_logits"], params["bias"]
        except KeyError:
            return self.weight, self.mask_logits, self.bias

    def mask(self) -> torch.Tensor:
        """The current mask (soft, or hard in ticket mode), detached from autograd."""
        with torch.no_grad():
            return reference.mask(self.mask_logits, self.beta, self.hard)

    def effective_weight(self) -> torch.Tensor:
        """mask_scale * w * m as the forward uses it, differentiable."""
        weight = functional.gate(
            self.weight,
            self.mask_logits,
            self.beta,
            hard=self.hard,
            penalty=self.penalty,
            dtype=functional.compute_dtype(self.weight),
            backend=self.backend,
        )
        return weight if self.mask_scale == 1.0 else self.mask_scale * weight

    @classmethod
    def _from_dense(cls, module: nn.Module, mask_init: float, granularity: str = "weight", **kwargs):
        gated = cls(**kwargs, bias=module.bias is not None, mask_init=mask_init, granularity=granularity,
                    device="meta")
        gated.weight = module.weight  # the same Parameter objects: no copy, optimizer state stays valid
        gated.bias = module.bias
        gated.mask_logits = nn.Parameter(
            torch.full(gated._mask_shape(module.weight.shape, granularity), float(mask_init),
                       dtype=_mask_logits_dtype(module.weight.dtype), device=module.weight.device)
        )
        gated.train(module.training)
        return gated

    def _apply(self, fn, recurse=True):
        # Mask logits follow device moves, and float32 <-> float64, but never drop to a lower
        # precision: model.half() or .to(torch.bfloat16) leaves them float32.
        mask_logits = self._parameters.pop("mask_logits", None)
        try:
            super()._apply(fn, recurse)
        finally:
            if mask_logits is not None:
                self._parameters["mask_logits"] = mask_logits
        if mask_logits is None:
            return self
        probe = fn(torch.empty(0, dtype=mask_logits.dtype, device=mask_logits.device))
        if probe.dtype in (torch.float32, torch.float64):
            keep_precision = fn
        else:
            def keep_precision(t):
                return t.to(device=probe.device)
        holder = nn.Module()
        holder.register_parameter("mask_logits", mask_logits)
        nn.Module._apply(holder, keep_precision, recurse=False)
        self._parameters["mask_logits"] = holder._parameters["mask_logits"]
        return self

    # beta, hard, penalty, mask_init and mask_scale travel in the state_dict as one float64 tensor,
    # in this order: formats that hold tensors only (safetensors, under Hugging Face's
    # save_pretrained and Trainer checkpoints) refused the dict this once was, which still loads.
    _STATE_FIELDS = ("beta", "hard", "penalty", "mask_init", "mask_scale")

    def get_extra_state(self) -> torch.Tensor:
        values = [float(getattr(self, name)) for name in self._STATE_FIELDS]
        return torch.tensor(values, dtype=torch.float64, device="cpu")  # not a default device's (meta)

    def set_extra_state(self, state) -> None:
        if isinstance(state, torch.Tensor):
            if state.shape != (len(self._STATE_FIELDS),):
                raise ValueError(f"_extra_state of a gated layer must be a tensor of {len(self._STATE_FIELDS)} values "
                                 f"({', '.join(self._STATE_FIELDS)}), got shape {tuple(state.shape)}")
            state = dict(zip(self._STATE_FIELDS, state.tolist()))
        functional.check_beta(state["beta"])
        functional.check_penalty(state["penalty"])
        self.beta = float(state["beta"])
        self.hard = bool(state["hard"])
        self.penalty = float(state["penalty"])
        self.mask_init = float(state.get("mask_init", self.mask_init))
        functional.check_mask_scale(state.get("mask_scale", 1.0))
        self.mask_scale = float(state.get("mask_scale", 1.0))

    def _gate_repr(self) -> str:
        scale = f", mask_scale={self.mask_scale:g}" if self.mask_scale != 1.0 else ""
        scale += ", granularity=channel" if self.granularity == "channel" else ""
        return f"mask_init={self.mask_init}, beta={self.beta:g}, hard={self.hard}, penalty={self.penalty:g}{scale}"


class GatedLinear(_Gated, nn.Linear):
    """nn.Linear whose weight is gated by a learned mask: y = x (w * m)^T + b."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, mask_init: float = 0.0,
                 device=None, dtype=None, granularity: str = "weight") -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_gate(mask_init, granularity)

    @classmethod
    def from_dense(cls, module: nn.Linear, mask_init: float = 0.0, granularity: str = "weight") -> "GatedLinear":
        """A GatedLinear that shares `module`'s weight and bias Parameters."""
        if not isinstance(module, nn.Linear):
            raise TypeError(f"module must be an nn.Linear, got {type(module).__name__}")
        return cls._from_dense(module, mask_init, granularity, in_features=module.in_features,
                               out_features=module.out_features)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight, mask_logits, bias = self._gated_parameters()
        return gated_linear(
            input, weight, mask_logits, self.beta, bias,
            hard=self.hard, penalty=self.penalty, backend=self.backend, mask_scale=self.mask_scale,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._gate_repr()}"


class _GatedConv(_Gated):
    """What GatedConv2d and GatedConv1d share: nn.ConvNd's arguments, from_dense, padding modes."""

    _plain: type  # the plain convolution, nn.Conv2d or nn.Conv1d

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", mask_init: float = 0.0,
                 device=None, dtype=None, granularity: str = "weight") -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                         device=device, dtype=dtype)
        self._init_gate(mask_init, granularity)

    @classmethod
    def from_dense(cls, module: nn.Module, mask_init: float = 0.0, granularity: str = "weight"):
        """A gated convolution that shares `module`'s weight and bias Parameters."""
        if not isinstance(module, cls._plain):
            raise TypeError(f"module must be an nn.{cls._plain.__name__}, got {type(module).__name__}")
        return cls._from_dense(
            module, mask_init, granularity,
            in_channels=module.in_channels, out_channels=module.out_channels,
            kernel_size=module.kernel_size, stride=module.stride, padding=module.padding,
            dilation=module.dilation, groups=module.groups, padding_mode=module.padding_mode,
        )

    def _padded(self, input: torch.Tensor):
        """(input, padding) for the convolution: as nn.ConvNd, a padding mode other than zeros pads
        explicitly and convolves unpadded."""
        if self.padding_mode == "zeros":
            return input, self.padding
        return F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode), (0,) * len(self.padding)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._gate_repr()}"


class GatedConv2d(_GatedConv, nn.Conv2d):
    """nn.Conv2d whose weight is gated by a learned mask: conv2d(x, w * m) + b."""

    _plain = nn.Conv2d

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        input, padding = self._padded(input)
        weight, mask_logits, bias = self._gated_parameters()
        return gated_conv2d(
            input, weight, mask_logits, self.beta, bias,
            self.stride, padding, self.dilation, self.groups,
            hard=self.hard, penalty=self.penalty, backend=self.backend, mask_scale=self.mask_scale,
        )


class GatedConv1d(_GatedConv, nn.Conv1d):
    """nn.Conv1d whose weight is gated by a learned mask: conv1d(x, w * m) + b."""

    _plain = nn.Conv1d

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        input, padding = self._padded(input)
        weight, mask_logits, bias = self._gated_parameters()
        return gated_conv1d(
            input, weight, mask_logits, self.beta, bias,
            self.stride, padding, self.dilation, self.groups,
            hard=self.hard, penalty=self.penalty, backend=self.backend, mask_scale=self.mask_scale,
        )


class GatedHFConv1D(_Gated, nn.Module):
    """Hugging Face transformers' Conv1D (GPT-2's attention and MLP layers), gated: y = x (w * m) + b.
    Despite its name a linear layer, whose weight is stored transposed, (in, out) = (nx, nf); the
    mask logits have that shape too, so its state_dict keeps Conv1D's keys and shapes."""

    _out_dim = 1  # weight is stored (in, out)

    def __init__(self, nf: int, nx: int, bias: bool = True, mask_init: float = 0.0, device=None, dtype=None,
                 granularity: str = "weight") -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.empty(nx, nf, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(nf, device=device, dtype=dtype)) if bias else None
        self._init_gate(mask_init, granularity)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Conv1D's initialisation (normal, std 0.02; zero bias), and mask_init again."""
        with torch.no_grad():
            nn.init.normal_(self.weight, std=0.02)
            if self.bias is not None:
                self.bias.zero_()
            self.mask_logits.fill_(self.mask_init)

    @classmethod
    def from_dense(cls, module: nn.Module, mask_init: float = 0.0, granularity: str = "weight") -> "GatedHFConv1D":
        """A GatedHFConv1D that shares the weight and bias Parameters of `module`, a transformers Conv1D."""
        if not is_hf_conv1d(module):
            raise TypeError(f"module must be a transformers Conv1D, got {type(module).__name__}")
        return cls._from_dense(module, mask_init, granularity, nf=module.nf, nx=module.weight.shape[0])

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight, mask_logits, bias = self._gated_parameters()
        return gated_hf_conv1d(
            input, weight, mask_logits, self.beta, bias,
            hard=self.hard, penalty=self.penalty, backend=self.backend, mask_scale=self.mask_scale,
        )

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}, bias={self.bias is not None}, {self._gate_repr()}"


class GatedMultiheadAttention(_Gated, nn.MultiheadAttention):
    """nn.MultiheadAttention with both projections gated: mask_logits gate in_proj_weight (the
    query, key and value projections stacked, (3 * embed_dim, embed_dim)), and out_proj is a
    GatedLinear. Key and value must have embed_dim features (one in_proj_weight). Its forward is
    nn.MultiheadAttention's general path with the effective weights; the inference fast path,
    which reads the parameters itself, is not taken."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim=None, vdim=None,
                 batch_first: bool = False, mask_init: float = 0.0, device=None, dtype=None) -> None:
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first,
                         device=device, dtype=dtype)
        if not self._qkv_same_embed_dim:
            raise ValueError(f"GatedMultiheadAttention needs kdim and vdim equal to embed_dim ({embed_dim}), "
                             f"got kdim={kdim}, vdim={vdim}")
        self._init_gate(mask_init)
        self.out_proj = GatedLinear.from_dense(self.out_proj, mask_init)

    @property
    def weight(self) -> nn.Parameter:
        """in_proj_weight, the weight mask_logits gate (named as the other gated layers' weight)."""
        return self.in_proj_weight

    def reset_parameters(self) -> None:
        """nn.MultiheadAttention's initialisation (which leaves out_proj's weight as it is), and
        mask_init in both projections' mask logits."""
        self._reset_parameters()
        with torch.no_grad():
            self.mask_logits.fill_(self.mask_init)
            self.out_proj.mask_logits.fill_(self.out_proj.mask_init)

    @classmethod
    def from_dense(cls, module: nn.MultiheadAttention, mask_init: float = 0.0) -> "GatedMultiheadAttention":
        """A GatedMultiheadAttention that shares `module`'s Parameters (out_proj's too)."""
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"module must be an nn.MultiheadAttention, got {type(module).__name__}")
        if not module._qkv_same_embed_dim:
            raise ValueError(f"GatedMultiheadAttention needs kdim and vdim equal to embed_dim ({module.embed_dim}), "
                             f"got kdim={module.kdim}, vdim={module.vdim}")
        gated = cls(module.embed_dim, module.num_heads, module.dropout, module.in_proj_bias is not None,
                    module.bias_k is not None, module.add_zero_attn, batch_first=module.batch_first,
                    mask_init=mask_init, device="meta")
        for name in ("in_proj_weight", "in_proj_bias", "bias_k", "bias_v"):
            setattr(gated, name, getattr(module, name))
        gated.mask_logits = nn.Parameter(torch.full_like(module.in_proj_weight, float(mask_init),
                                                         dtype=_mask_logits_dtype(module.in_proj_weight.dtype)))
        gated.out_proj = GatedLinear.from_dense(module.out_proj, mask_init)
        gated.train(module.training)
        return gated

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        if self.batch_first and batched:  # to (L, N, E), keeping query is key is value where it holds
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        out, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, self.effective_weight(), self.in_proj_bias,
            self.bias_k, self.bias_v, self.add_zero_attn, self.dropout, self.out_proj.effective_weight(),
            self.out_proj.bias, training=self.training, key_padding_mask=key_padding_mask,
            need_weights=need_weights, attn_mask=attn_mask, average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
        return (out.transpose(1, 0) if self.batch_first and batched else out), weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, {self._gate_repr()}"


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether `module` is exactly transformers' Conv1D, told by its class's name and module, so that
    transformers need not be imported (subclasses, which may compute otherwise, are not)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.split(".")[0] == "transformers"


GRANULARITIES = ("weight", "channel")
GATED_TYPES = (GatedLinear, GatedConv2d, GatedConv1d, GatedHFConv1D, GatedMultiheadAttention)

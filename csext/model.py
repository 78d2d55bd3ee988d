"""Whole-model helpers: turn a model's layers into gated ones and back, and steer them."""

import fnmatch
import sys
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from . import functional, reference
from .modules import (GATED_TYPES, GRANULARITIES, GatedConv1d, GatedConv2d, GatedHFConv1D, GatedLinear, GatedMultiheadAttention,
                      is_hf_conv1d)

# Exact types only: subclasses such as MultiheadAttention's out_proj are read by their owners
# through .weight directly, so gating them would silently do nothing (an attention is gated
# whole, out_proj with it).
_DENSE_TO_GATED = {nn.Linear: GatedLinear, nn.Conv2d: GatedConv2d, nn.Conv1d: GatedConv1d,
                   nn.MultiheadAttention: GatedMultiheadAttention}
GATEABLE = "nn.Linear, nn.Conv2d, nn.Conv1d, nn.MultiheadAttention or transformers Conv1D"


def gated_weight_name(module: nn.Module) -> str:
    """The name of the parameter a layer's mask logits gate: an attention's in_proj_weight (its
    out_proj is a layer of its own), every other layer's weight."""
    return "in_proj_weight" if isinstance(module, nn.MultiheadAttention) else "weight"


def _gated_type(module: nn.Module):
    """The gated class that replaces `module` in sparsify, or None (an attention whose key or
    value has other than embed_dim features, with three projection weights, is not gated)."""
    if is_hf_conv1d(module):
        return GatedHFConv1D
    if type(module) is nn.MultiheadAttention and not module._qkv_same_embed_dim:
        return None
    return _DENSE_TO_GATED.get(type(module))


def _check_model(model, caller: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be an nn.Module, got {type(model).__name__}")


def _gated_or_warn(model: nn.Module, caller: str, outcome: str = "nothing to do",
                   stacklevel: int = 3) -> list[tuple[str, nn.Module]]:
    """gated_modules(model), with a warning naming the model where there are none: the call then
    does nothing, which is rarely what was meant (a model not yet sparsified, or the wrong one)."""
    _check_model(model, caller)
    found = gated_modules(model)
    if not found:
        warnings.warn(f"{caller}: {type(model).__name__} has no gated layer (csext.sparsify gates them); {outcome}",
                      stacklevel=stacklevel)
    return found


def gated_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every gated layer, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, GATED_TYPES)]


# --- models sharded across ranks (FSDP2's fully_shard, tensor parallelism) ---------------------

GATHER_FIRST = ("gather the full state dict first (torch.distributed.checkpoint.state_dict.get_model_state_dict"
                "(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))), load it into an "
                "unsharded copy of the gated model, and call this on that copy")


def _is_dtensor(t) -> bool:
    """Whether `t` is a DTensor, of which each rank holds a part. Looked up without importing
    torch.distributed.tensor: a DTensor cannot exist before that module is imported."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(t, dtensor.DTensor)


def _whole(t: torch.Tensor) -> torch.Tensor:
    """`t`, or for a DTensor its value over all ranks, as a plain tensor (a collective: every rank
    must call; differentiable)."""
    return t.full_tensor() if _is_dtensor(t) else t


def refuse_sharded(model: nn.Module, caller: str, hint: str) -> None:
    """Raise if `model` holds DTensor parameters: `caller` rebuilds layers, which would fall out
    of the sharding's bookkeeping."""
    sharded = [name for name, p in model.named_parameters() if _is_dtensor(p)]
    if sharded:
        more = f" (and {len(sharded) - 1} more)" if len(sharded) > 1 else ""
        raise ValueError(f"{caller}: parameter {sharded[0]}{more} is sharded across ranks (a DTensor, as FSDP2's "
                         f"fully_shard or tensor parallelism leave it); {hint}")


Aliases = dict[int, tuple[nn.Module, list[str]]]


def module_aliases(model: nn.Module) -> Aliases:
    """Every qualified name each module of `model` sits at (a module shared by two parents has
    two), by id, with the module (which keeps the id its own)."""
    aliases: Aliases = {}
    for name, m in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(m), (m, []))[1].append(name)
    return aliases


def _replace(model: nn.Module, name: str, new: nn.Module, aliases: Aliases | None = None) -> nn.Module:
    """`new` in place of the submodule at `name`, and wherever else that module sits in the tree
    (module_aliases(model), taken before replacing; computed here if not given): a module shared
    by two parents is one layer, and stays one."""
    if name == "":
        return new
    if aliases is None:
        aliases = module_aliases(model)
    old = model.get_submodule(name)
    held, names = aliases.get(id(old), (old, [name]))
    for alias in names if held is old else [name]:
        parent_name, _, child = alias.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    return model


def _transformer_fast_path_off(module: nn.Module, args) -> None:
    """A forward pre-hook that does nothing: its presence keeps nn.TransformerEncoderLayer off
    its inference fast path, which reads the weights of linear1, linear2 and self_attn itself and
    would run them ungated (torch skips the fast path for a layer with hooks)."""


def keep_transformer_slow_paths(model: nn.Module) -> None:
    """Where a gated (or other replaced) layer sits in place of a TransformerEncoderLayer's
    linear1, linear2 or self_attn, turn off the fused inference paths of torch's transformer,
    which bypass the layers' forward: the encoder layer's (by a hook) and the encoder's
    nested-tensor one. Where all are plain again (after finalize), turn them back on."""
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer):
            hooked = [k for k, hook in module._forward_pre_hooks.items() if hook is _transformer_fast_path_off]
            replaced = not (type(module.linear1) is nn.Linear and type(module.linear2) is nn.Linear
                            and type(module.self_attn) is nn.MultiheadAttention)
            if replaced and not hooked:
                module.register_forward_pre_hook(_transformer_fast_path_off)
            for key in hooked if not replaced else ():
                del module._forward_pre_hooks[key]
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder):
            off = any(_transformer_fast_path_off in layer._forward_pre_hooks.values() for layer in module.layers)
            if off and "_csext_use_nested_tensor" not in vars(module):
                module._csext_use_nested_tensor, module.use_nested_tensor = module.use_nested_tensor, False
            elif not off and "_csext_use_nested_tensor" in vars(module):
                module.use_nested_tensor = vars(module).pop("_csext_use_nested_tensor")


def sparsify(model: nn.Module, mask_init: float = 0.0, penalty: float = 0.0, exclude=(),
             granularity: str = "weight") -> list[nn.Module]:
    """Replace, in place, every nn.Linear, nn.Conv2d, nn.Conv1d and nn.MultiheadAttention of
    `model` (and transformers' Conv1D, GPT-2's linear layers) by its gated form, sharing the
    weight and bias Parameters. `exclude` holds qualified module names or glob patterns ("fc",
    "layer1.*") to leave dense. Returns the gated modules, old and new, in module order.

    If `model` is itself such a layer it cannot be replaced in place: use the gated class's
    from_dense (GatedLinear.from_dense, GatedConv2d.from_dense, ...) for that. `granularity`
    "channel" gives each layer one mask logit per output unit (attentions have none: exclude them).
    """
    _check_model(model, "sparsify")
    functional.check_penalty(penalty)
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be 'weight' or 'channel', got {granularity!r}")
    refuse_sharded(model, "sparsify", "call csext.sparsify before fully_shard, so that the mask logits are "
                                      "sharded with the weights")
    if isinstance(exclude, str):
        exclude = (exclude,)
    patterns = tuple(exclude)
    lazy = [name for name, m in model.named_modules() if isinstance(m, nn.modules.lazy.LazyModuleMixin)
            and m.has_uninitialized_params() and getattr(m, "cls_to_become", None) in _DENSE_TO_GATED]
    if lazy:
        # A lazy layer becomes an nn.Linear / nn.Conv2d only at its first forward: skipping it would
        # leave it dense with no word said.
        raise ValueError(
            f"sparsify: {', '.join(lazy)} {'is a lazy module' if len(lazy) == 1 else 'are lazy modules'} whose "
            f"shapes are not known yet; run one forward "
            f"pass (for example on a batch of the data) to materialise them, then call sparsify"
        )
    candidates = [(name, m) for name, m in model.named_modules() if _gated_type(m) is not None]
    not_gateable = _not_gateable(model)
    unused = [p for p in patterns
              if not any(fnmatch.fnmatchcase(name, p) for name in [n for n, _ in candidates] + list(not_gateable))]
    if unused:
        raise ValueError(f"exclude: {unused} match no {GATEABLE} module of the model")
    if _gated_type(model) is not None and not any(fnmatch.fnmatchcase("", p) for p in patterns):
        raise TypeError(
            f"sparsify replaces submodules in place; model is itself an {type(model).__name__}: "
            f"use {_gated_type(model).__name__}.from_dense(model)"
        )
    chosen = [(name, m) for name, m in candidates if not any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    holders: dict[int, list[tuple[nn.Module, str]]] = {}  # id(Parameter) -> the modules holding it
    for owner_name, owner in model.named_modules(remove_duplicate=False):
        for param_name, p in owner.named_parameters(recurse=False):
            holders.setdefault(id(p), []).append((owner, f"{owner_name}.{param_name}" if owner_name else param_name))
    for name, module in chosen:
        weight = getattr(module, gated_weight_name(module))
        tied = sorted({held_as for owner, held_as in holders[id(weight)] if owner is not module})
        if tied:
            raise ValueError(
                f"sparsify: {name}.weight is tied to {', '.join(tied)} (one Parameter in two modules): a mask on "
                f"{name} would gate one use of it and not the other; pass exclude=[{name!r}] to leave it dense, "
                f"or untie the weights first"
            )
    if granularity == "channel":
        attentions = [name for name, m in chosen if _gated_type(m) is GatedMultiheadAttention]
        if attentions:
            raise ValueError(f"sparsify: granularity='channel' has no form for nn.MultiheadAttention ({', '.join(attentions)}); "
                             f"pass exclude={attentions!r} to leave it dense")
    aliases = module_aliases(model)
    for name, module in chosen:
        options = {} if granularity == "weight" else {"granularity": granularity}
        gated = _gated_type(module).from_dense(module, mask_init=mask_init, **options)
        for part in gated.modules():  # an attention and its out_proj
            if isinstance(part, GATED_TYPES):
                part.penalty = float(penalty)
        _replace(model, name, gated, aliases)
    keep_transformer_slow_paths(model)
    gated = [m for _, m in gated_modules(model)]
    left = [f"{name or type(model).__name__} ({why})" for name, why in not_gateable.items()
            if not any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    if not gated and not patterns:
        warnings.warn(f"sparsify: {type(model).__name__} has no {GATEABLE} layer to gate"
                      + (f"; left dense: {'; '.join(left)}" if left else ""), stacklevel=2)
    elif left:
        warnings.warn(f"sparsify: left dense: {'; '.join(left)}; name them in exclude to leave them dense without "
                      f"this warning", stacklevel=2)
    return gated


def _not_gateable(model: nn.Module) -> dict[str, str]:
    """{name: why} of the layers like those sparsify gates that it cannot gate: subclasses, and
    attentions with three projection weights (an attention's out_proj goes with its attention)."""
    owned = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    found = {}
    for name, m in model.named_modules():
        if (not isinstance(m, tuple(_DENSE_TO_GATED)) or isinstance(m, GATED_TYPES) or _gated_type(m) is not None
                or id(m) in owned):
            continue
        if type(m) is nn.MultiheadAttention:
            found[name] = ("nn.MultiheadAttention with kdim or vdim other than embed_dim: three projection weights, "
                           "where GatedMultiheadAttention gates one in_proj_weight")
        else:
            base = next(t for t in _DENSE_TO_GATED if isinstance(m, t)).__name__
            found[name] = (f"{type(m).__name__}, a subclass of nn.{base}, which may compute otherwise or be read by "
                           f"its owner through .weight")
    return found


def set_beta(model: nn.Module, beta: float) -> None:
    """Set the temperature of every gated layer."""
    functional.check_beta(beta)
    for _, m in _gated_or_warn(model, "set_beta"):
        m.beta = float(beta)


def set_hard(model: nn.Module, hard: bool = True) -> None:
    """Switch every gated layer to the ticket mask 1[s > 0] (or back to the soft mask)."""
    for _, m in _gated_or_warn(model, "set_hard"):
        m.hard = bool(hard)


def set_penalty(model: nn.Module, penalty: float) -> None:
    """Set lam, applied in the backward of every gated layer (0 to add mask_penalty yourself, as
    under GradScaler, gradient accumulation or a layer called twice per forward: README "Use")."""
    functional.check_penalty(penalty)
    for _, m in _gated_or_warn(model, "set_penalty"):
        m.penalty = float(penalty)


def mask_penalty(model: nn.Module) -> torch.Tensor:
    """P = sum over gated layers of sum(sigmoid(beta * s)), a channel's logit counted once per weight
    it gates, differentiable (no gradient reaches the mask logits of a layer in hard mode), as a
    float32 scalar (float64 if mask logits are). For logging, or to add lam * P to the loss
    yourself. On a model sharded by FSDP2's fully_shard it sums over all ranks' shards, so every
    rank must call it."""
    _check_model(model, "mask_penalty")
    # a layer in hard mode passes no gradient to its mask logits, as its fused penalty passes none
    terms = [_whole(reference.penalty_term(m.mask_logits.detach() if m.hard else m.mask_logits, m.beta,
                                           m.weights_per_logit()))
             for _, m in gated_modules(model)]
    if not terms:
        raise ValueError("mask_penalty: the model has no gated layers (call csext.sparsify first)")
    return torch.stack(terms).sum()


@dataclass
class SparsityReport:
    """Fraction of gated weights kept by the hard mask s > 0, per layer and in total."""

    per_layer: dict[str, float] = field(default_factory=dict)
    kept: int = 0
    total: int = 0

    @property
    def remaining(self) -> float:
        return self.kept / self.total if self.total else 1.0

    def as_dict(self) -> dict:
        return {"remaining": self.remaining, "kept": self.kept, "total": self.total, "per_layer": dict(self.per_layer)}

    def __str__(self) -> str:
        width = max([len(n) for n in self.per_layer] + [5])
        lines = [f"{'layer':<{width}}  remaining"]
        lines += [f"{name:<{width}}  {frac:9.4%}" for name, frac in self.per_layer.items()]
        lines.append(f"{'total':<{width}}  {self.remaining:9.4%}  ({self.kept} of {self.total} weights)")
        return "\n".join(lines)


@torch.no_grad()
def sparsity_report(model: nn.Module) -> SparsityReport:
    """Per-layer and total fraction of gated weights remaining under the hard mask. On a model
    sharded by FSDP2's fully_shard it counts all ranks' shards, so every rank must call it."""
    report = SparsityReport()
    for name, m in _gated_or_warn(model, "sparsity_report", "the report counts no weights", stacklevel=4):
        per_logit = m.weights_per_logit()  # a channel's logit keeps or removes all its weights
        kept = int(_whole((m.mask_logits > 0).sum())) * per_logit
        total = m.mask_logits.numel() * per_logit
        report.per_layer[name or type(m).__name__] = kept / total if total else 1.0
        report.kept += kept
        report.total += total
    return report


def empty_plain(module: nn.Module) -> nn.Module:
    """The plain layer (nn.Linear, nn.Conv2d, nn.Conv1d, transformers Conv1D) of a gated layer's
    (or plain one's) shape, on the meta device: its weight and bias are to be set."""
    if isinstance(module, nn.Linear):
        return nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    if isinstance(module, GatedHFConv1D) or is_hf_conv1d(module):
        from transformers.pytorch_utils import Conv1D  # a GatedHFConv1D came from a transformers model

        with torch.device("meta"):
            return Conv1D(module.nf, module.weight.shape[0])
    convolution = nn.Conv1d if isinstance(module, nn.Conv1d) else nn.Conv2d
    return convolution(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                       module.dilation, module.groups, module.bias is not None, module.padding_mode, device="meta")


@torch.no_grad()
def _plain(module: nn.Module) -> nn.Module:
    """The plain layer holding `module`'s c * w * 1[s > 0] (an attention's out_proj finalized with it)."""
    weight = reference.gate(module.weight, module.mask_logits, module.beta, hard=True) * module.mask_scale
    if isinstance(module, GatedMultiheadAttention):
        return _plain_attention(module, weight)
    plain = empty_plain(module)
    plain.weight = nn.Parameter(weight, requires_grad=module.weight.requires_grad)
    plain.bias = module.bias
    if module.granularity == "channel" and module.bias is not None:  # a unit gated off takes its bias
        bias = reference.gate(module.bias, module.mask_logits.reshape(module.bias.shape), module.beta, hard=True)
        plain.bias = nn.Parameter(bias, requires_grad=module.bias.requires_grad)
    if isinstance(module, GatedHFConv1D) and module.bias is None:  # Conv1D always adds one
        plain.bias = nn.Parameter(weight.new_zeros(module.nf), requires_grad=False)
    plain.train(module.training)
    return plain


def plain_attention_like(module: nn.MultiheadAttention) -> nn.MultiheadAttention:
    """A plain nn.MultiheadAttention of `module`'s configuration sharing its biases (in_proj_bias,
    bias_k, bias_v, out_proj.bias); its weights, on the meta device, are to be set."""
    plain = nn.MultiheadAttention(module.embed_dim, module.num_heads, module.dropout, module.in_proj_bias is not None,
                                  module.bias_k is not None, module.add_zero_attn, batch_first=module.batch_first,
                                  device="meta")
    for name in ("in_proj_bias", "bias_k", "bias_v"):
        setattr(plain, name, getattr(module, name))
    plain.out_proj.bias = module.out_proj.bias  # out_proj keeps its type, NonDynamicallyQuantizableLinear
    plain.train(module.training)
    return plain


def _plain_attention(module: GatedMultiheadAttention, in_proj_weight: torch.Tensor) -> nn.MultiheadAttention:
    plain = plain_attention_like(module)
    plain.in_proj_weight = nn.Parameter(in_proj_weight, requires_grad=module.in_proj_weight.requires_grad)
    out = _plain(module.out_proj) if isinstance(module.out_proj, GATED_TYPES) else module.out_proj
    plain.out_proj.weight = out.weight
    return plain


def in_tree(model: nn.Module, name: str, module: nn.Module) -> bool:
    """Whether `module` still sits at `name` in `model` (an attention's out_proj is replaced with it)."""
    try:
        return model.get_submodule(name) is module
    except AttributeError:
        return False


def finalize(model: nn.Module) -> nn.Module:
    """Replace, in place, every gated layer by its plain form (nn.Linear, nn.Conv2d, nn.Conv1d,
    nn.MultiheadAttention, transformers Conv1D) holding w * 1[s > 0]. Returns the model (or the
    new layer, when `model` is itself a gated layer)."""
    _check_model(model, "finalize")
    refuse_sharded(model, "finalize", GATHER_FIRST)
    aliases = module_aliases(model)
    for name, module in _gated_or_warn(model, "finalize"):
        if in_tree(model, name, module):
            model = _replace(model, name, _plain(module), aliases)
    keep_transformer_slow_paths(model)  # plain layers again: torch's fused paths are right
    return model

"""Tickets in other forms: torch.nn.utils.prune's, and a sparse one for inference.

    to_prune_form(model)      gated layers -> plain layers pruned by torch.nn.utils.prune
                              (weight_orig = c * w, weight_mask = 1[s > 0])
    from_prune_form(model)    back: layers carrying weight_orig / weight_mask -> gated layers
                              in hard mode with that mask
    to_sparse(model)          gated (or finalized) nn.Linear and gated Conv1D layers -> SparseLinear,
                              which holds its weight in torch's CSR layout and multiplies with
                              torch.sparse; gated convolutions and attentions are finalized
                              (dense, pruned weights zero)
    shrink(sequential)        physically smaller dense layers where whole output neurons or
                              channels are gated off (in an nn.Sequential of finalized layers)

All work in place on `model` and return it (or the new layer, for a model that is one layer).
"""

import torch
from torch import nn
from torch.nn.utils import prune

from . import reference
from .model import (GATHER_FIRST, _gated_type, _plain, _replace, empty_plain, gated_modules, in_tree,
                    keep_transformer_slow_paths, module_aliases, plain_attention_like, refuse_sharded)
from .modules import GatedConv1d, GatedConv2d, GatedHFConv1D, GatedLinear, GatedMultiheadAttention


def _prune(plain: nn.Module, name: str, gated: nn.Module) -> None:
    """`plain`'s parameter `name` set to mask_scale * w of `gated` and pruned by its hard mask."""
    setattr(plain, name, nn.Parameter((gated.weight * gated.mask_scale).detach().clone(),
                                      requires_grad=gated.weight.requires_grad))
    with torch.enable_grad():  # the pruned `name` tracks `name`_orig's gradient at once, as prune's own call leaves it
        prune.custom_from_mask(plain, name, reference.hard_mask(gated.mask_logits).to(gated.weight.dtype))


def _hard_from(gated: nn.Module, mask: torch.Tensor | None) -> nn.Module:
    """`gated` in hard mode with mask logits +1 where `mask` (all of them where None) is nonzero, else -1."""
    keep = torch.ones_like(gated.mask_logits, dtype=torch.bool) if mask is None else mask != 0
    gated.mask_logits.copy_(torch.where(keep, 1.0, -1.0).to(gated.mask_logits.dtype))
    gated.hard = True
    return gated


@torch.no_grad()
def to_prune_form(model: nn.Module) -> nn.Module:
    """Every gated layer becomes its plain form (nn.Linear, nn.Conv2d, transformers Conv1D,
    nn.MultiheadAttention) pruned with prune.custom_from_mask: weight_orig holds mask_scale * w,
    weight_mask the hard mask (an attention: in_proj_weight_orig / _mask, and out_proj's)."""
    refuse_sharded(model, "to_prune_form", GATHER_FIRST)
    aliases = module_aliases(model)
    for name, module in gated_modules(model):
        if not in_tree(model, name, module):  # an attention's out_proj, pruned with it
            continue
        if isinstance(module, GatedMultiheadAttention):
            plain = plain_attention_like(module)
            _prune(plain, "in_proj_weight", module)
            _prune(plain.out_proj, "weight", module.out_proj)
        else:
            plain = empty_plain(module)
            plain.bias = module.bias
            plain.train(module.training)
            _prune(plain, "weight", module)
        model = _replace(model, name, plain, aliases)
    return model


@torch.no_grad()
def from_prune_form(model: nn.Module) -> nn.Module:
    """Every nn.Linear / nn.Conv2d / transformers Conv1D pruned by torch.nn.utils.prune
    (weight_orig and weight_mask), and every nn.MultiheadAttention with a pruned in_proj_weight,
    becomes a gated layer in hard mode: weight = weight_orig, mask logits +1 where the mask is
    nonzero and -1 elsewhere."""
    refuse_sharded(model, "from_prune_form", GATHER_FIRST)
    found = [(n, m) for n, m in model.named_modules()
             if (_gated_type(m) is not None and hasattr(m, "weight_orig") and hasattr(m, "weight_mask"))
             or (type(m) is nn.MultiheadAttention and hasattr(m, "in_proj_weight_orig"))]
    aliases = module_aliases(model)
    for name, module in found:
        if isinstance(module, nn.MultiheadAttention):
            plain = plain_attention_like(module)
            plain.in_proj_weight = module.in_proj_weight_orig
            out = module.out_proj
            plain.out_proj.weight = getattr(out, "weight_orig", out.weight)
            gated = _hard_from(GatedMultiheadAttention.from_dense(plain), module.in_proj_weight_mask)
            _hard_from(gated.out_proj, getattr(out, "weight_mask", None))
        else:
            plain = empty_plain(module)
            plain.weight = module.weight_orig
            plain.bias = _unpruned_bias(module)
            plain.train(module.training)
            gated = _hard_from(_gated_type(module).from_dense(plain), module.weight_mask)
        model = _replace(model, name, gated, aliases)
    keep_transformer_slow_paths(model)
    return model


def _unpruned_bias(module: nn.Module) -> nn.Parameter | None:
    """`module`'s bias as a Parameter: a bias pruned by torch.nn.utils.prune (bias_orig and
    bias_mask) has its pruned entries zero, as the gated layer has no mask for its bias."""
    if not hasattr(module, "bias_orig"):
        return module.bias
    orig = module.bias_orig
    return nn.Parameter((orig * module.bias_mask).detach().clone(), requires_grad=orig.requires_grad)


class SparseLinear(nn.Module):
    """y = x W^T + b with W in torch's CSR layout: inference only (no gradient)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight.detach().to_sparse_csr())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = torch.sparse.mm(self.weight, flat.t()).t()  # (W x^T)^T: CSR on the left
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A saved weight has its own nonzeros (another ticket's, or a dense nn.Linear's weight),
        # which copy_ into this CSR buffer cannot take: it replaces the buffer instead.
        key = prefix + "weight"
        weight = state_dict.get(key)
        if isinstance(weight, torch.Tensor):
            expected = (self.out_features, self.in_features)
            if tuple(weight.shape) != expected:
                error_msgs.append(f"size mismatch for {key}: expected {expected}, got {tuple(weight.shape)}")
                return
            csr = weight if weight.layout == torch.sparse_csr else weight.to_sparse_csr()
            self.weight = csr.to(device=self.weight.device, dtype=self.weight.dtype, copy=True)
            state_dict = {**state_dict, key: self.weight}  # what the parent then copies is that buffer
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        nnz = self.weight.values().numel()
        return f"in_features={self.in_features}, out_features={self.out_features}, nonzeros={nnz}"


@torch.no_grad()
def to_sparse(model: nn.Module) -> nn.Module:
    """Every gated nn.Linear and transformers Conv1D (its weight c * w * 1[s > 0]) and every plain
    nn.Linear whose weight is mostly zero (more than half, as finalize leaves it) becomes a
    SparseLinear; gated convolutions and attentions are finalized (dense, pruned weights zero)."""
    refuse_sharded(model, "to_sparse", GATHER_FIRST)
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, (GatedLinear, GatedHFConv1D))
               or (type(m) is nn.Linear and (m.weight == 0).float().mean() > 0.5)]
    aliases = module_aliases(model)
    for name, module in gated_modules(model):
        if isinstance(module, (GatedConv2d, GatedConv1d, GatedMultiheadAttention)):  # attention: out_proj with it
            model = _replace(model, name, _plain(module), aliases)
    for name, module in targets:
        if not in_tree(model, name, module):
            continue
        if isinstance(module, (GatedLinear, GatedHFConv1D)):
            weight = reference.gate(module.weight, module.mask_logits, module.beta, hard=True) * module.mask_scale
            if isinstance(module, GatedHFConv1D):  # stored (in, out)
                weight = weight.t()
        else:
            weight = module.weight
        model = _replace(model, name, SparseLinear(weight, module.bias), aliases)
    keep_transformer_slow_paths(model)
    return model




# Elementwise layers a dead unit's constant output passes through unchanged in kind.
_ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.Identity, nn.Dropout)


@torch.no_grad()
def shrink(model: nn.Sequential) -> nn.Sequential:
    """Physically smaller dense layers where whole units are gated off, in an nn.Sequential of
    finalized (plain) layers. Between a Linear and the next Linear (through elementwise
    activations) a hidden neuron goes when the next layer reads nothing of it (its column is all
    zero) or when nothing reaches it (its row is all zero: its constant output act(bias) is
    folded into the next layer's bias). Between two Conv2d the same holds for channels, a
    row-dead channel only where act(bias) is 0 (zero padding makes any other constant inexact).
    Works in place on the Sequential (and nested ones) and returns it."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"shrink takes an nn.Sequential, got {type(model).__name__}")
    refuse_sharded(model, "shrink", GATHER_FIRST)
    for child in model:
        if isinstance(child, nn.Sequential):
            shrink(child)
    layers = list(model)
    for i, layer in enumerate(layers):
        if type(layer) not in (nn.Linear, nn.Conv2d):  # exact types: gated layers are finalized first
            continue
        j = i + 1
        while j < len(layers) and isinstance(layers[j], _ELEMENTWISE):
            j += 1
        if j == len(layers) or type(layers[j]) is not type(layer):
            continue
        following = layers[j]
        if isinstance(layer, nn.Conv2d) and (layer.groups != 1 or following.groups != 1):
            continue
        dead = (layer.weight.flatten(1) == 0).all(1)  # no input reaches the unit: it outputs act(bias)
        unused = (following.weight.transpose(0, 1).flatten(1) == 0).all(1)  # nothing reads the unit
        bias = layer.bias if layer.bias is not None else torch.zeros(layer.weight.shape[0], device=layer.weight.device)
        constant = bias.view(1, -1, *([1] * (layer.weight.dim() - 2)))  # a dead unit outputs act(bias)
        for activation in layers[i + 1:j]:
            if not isinstance(activation, nn.Dropout):  # dropout is the identity at inference
                constant = activation(constant)
        constant = constant.flatten()
        if isinstance(layer, nn.Conv2d):
            dead &= constant == 0
        removed = dead | unused
        if not removed.any() or removed.all():
            continue
        alive = ~removed
        following_bias = following.bias
        if isinstance(layer, nn.Linear):  # the dead neurons' constant output, folded in
            folded = following.weight[:, dead] @ constant[dead]
            following_bias = folded if following_bias is None else following_bias + folded
            smaller = nn.Linear(layer.in_features, int(alive.sum()), bias=layer.bias is not None)
            after = nn.Linear(int(alive.sum()), following.out_features, bias=following_bias is not None)
        else:
            smaller = nn.Conv2d(layer.in_channels, int(alive.sum()), layer.kernel_size, layer.stride, layer.padding,
                                layer.dilation, 1, layer.bias is not None, layer.padding_mode)
            after = nn.Conv2d(int(alive.sum()), following.out_channels, following.kernel_size, following.stride,
                              following.padding, following.dilation, 1, following.bias is not None,
                              following.padding_mode)
        smaller.weight = nn.Parameter(layer.weight[alive].clone())
        if layer.bias is not None:
            smaller.bias = nn.Parameter(layer.bias[alive].clone())
        after.weight = nn.Parameter(following.weight[:, alive].clone())
        if following_bias is not None:
            after.bias = nn.Parameter(following_bias.clone())
        model[i], model[j] = smaller.to(layer.weight.device), after.to(layer.weight.device)
        layers[i], layers[j] = model[i], model[j]
    return model


__all__ = ["to_prune_form", "from_prune_form", "to_sparse", "shrink", "SparseLinear"]

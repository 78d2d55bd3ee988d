"""Tickets in other forms: torch.nn.utils.prune's, and a sparse one for inference.

    to_prune_form(model)      gated layers -> plain layers pruned by torch.nn.utils.prune
                              (weight_orig = c * w, weight_mask = 1[s > 0])
    from_prune_form(model)    back: layers carrying weight_orig / weight_mask -> gated layers
                              in hard mode with that mask
    to_sparse(model)          gated (or finalized) nn.Linear and gated Conv1D layers -> SparseLinear,
                              which holds its weight in torch's CSR layout and multiplies with
                              torch.sparse; gated convolutions and attentions are finalized
                              (dense, pruned weights zero)
    shrink(model)             a finalized ticket as a physically smaller dense network, where
                              whole output units are gated off (an nn.Sequential, or one of the
                              package's networks)

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




# Layers between two weighted layers that act on each channel alone, so that a channel whose
# value is a constant stays one: elementwise ones, and poolings without zero padding.
_ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.Identity, nn.Dropout, nn.ReLU6,
                nn.ELU, nn.Hardtanh, nn.Hardswish)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d,
          nn.AdaptiveMaxPool2d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


class _Slot:
    """Where a layer of a chain sits: parent.name (or parent[index]), so that it can be replaced."""

    def __init__(self, parent: nn.Module, name: str):
        self.parent, self.name = parent, name

    def get(self) -> nn.Module:
        return getattr(self.parent, self.name)

    def set(self, module: nn.Module) -> None:
        setattr(self.parent, self.name, module)


# A step of a network's forward that is no module of it: a global average pooling then flatten
# (VGG-16's and ResNet-20's heads), or a ReLU written as a function (ResNet-20's blocks).
_GLOBAL_POOL = "global average pool and flatten"
_RELU = "relu"


def _sequence(module: nn.Module) -> list:
    """The leaf layers of an nn.Sequential in forward order, nested Sequentials expanded."""
    chain = []
    for name, child in module.named_children():
        chain += _sequence(child) if isinstance(child, nn.Sequential) else [_Slot(module, name)]
    return chain


def _chains(model: nn.Module) -> list[list]:
    """The chains of layers that shrink can read and rebuild: an nn.Sequential's layers, or those
    a network names itself with a method `shrink_chains()`: lists of qualified module names in the
    order its forward runs them, with "relu" for a ReLU applied functionally and "global average
    pool and flatten" (csext.experiments.nets's networks do; a residual block's chain is its inner
    one, as the channels of its output feed a sum with the shortcut's and stay as they are)."""
    if isinstance(model, nn.Sequential):
        return [_sequence(model)]
    names = getattr(model, "shrink_chains", None)
    if names is None:
        raise TypeError(f"shrink takes an nn.Sequential or a network with shrink_chains() (the package's mlp, "
                        f"lenet300, cnn1d, conv4, vgg16, resnet20), got {type(model).__name__}")
    return [[_step(model, name) for name in chain] for chain in names()]


def _step(model: nn.Module, name: str):
    if name in (_RELU, _GLOBAL_POOL):
        return name
    parent, _, attribute = name.rpartition(".")
    return _Slot(model.get_submodule(parent) if parent else model, attribute)


def _constant_through(step, constant: torch.Tensor):
    """The per-channel constant after `step`, or None where the step does not keep a constant
    channel constant (or is not known to act per channel)."""
    if step == _RELU:
        return torch.relu(constant)
    if step == _GLOBAL_POOL:
        return constant
    module = step.get()
    if isinstance(module, _BATCHNORMS):
        if module.training or module.running_mean is None:
            return None  # batch statistics: a constant channel is not read as it was
        scale = module.weight if module.affine else torch.ones_like(constant)
        shift = module.bias if module.affine else torch.zeros_like(constant)
        return (constant - module.running_mean) * torch.rsqrt(module.running_var + module.eps) * scale + shift
    if isinstance(module, nn.Dropout):
        return constant  # the identity at inference
    if isinstance(module, _ELEMENTWISE):
        return module(constant.view(1, -1)).view(-1)
    if isinstance(module, _POOLS + (nn.Flatten,)):  # flatten: a channel's constant fills its features
        return constant
    if isinstance(module, nn.AvgPool2d) and module.padding in (0, (0, 0)):
        return constant
    return None


def _slice_batchnorm(module: nn.Module, alive: torch.Tensor) -> nn.Module:
    smaller = type(module)(int(alive.sum()), module.eps, module.momentum, module.affine,
                           module.track_running_stats, device=module.running_mean.device)
    for name in ("weight", "bias"):
        if getattr(module, name) is not None:
            setattr(smaller, name, nn.Parameter(getattr(module, name)[alive].clone()))
    for name in ("running_mean", "running_var"):
        setattr(smaller, name, getattr(module, name)[alive].clone())
    smaller.num_batches_tracked = module.num_batches_tracked.clone()
    smaller.train(module.training)
    return smaller


def _layer_like(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A plain layer of `layer`'s kind and settings holding `weight` and `bias`."""
    if isinstance(layer, nn.Linear):
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    else:
        new = type(layer)(weight.shape[1], weight.shape[0], layer.kernel_size, layer.stride, layer.padding,
                          layer.dilation, 1, bias is not None, layer.padding_mode, device="meta")
    new.weight = nn.Parameter(weight.clone(), requires_grad=layer.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.clone())
    new.train(layer.training)
    return new


def _shrink_pair(chain: list, i: int, j: int) -> None:
    """Remove the output units of chain[i] (a Linear or convolution) that chain[j], the next
    weighted layer, can do without: those it does not read (its columns are zero), and those that
    nothing reaches (zero row), whose constant output is folded into chain[j]'s bias where that is
    exact (a Linear, an unpadded convolution, or a constant 0)."""
    layer, following = chain[i].get(), chain[j].get()
    between = chain[i + 1:j]
    flatten = [k for k, step in enumerate(between) if step == _GLOBAL_POOL
               or (isinstance(step, _Slot) and isinstance(step.get(), nn.Flatten))]
    if isinstance(layer, nn.Linear) != isinstance(following, nn.Linear) and not flatten:
        return
    if not isinstance(following, nn.Linear) and (type(layer) is not type(following) or flatten):
        return
    if getattr(layer, "groups", 1) != 1 or getattr(following, "groups", 1) != 1:
        return
    units = layer.weight.shape[0]
    per_unit = 1
    if isinstance(following, nn.Linear) and not isinstance(layer, nn.Linear):  # a channel is per_unit features
        if following.in_features % units:
            return
        per_unit = following.in_features // units
    constant = layer.bias.detach().clone() if layer.bias is not None else layer.weight.new_zeros(units)
    for step in between:
        constant = _constant_through(step, constant)
        if constant is None:
            return
    columns = following.weight.transpose(0, 1).reshape(units, per_unit, following.weight.shape[0], -1)
    unused = (columns == 0).flatten(1).all(1)  # nothing of the unit is read
    dead = (layer.weight.flatten(1) == 0).all(1)  # no input reaches the unit: a constant
    padded = not isinstance(following, nn.Linear) and any(p != 0 for p in following.padding)
    if padded:  # zero padding makes a constant channel's contribution vary with position
        dead &= constant == 0
    removed = dead | unused
    if not removed.any() or removed.all():
        return
    alive = ~removed
    # The dead units' constants, read by every weight of their columns, go into the bias.
    folded = (columns[dead].sum(dim=(1, 3)) * constant[dead].view(-1, 1)).sum(0)
    following_bias = following.bias
    if dead.any() and (constant[dead] != 0).any():
        following_bias = folded if following_bias is None else following_bias + folded
    keep_columns = alive.repeat_interleave(per_unit)
    chain[i].set(_layer_like(layer, layer.weight[alive], None if layer.bias is None else layer.bias[alive]))
    chain[j].set(_layer_like(following, following.weight[:, keep_columns], following_bias))
    for step in between:
        if isinstance(step, _Slot) and isinstance(step.get(), _BATCHNORMS):
            step.set(_slice_batchnorm(step.get(), alive))


@torch.no_grad()
def shrink(model: nn.Module) -> nn.Module:
    """A physically smaller network computing what `model`, a finalized ticket (plain layers,
    csext.finalize), computes at inference: every output unit of a Linear or convolution that
    the next weighted layer can do without is removed with its row, its BatchNorm channel and the
    next layer's columns. A unit goes when the next layer reads nothing of it, or when nothing
    reaches it (zero weights, as channel granularity leaves a gated-off unit): its constant output,
    through BatchNorm (running statistics), activations, poolings and flatten, is folded into the
    next layer's bias where that is exact (a Linear, an unpadded convolution, or a constant 0).
    Takes an nn.Sequential (nested ones expanded) or one of the package's networks; in ResNet-20
    only each residual block's inner channels (conv1's outputs) shrink, since the channels that
    feed a sum must match across it. Works in place and returns the model; BatchNorm layers must
    be in eval mode for theirs to shrink."""
    refuse_sharded(model, "shrink", GATHER_FIRST)
    if not isinstance(model, nn.Module):
        raise TypeError(f"shrink takes an nn.Module, got {type(model).__name__}")
    gated = [name for name, _ in gated_modules(model)]
    if gated:
        raise ValueError(f"shrink: {gated[0]} is still gated; call csext.finalize(model) first")
    for chain in _chains(model):
        weighted = [k for k, step in enumerate(chain) if isinstance(step, _Slot) and type(step.get()) in _WEIGHTED]
        for i, j in zip(weighted, weighted[1:]):
            if all(step in (_GLOBAL_POOL, _RELU) or type(step.get()) not in _WEIGHTED for step in chain[i + 1:j]):
                _shrink_pair(chain, i, j)
    return model


__all__ = ["to_prune_form", "from_prune_form", "to_sparse", "shrink", "SparseLinear"]

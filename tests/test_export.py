"""Exports: torch.nn.utils.prune's form and back, and the sparse inference form."""

import copy

import pytest
import torch
from torch import nn

import csext
from csext import export
from numerics import mask_logits_like


def _ticket(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 50), nn.ReLU(),
                          nn.Linear(50, 5))
    csext.sparsify(model)
    for _, m in csext.gated_modules(model):
        with torch.no_grad():
            m.mask_logits.copy_(mask_logits_like(m.weight) - 1.0)  # about 16% kept
    csext.set_hard(model)
    return model


def test_prune_form_round_trip():
    model = _ticket()
    model[3].mask_scale = 1.5
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = model(x)
    masks = {n: m.mask_logits > 0 for n, m in csext.gated_modules(model)}
    pruned = export.to_prune_form(copy.deepcopy(model))
    assert not csext.gated_modules(pruned)
    for name, m in pruned.named_modules():
        if name in masks:
            assert hasattr(m, "weight_orig") and torch.equal(m.weight_mask.bool(), masks[name])
            assert torch.all(m.weight[~masks[name]] == 0)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), expected, rtol=1e-5, atol=1e-6)
    back = export.from_prune_form(pruned)
    assert [n for n, _ in csext.gated_modules(back)] == list(masks)
    for name, m in csext.gated_modules(back):
        assert m.hard and torch.equal(m.mask_logits > 0, masks[name])
    with torch.no_grad():
        torch.testing.assert_close(back(x), expected, rtol=1e-5, atol=1e-6)


def test_sparse_export_equals_the_finalized_model():
    model = _ticket()
    x = torch.randn(7, 3, 6, 6)
    finalized = csext.finalize(copy.deepcopy(model))
    sparse = export.to_sparse(copy.deepcopy(model))
    kinds = [type(m).__name__ for m in sparse]
    assert kinds == ["Conv2d", "ReLU", "Flatten", "SparseLinear", "ReLU", "SparseLinear"]
    assert sparse[3].weight.layout == torch.sparse_csr
    assert sparse[3].weight.values().numel() == int((model[3].mask_logits > 0).sum())
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), finalized(x), rtol=1e-5, atol=1e-5)
    # a finalized model (plain layers, mostly zero weights) exports the same way
    again = export.to_sparse(copy.deepcopy(finalized))
    with torch.no_grad():
        torch.testing.assert_close(again(x), finalized(x), rtol=1e-5, atol=1e-5)
    layer = export.to_sparse(csext.finalize(_ticket()[3]))  # a model that is one layer
    assert isinstance(layer, export.SparseLinear)
    assert layer(torch.randn(2, 3, 144)).shape == (2, 3, 50)


def test_sparse_model_loads_another_tickets_state_dict(tmp_path):
    """A saved sparse model loads (weights_only) into one exported from another ticket, whose CSR
    weights hold other nonzeros; a finalized model's dense state dict loads too; a wrong shape
    is named."""
    saved, other = export.to_sparse(_ticket(seed=0)), export.to_sparse(_ticket(seed=1))
    assert saved[3].weight.values().numel() != other[3].weight.values().numel()
    torch.save(saved.state_dict(), tmp_path / "sparse.pt")
    other.load_state_dict(torch.load(tmp_path / "sparse.pt", weights_only=True))
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(other(x), saved(x), rtol=0, atol=0)
    assert other[3].weight.layout == torch.sparse_csr
    finalized = csext.finalize(_ticket(seed=2))
    other.load_state_dict(finalized.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(other(x), finalized(x), rtol=1e-5, atol=1e-5)
    state = finalized.state_dict()
    state["3.weight"] = torch.zeros(49, 4 * 6 * 6)
    with pytest.raises(RuntimeError, match=r"size mismatch for 3.weight: expected \(50, 144\), got \(49, 144\)"):
        other.load_state_dict(state)


def test_shrink_removes_gated_off_units_and_keeps_outputs():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 3),
                          nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 3, padding=1)))
    linear_part = nn.Sequential(*copy.deepcopy(list(model)[:5]))
    conv_part = model[5]
    with torch.no_grad():
        linear_part[0].weight[[1, 4, 7]] = 0  # three dead neurons: relu(bias) folds into the next bias
        linear_part[0].bias[1] = -1.0  # ...one of them outputs 0 anyway
        linear_part[2].weight[[0, 15]] = 0
        linear_part[2].bias[0] = 0.3  # tanh(0.3) folds into the last bias
        linear_part[4].bias = None  # a following layer without bias gains one
        conv_part[0].weight[[2, 6]] = 0
        conv_part[0].bias[2] = -0.5  # relu(-0.5) = 0: droppable
        conv_part[0].bias[6] = 0.5  # relu(0.5) != 0: kept (zero padding makes the constant inexact)
    x, images = torch.randn(9, 12), torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        expected, expected_images = linear_part(x), conv_part(images)
        export.shrink(linear_part)
        export.shrink(model)  # nested Sequential: the conv part
        torch.testing.assert_close(linear_part(x), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(conv_part(images), expected_images, rtol=1e-5, atol=1e-6)
    assert (linear_part[0].out_features, linear_part[2].in_features) == (17, 17)
    assert (linear_part[2].out_features, linear_part[4].in_features) == (14, 14)
    assert (conv_part[0].out_channels, conv_part[2].in_channels) == (7, 7)


def test_shrink_also_removes_units_nothing_reads():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4))
    with torch.no_grad():
        model[2].weight[:, [2, 3, 8]] = 0  # hidden neurons 2, 3, 8 feed nothing
    x = torch.randn(5, 6)
    with torch.no_grad():
        expected = model(x)
        export.shrink(model)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    assert model[0].out_features == model[2].in_features == 7

"""GatedConv1d: nn.Conv1d gated (a CNN on 1-D signals, such as mnist1d's), against the torch
backend and F.conv1d on the effective weight, through sparsify, finalize and the exports."""

import copy

import pytest
import torch
from torch import nn

import csext
from numerics import CPU_BACKENDS, FUSED_CASES, assert_compiles_as_eager, compare_with_torch_backend, mask_logits_like

CASES = [  # (x shape, out_channels, kernel, stride, padding, dilation, groups)
    ((2, 6, 19), 4, 3, 2, 1, 1, 2),
    ((3, 5), 7, 2, 1, 2, 2, 1),  # no batch dimension
    ((1, 8, 11), 8, 5, 1, "same", 1, 8),
]


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend,device,dtype", FUSED_CASES)
def test_gated_conv1d_on_each_fused_backend_follows_the_comparison_rule(backend, device, dtype, case, hard):
    x_shape, cout, kernel, stride, padding, dilation, groups = case
    w = torch.randn(cout, x_shape[-2] // groups, kernel)
    tensors = [("x", torch.randn(x_shape)), ("w", w), ("s", mask_logits_like(w)), ("b", torch.randn(cout))]

    def op(x, w, s, b, backend):
        return csext.functional.gated_conv1d(x, w, s, 1.9, b, stride, padding, dilation, groups, hard=hard,
                                             penalty=0.02, backend=backend)

    out_shape = nn.functional.conv1d(torch.empty(x_shape), torch.empty(w.shape), None, stride, padding, dilation,
                                     groups).shape
    compare_with_torch_backend(op, tensors, dtype, out_shape, backend=backend, device=device)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gated_conv1d_is_conv1d_on_the_effective_weight(backend, padding_mode):
    """A GatedConv1d (soft mask, lam, mask_scale) computes what nn.Conv1d holding c * w * m
    computes, and its gradients are autograd's of that plus lam * sum(sigmoid(beta * s))."""
    torch.manual_seed(0)
    beta, lam, scale = 2.5, 0.03, 1.5
    layer = csext.GatedConv1d(4, 6, 3, padding=2, dilation=2, padding_mode=padding_mode, dtype=torch.float64)
    with torch.no_grad():
        layer.mask_logits.copy_(mask_logits_like(layer.weight, torch.float64))
    layer.beta, layer.penalty, layer.mask_scale, layer.backend = beta, lam, scale, backend
    x = torch.randn(3, 4, 10, dtype=torch.float64)
    grad_out = torch.randn(3, 6, 10, dtype=torch.float64)
    (layer(x) * grad_out).sum().backward()

    w, s, b = (t.detach().clone().requires_grad_() for t in (layer.weight, layer.mask_logits, layer.bias))
    plain = nn.Conv1d(4, 6, 3, padding=2, dilation=2, padding_mode=padding_mode, dtype=torch.float64)
    expected = torch.func.functional_call(plain, {"weight": scale * w * torch.sigmoid(beta * s), "bias": b}, (x,))
    ((expected * grad_out).sum() + lam * torch.sigmoid(beta * s).sum()).backward()
    torch.testing.assert_close(layer(x), expected)
    for name, got, want in (("weight", layer.weight.grad, w.grad), ("mask_logits", layer.mask_logits.grad, s.grad),
                            ("bias", layer.bias.grad, b.grad)):
        torch.testing.assert_close(got, want, msg=lambda m: f"{name}: {m}")


def test_a_conv1d_network_through_sparsify_finalize_and_the_exports():
    """sparsify gates nn.Conv1d (sharing its Parameters); in hard mode the network, its finalized
    form, its prune form and back, and to_sparse compute the same; finalize gives nn.Conv1d."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 8, 5, padding=2), nn.ReLU(), nn.Conv1d(8, 8, 3, groups=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 38, 10))
    weight = model[0].weight
    gated = csext.sparsify(model, mask_init=0.5)
    assert [type(m) for m in gated] == [csext.GatedConv1d, csext.GatedConv1d, csext.GatedLinear]
    assert model[0].weight is weight
    with torch.no_grad():
        for m in gated:
            m.mask_logits.copy_(mask_logits_like(m.weight))
    csext.set_hard(model)
    model.eval()
    x = torch.randn(4, 1, 40)
    with torch.no_grad():
        ticket = model(x)
        finalized = csext.finalize(copy.deepcopy(model))
        assert [type(finalized[i]) for i in (0, 2)] == [nn.Conv1d, nn.Conv1d]
        for converted in (finalized, csext.export.from_prune_form(csext.export.to_prune_form(copy.deepcopy(model))),
                          csext.export.to_sparse(copy.deepcopy(model))):
            torch.testing.assert_close(converted(x), ticket, rtol=1e-5, atol=1e-6)
    assert csext.sparsity_report(model).per_layer.keys() == {"0", "2", "5"}


def test_gated_conv1d_compiles_without_a_graph_break():
    torch.manual_seed(0)
    layer = csext.GatedConv1d(3, 5, 3, padding=1)
    layer.beta, layer.penalty = 3.0, 1e-2
    with torch.no_grad():
        layer.mask_logits.copy_(mask_logits_like(layer.weight))
    assert_compiles_as_eager(layer, torch.randn(2, 3, 9))


def test_gated_conv1d_refuses_bad_shapes():
    layer = csext.GatedConv1d(4, 2, 3)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 4, L\) or \(4, L\) to match in_channels, "
                                         r"got \(2, 3, 9\)"):
        layer(torch.randn(2, 3, 9))
    with pytest.raises(TypeError, match="module must be an nn.Conv1d, got Conv2d"):
        csext.GatedConv1d.from_dense(nn.Conv2d(1, 1, 1))

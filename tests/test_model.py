"""sparsify, set_beta, set_hard, mask_penalty, sparsity_report, backends.available."""

import pytest
import torch
from torch import nn

import csext


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
        self.head = nn.Linear(4 * 6 * 6, 5)
        self.attn = nn.MultiheadAttention(8, 2)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def test_sparsify_replaces_linear_and_conv_in_place():
    net = Net()
    head_weight = net.head.weight
    gated = csext.sparsify(net, mask_init=0.25, penalty=1e-3)
    assert [type(m) for m in gated] == [csext.GatedConv2d, csext.GatedLinear]
    assert isinstance(net.head, csext.GatedLinear) and net.head.weight is head_weight
    assert type(net.attn.out_proj) is not csext.GatedLinear  # MHA reads .weight itself: left alone
    assert all(m.penalty == 1e-3 and torch.all(m.mask_logits == 0.25) for m in gated)
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 5)
    again = csext.sparsify(net)  # already gated layers are kept as they are
    assert again == gated


def test_sparsify_exclude():
    net = Net()
    csext.sparsify(net, exclude=["head"])
    assert type(net.head) is nn.Linear and isinstance(net.features[0], csext.GatedConv2d)
    with pytest.raises(ValueError, match="exclude"):
        csext.sparsify(Net(), exclude=["no_such_layer"])
    with pytest.raises(TypeError, match="from_dense"):
        csext.sparsify(nn.Linear(3, 3))


def test_set_beta_set_hard_and_penalty():
    net = Net()
    csext.sparsify(net, mask_init=0.5)
    csext.set_beta(net, 20.0)
    csext.set_hard(net)
    assert all(m.beta == 20.0 and m.hard for _, m in csext.gated_modules(net))
    csext.set_hard(net, False)
    assert not any(m.hard for _, m in csext.gated_modules(net))
    expected = sum(torch.sigmoid(20.0 * m.mask_logits).sum() for _, m in csext.gated_modules(net))
    penalty = csext.mask_penalty(net)
    torch.testing.assert_close(penalty, expected)
    penalty.backward()
    assert all(m.mask_logits.grad is not None for _, m in csext.gated_modules(net))
    for bad in (0.5, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="beta must be a finite number >= 1"):
            csext.set_beta(net, bad)
    with pytest.raises(ValueError, match="no gated layers"):
        csext.mask_penalty(Net())


def test_sparsity_report_counts_hard_mask():
    net = Net()
    csext.sparsify(net)
    conv, head = net.features[0], net.head
    with torch.no_grad():
        conv.mask_logits.fill_(-1.0)
        conv.mask_logits.view(-1)[:9] = 1.0
        head.mask_logits.fill_(1.0)
        head.mask_logits.view(-1)[:20] = -1.0
    report = csext.sparsity_report(net)
    assert report.per_layer == {"features.0": 9 / 36, "head": (720 - 20) / 720}
    assert report.kept == 9 + 700 and report.total == 36 + 720
    assert report.remaining == pytest.approx(709 / 756)
    assert report.as_dict()["per_layer"]["head"] == pytest.approx(700 / 720)
    assert "total" in str(report) and "features.0" in str(report)


def test_backends_available():
    names = csext.backends.available()
    assert names[0] == "torch" and set(names) <= {"torch", "cpp", "triton", "cuda"}
    with pytest.raises(ValueError, match="backend must be"):
        csext.functional.gate(torch.randn(2), torch.randn(2), 1.0, backend="fast")
    with pytest.raises(ValueError, match="not available|runs on CUDA tensors"):
        csext.functional.gate(torch.randn(2), torch.randn(2), 1.0, backend="cuda")

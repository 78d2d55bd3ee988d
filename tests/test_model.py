"""sparsify, set_beta, set_hard, mask_penalty, sparsity_report, backends.available."""

import copy

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
    assert [type(m) for m in gated] == [csext.GatedConv2d, csext.GatedLinear, csext.GatedMultiheadAttention,
                                         csext.GatedLinear]
    assert isinstance(net.head, csext.GatedLinear) and net.head.weight is head_weight
    assert gated[3] is net.attn.out_proj  # gated with its attention, which reads its weight
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


class _SharedLayer(nn.Module):
    """One nn.Linear registered at three places (a layer applied twice, weight-shared)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = self.a
        self.block = nn.Sequential(self.a, nn.ReLU())

    def forward(self, x):
        return self.b(self.block(x))


def test_a_shared_layer_stays_one_layer():
    """sparsify, finalize and the exports replace a module at every place it sits: replacing one
    left the other places running the old layer, ungated (or, after finalize, unmasked)."""
    from csext import export

    model = _SharedLayer()
    (gated,) = csext.sparsify(model)
    assert model.a is model.b is model.block[0] is gated
    with torch.no_grad():
        gated.mask_logits.copy_(torch.randn(4, 4))
    csext.set_hard(model)
    x = torch.randn(3, 4)
    with torch.no_grad():
        expected = model(x)
    for convert in (csext.finalize, export.to_sparse, export.to_prune_form):
        converted = convert(copy.deepcopy(model))
        assert converted.a is converted.b is converted.block[0], convert.__name__
        with torch.no_grad():
            torch.testing.assert_close(converted(x), expected, msg=convert.__name__)
    back = export.from_prune_form(export.to_prune_form(copy.deepcopy(model)))
    assert back.a is back.b is back.block[0] and isinstance(back.a, csext.GatedLinear)


def test_gated_transformer_layers_stay_off_torchs_fused_inference_paths():
    """nn.TransformerEncoderLayer's inference fast path (eval, no grad) reads linear1.weight and
    linear2.weight itself, and nn.TransformerEncoder's nested-tensor path feeds it: they ran the
    ungated weights (to_sparse's CSR ones crashed). The layers and their exports must give what
    the finalized model gives, which takes those paths legitimately."""
    from csext import export

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
    csext.sparsify(model)
    csext.sparsify(model)  # again: still one hook per layer
    assert [len(block._forward_pre_hooks) for block in model.layers] == [1, 1]
    with torch.no_grad():
        for _, gated in csext.gated_modules(model):
            gated.mask_logits.normal_().sub_(1.0)
    csext.set_hard(model)
    model.eval()
    x = torch.randn(3, 5, 16)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[0, 3:] = True
    finalized = csext.finalize(copy.deepcopy(model))
    assert not finalized.layers[0]._forward_pre_hooks and finalized.use_nested_tensor  # its fast paths back
    for convert in (lambda m: m, export.to_sparse, lambda m: export.from_prune_form(export.to_prune_form(m))):
        converted = convert(copy.deepcopy(model))
        for mask in (None, padding):
            with torch.no_grad():
                got, expected = converted(x, src_key_padding_mask=mask), finalized(x, src_key_padding_mask=mask)
            if expected.is_nested:  # the finalized encoder's nested path leaves out padded positions
                expected = expected.to_padded_tensor(0.0)
            torch.testing.assert_close(got[~padding], expected[~padding], rtol=1e-5, atol=1e-5)


def test_sparsify_warns_when_it_finds_nothing_to_gate():
    """A model with no exact nn.Linear / nn.Conv2d (a subclass may compute otherwise, or be read by
    its owner through .weight) gets nothing gated: a warning says so instead of an empty list alone."""
    class Owner(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.modules.linear.NonDynamicallyQuantizableLinear(4, 4)

    with pytest.warns(UserWarning, match=r"Owner has no nn.Linear, .*; left dense: proj "
                                         r"\(NonDynamicallyQuantizableLinear"):
        assert csext.sparsify(Owner()) == []
    # beside layers it gates, a subclass left dense is named too (weight_norm's parametrized layer)
    model = nn.Sequential(nn.Linear(3, 3), nn.utils.parametrizations.weight_norm(nn.Linear(3, 2)))
    with pytest.warns(UserWarning, match=r"left dense: 1 \(ParametrizedLinear, a subclass of nn.Linear"):
        assert [type(m) for m in csext.sparsify(model)] == [csext.GatedLinear]
    with pytest.warns(UserWarning, match=r"Sequential has no nn.Linear, nn.Conv2d, nn.Conv1d, nn.MultiheadAttention "
                                         r"or transformers Conv1D layer to gate$"):
        csext.sparsify(nn.Sequential(nn.Conv3d(2, 2, 1)))


def test_sparsify_refuses_lazy_modules_until_materialised():
    """A LazyLinear is an nn.Linear only after its first forward; sparsify before that would leave
    it dense in silence, so it asks for the forward pass, and gates the layer after it."""
    with pytest.raises(ValueError, match=r"sparsify: 0, 2 are lazy modules.*forward pass"):
        csext.sparsify(nn.Sequential(nn.LazyLinear(3), nn.ReLU(), nn.LazyConv2d(2, 1)))
    with pytest.raises(ValueError, match=r"sparsify: 1 is a lazy module whose shapes"):
        csext.sparsify(nn.Sequential(nn.Linear(3, 3), nn.LazyLinear(3)))
    model = nn.Sequential(nn.LazyLinear(3), nn.Linear(3, 2))
    model(torch.randn(4, 5))
    assert [type(m) for m in csext.sparsify(model)] == [csext.GatedLinear, csext.GatedLinear]


def test_sparsify_refuses_tied_weights_by_name():
    """A Linear whose weight Parameter another module holds too (a language model's output layer
    tied to its embedding) would have only one of its uses gated: sparsify names it and the way
    out, and touches nothing."""
    model = nn.Module()
    model.embed, model.head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    model.head.weight = model.embed.weight
    with pytest.raises(ValueError, match=r"head.weight is tied to embed.weight .* exclude=\['head'\]"):
        csext.sparsify(model)
    assert type(model.head) is nn.Linear
    assert csext.sparsify(model, exclude=["head"]) == []


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


def _mask_gradient(model, batches, lam, *, fused, scale=None):
    """dL/ds of sum over batches of the task loss, with lam * P fused in the layers or in the loss."""
    (layer,) = {id(m): m for _, m in csext.gated_modules(model)}.values()
    csext.set_penalty(model, lam if fused else 0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale else None
    layer.mask_logits.grad = None
    for x in batches:
        loss = model(x).square().mean() / len(batches)
        if not fused:
            loss = loss + lam * csext.mask_penalty(model) / len(batches)
        (scaler.scale(loss) if scaler else loss).backward()
    if scaler:
        scaler.unscale_(torch.optim.SGD(model.parameters(), lr=0.1))
    return layer.mask_logits.grad


@pytest.mark.parametrize("case", ["once", "GradScaler", "accumulation", "called twice"])
def test_the_fused_penalty_and_where_it_goes_in_the_loss_instead(case):
    """README "Use": the layers' penalty equals lam * P in the loss when each layer runs once per
    forward and the loss is unscaled; under GradScaler, gradient accumulation and shared layers
    lam * mask_penalty(model) in the loss gives those gradients, the fused term does not."""
    torch.manual_seed(0)
    model = _SharedLayer() if case == "called twice" else nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    csext.sparsify(model)
    csext.set_beta(model, 2.0)
    with torch.no_grad():
        csext.gated_modules(model)[0][1].mask_logits.normal_()
    batches = [torch.randn(3, 4) for _ in range(3 if case == "accumulation" else 1)]
    scale = 2.0 ** 12 if case == "GradScaler" else None
    lam = 0.05
    expected = _mask_gradient(model, [torch.cat(batches)], lam, fused=False)  # one pass, unscaled
    in_loss = _mask_gradient(model, batches, lam, fused=False, scale=scale)
    fused = _mask_gradient(model, batches, lam, fused=True, scale=scale)
    torch.testing.assert_close(in_loss, expected, rtol=1e-5, atol=1e-7)
    if case == "once":
        torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-7)
    else:
        assert not torch.allclose(fused, expected, rtol=1e-3, atol=1e-5)


def test_sparsity_report_counts_hard_mask():
    net = Net()
    csext.sparsify(net)
    conv, head = net.features[0], net.head
    with torch.no_grad():
        conv.mask_logits.fill_(-1.0)
        conv.mask_logits.view(-1)[:9] = 1.0
        head.mask_logits.fill_(1.0)
        head.mask_logits.view(-1)[:20] = -1.0
        net.attn.mask_logits.fill_(-1.0)
        net.attn.out_proj.mask_logits.fill_(-1.0)
    report = csext.sparsity_report(net)
    assert report.per_layer == {"features.0": 9 / 36, "head": (720 - 20) / 720, "attn": 0.0, "attn.out_proj": 0.0}
    assert report.kept == 9 + 700 and report.total == 36 + 720 + 3 * 64 + 64
    assert report.remaining == pytest.approx(709 / (756 + 256))
    assert report.as_dict()["per_layer"]["head"] == pytest.approx(700 / 720)
    assert "total" in str(report) and "features.0" in str(report)


def test_backends_available():
    names = csext.backends.available()
    assert names[0] == "torch" and set(names) <= {"torch", "cpp", "triton", "cuda"}
    with pytest.raises(ValueError, match="backend must be"):
        csext.functional.gate(torch.randn(2), torch.randn(2), 1.0, backend="fast")
    with pytest.raises(ValueError, match="not available|runs on CUDA tensors"):
        csext.functional.gate(torch.randn(2), torch.randn(2), 1.0, backend="cuda")

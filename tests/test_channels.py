"""Channel granularity: one mask logit per output unit (docs/contract.md section 1), against the
torch reference on every backend by the rule of section 4, and through the layers and model helpers."""

import copy
import io

import pytest
import torch
from torch import nn

import csext
from csext import functional as F
from numerics import FUSED_CASES, compare_with_torch_backend, mask_logits_like


def channel_logits(weight_shape, out_dim=0):
    shape = [1] * len(weight_shape)
    shape[out_dim] = weight_shape[out_dim]
    return mask_logits_like(torch.empty(shape))


# Awkward rows: one weight per row, a row shorter and longer than a Triton block, an odd row count.
GATE_SHAPES = [(5, 1), (7, 13), (3, 1100), (6, 3, 3, 3)]


@pytest.mark.parametrize("backend,device,dtype", FUSED_CASES)
@pytest.mark.parametrize("shape", GATE_SHAPES)
@pytest.mark.parametrize("hard", [False, True])
def test_gate_matches_reference(backend, device, dtype, shape, hard):
    if backend == "triton" and device == "cpu" and shape[-1] == 1100 and dtype != torch.float32:
        pytest.skip("interpreted: one long-row shape in float32 is enough")
    tensors = [("w", torch.randn(shape)), ("s", channel_logits(shape))]

    def op(w, s, backend):
        return F.gate(w, s, 2.5, hard=hard, penalty=0.03, dtype=w.dtype, backend=backend)

    compare_with_torch_backend(op, tensors, dtype, out_shape=shape, backend=backend, device=device)


@pytest.mark.parametrize("backend,device,dtype", [c for c in FUSED_CASES if not isinstance(c, type(pytest.param()))
                                                  and c[2] != torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "conv2d", "conv1d", "hf_conv1d"])
def test_layers_match_reference(backend, device, dtype, kind):
    x_shapes = {"linear": (3, 2, 11), "conv2d": (2, 4, 6, 5), "conv1d": (2, 4, 9), "hf_conv1d": (3, 11)}
    w_shapes = {"linear": (5, 11), "conv2d": (6, 2, 3, 3), "conv1d": (6, 4, 3), "hf_conv1d": (11, 5)}
    out_dim = 1 if kind == "hf_conv1d" else 0
    w = torch.randn(w_shapes[kind])
    units = w.shape[out_dim]
    tensors = [("x", torch.randn(x_shapes[kind])), ("w", w), ("s", channel_logits(w.shape, out_dim)),
               ("b", torch.randn(units))]
    call = {"linear": lambda x, w, s, b, **kw: F.gated_linear(x, w, s, 2.0, b, **kw),
            "conv2d": lambda x, w, s, b, **kw: F.gated_conv2d(x, w, s, 2.0, b, 1, 1, 1, 2, **kw),
            "conv1d": lambda x, w, s, b, **kw: F.gated_conv1d(x, w, s, 2.0, b, 1, 1, 1, 1, **kw),
            "hf_conv1d": lambda x, w, s, b, **kw: F.gated_hf_conv1d(x, w, s, 2.0, b, **kw)}[kind]
    with torch.no_grad():
        out_shape = call(*[t for _, t in tensors], backend="torch").shape

    def op(x, w, s, b, backend):
        return call(x, w, s, b, penalty=0.02, backend=backend)

    compare_with_torch_backend(op, tensors, dtype, out_shape=out_shape, backend=backend, device=device)


def test_reference_is_the_weight_form_with_a_repeated_logit():
    """A channel's logit acts as the same logit on each of its weights, bias included: its gradient
    is the sum of theirs, and lam counts once per weight."""
    w, b, x = torch.randn(4, 6), torch.randn(4), torch.randn(3, 6)
    s = channel_logits(w.shape).requires_grad_()
    full = s.detach().expand(4, 6).clone().requires_grad_()
    full_b = s.detach().view(4).clone().requires_grad_()
    y = F.gated_linear(x, w, s, 2.0, b, penalty=0.1, backend="torch")
    y_full = (x @ F.gate(w, full, 2.0, penalty=0.1, backend="torch").t()
              + F.gate(b, full_b, 2.0, backend="torch"))
    torch.testing.assert_close(y, y_full)
    y.square().sum().backward()
    y_full.square().sum().backward()
    torch.testing.assert_close(s.grad.view(4), full.grad.sum(1) + full_b.grad)


def test_gated_off_unit_takes_its_bias():
    layer = csext.GatedConv2d(3, 4, 3, padding=1, granularity="channel")
    with torch.no_grad():
        layer.mask_logits.copy_(torch.tensor([1.0, -1.0, 2.0, -0.5]).view(4, 1, 1, 1))
    layer.hard = True
    y = layer(torch.randn(2, 3, 5, 5))
    assert (y[:, [1, 3]] == 0).all() and (y[:, [0, 2]] != 0).any()
    plain = csext.finalize(nn.Sequential(layer))[0]
    assert type(plain) is nn.Conv2d and (plain.bias[[1, 3]] == 0).all()


@pytest.mark.parametrize("make", [lambda g: csext.GatedLinear(5, 3, granularity=g),
                                  lambda g: csext.GatedConv2d(2, 3, 3, granularity=g),
                                  lambda g: csext.GatedConv1d(2, 3, 3, granularity=g),
                                  lambda g: csext.GatedHFConv1D(3, 5, granularity=g)])
def test_layer_shapes_state_dict_and_penalty(make):
    layer = make("channel")
    assert layer.granularity == "channel" and make("weight").granularity == "weight"
    units = layer.weight.shape[1 if isinstance(layer, csext.GatedHFConv1D) else 0]
    assert layer.mask_logits.numel() == units
    with torch.no_grad():
        layer.mask_logits.normal_()
    layer.beta = 3.0
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    again = make("channel")
    again.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(again.mask_logits, layer.mask_logits)
    assert again.beta == 3.0
    per_unit = layer.weight.numel() // units
    expected = torch.sigmoid(3.0 * layer.mask_logits).sum() * per_unit
    torch.testing.assert_close(csext.mask_penalty(nn.Sequential(layer)), expected)
    report = csext.sparsity_report(nn.Sequential(layer))
    assert report.total == layer.weight.numel()
    assert report.kept == int((layer.mask_logits > 0).sum()) * per_unit


def test_sparsify_channel_and_bad_granularity():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    gated = csext.sparsify(model, granularity="channel")
    assert [m.granularity for m in gated] == ["channel", "channel"]
    assert gated[0].mask_logits.shape == (4, 1, 1, 1) and gated[1].mask_logits.shape == (3, 1)
    model(torch.randn(2, 1, 6, 6)).sum().backward()
    assert gated[0].mask_logits.grad.shape == (4, 1, 1, 1)
    for bad in ("filter", "Channel", None, 1):
        with pytest.raises(ValueError, match="granularity must be 'weight' or 'channel'"):
            csext.sparsify(nn.Sequential(nn.Linear(2, 2)), granularity=bad)
        with pytest.raises(ValueError, match="granularity must be 'weight' or 'channel'"):
            csext.GatedLinear(2, 2, granularity=bad)
    with pytest.raises(ValueError, match="granularity='channel' has no form for nn.MultiheadAttention"):
        csext.sparsify(nn.Sequential(nn.MultiheadAttention(4, 2)), granularity="channel")


def test_bad_mask_shape_names_the_argument():
    with pytest.raises(ValueError, match=r"mask_logits must have the shape of weight \(4, 6\), or \(4, 1\)"):
        F.gated_linear(torch.randn(2, 6), torch.randn(4, 6), torch.zeros(1, 6), 1.0)
    if "cpp" in csext.backends.available():
        with pytest.raises(ValueError, match="mask_logits must have the shape of weight"):
            torch.ops.csext.gate(torch.randn(4, 6), torch.zeros(4, 2), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("backend", [b for b in csext.backends.available() if b in ("torch", "cpp")])
def test_compile_fullgraph_with_channel_layers(backend):
    from numerics import assert_compiles_as_eager

    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    for m in csext.sparsify(model, granularity="channel", penalty=0.01):
        m.backend = backend
        m.beta = 2.0
        with torch.no_grad():
            m.mask_logits.normal_()
    assert_compiles_as_eager(model, torch.randn(2, 2, 6, 6))


def test_gradcheck_float64_cpp():
    if "cpp" not in csext.backends.available():
        pytest.skip("no csext._C")
    w = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    s = channel_logits(w.shape).double().requires_grad_()
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x, w, s, b: F.gated_conv1d(x, w, s, 1.5, b, backend="cpp"), (x, w, s, b))
    torch.autograd.gradgradcheck(lambda w, s: F.gate(w, s, 1.5, backend="cpp"), (w, s))


def test_forward_mode_cpp():
    if "cpp" not in csext.backends.available():
        pytest.skip("no csext._C")
    w, s = torch.randn(4, 6, dtype=torch.float64), channel_logits((4, 6)).double()
    tw, ts = torch.randn_like(w), torch.randn_like(s)
    got = torch.func.jvp(lambda w, s: F.gate(w, s, 2.0, backend="cpp"), (w, s), (tw, ts))
    want = torch.func.jvp(lambda w, s: F.gate(w, s, 2.0, backend="torch"), (w, s), (tw, ts))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_deepcopy_and_extra_repr():
    layer = csext.GatedLinear(3, 2, granularity="channel")
    assert "granularity=channel" in repr(layer)
    assert copy.deepcopy(layer).granularity == "channel"


# Small inputs for each of the package's networks; shrink is tested on a channel ticket of each.
NETWORK_INPUTS = {"mlp": (40,), "lenet300": (28, 28), "cnn1d": (40,), "conv4": (3, 8, 8), "vgg16": (3, 32, 32),
                  "resnet20": (3, 8, 8)}


def channel_ticket(name):
    """A finalized channel ticket of the package's network `name`, in eval mode, with random
    BatchNorm statistics and biases, and about half of each layer's units gated off."""
    from csext.experiments import nets

    model = nets.build(name, NETWORK_INPUTS[name], 10)
    csext.sparsify(model, granularity="channel", exclude=nets.DEFAULT_EXCLUDE[name])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
            if isinstance(m, csext.modules.GATED_TYPES):
                m.mask_logits.normal_()
                if m.bias is not None:
                    m.bias.normal_()
    return csext.finalize(model).eval()


@pytest.mark.parametrize("name", list(NETWORK_INPUTS))
def test_shrink_computes_the_finalized_ticket(name, tmp_path):
    from csext import export

    model = channel_ticket(name)
    x = torch.randn(5, *NETWORK_INPUTS[name])
    before = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        expected = model(x)
        export.shrink(model)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in model.parameters()) < 0.9 * before
    torch.save(model, tmp_path / "shrunk.pt")
    again = torch.load(tmp_path / "shrunk.pt", weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(again(x), expected, rtol=1e-5, atol=1e-5)
    if name in ("mlp", "cnn1d"):  # the exporter is slow; two networks show it takes the shrunk layers
        torch.onnx.export(model, (x,), str(tmp_path / "shrunk.onnx"), dynamo=False)
        assert (tmp_path / "shrunk.onnx").stat().st_size > 0


def test_shrink_folds_batchnorm_constants_exactly_where_it_can():
    """A dead channel whose BatchNorm output is a nonzero constant goes where the next layer is a
    Linear (folded into its bias) and stays where a zero-padded convolution reads it."""
    from csext import export

    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 5 * 5, 2)).eval()
    with torch.no_grad():
        model[0].weight[[0, 1]] = 0
        model[0].bias[[0, 1]] = 0
        model[1].bias.copy_(torch.tensor([-1.0, 1.0, 0.0, 0.0]))  # relu(bn(0)): 0 for channel 0, > 0 for 1
        model[1].running_mean.zero_()
        model[3].weight[2] = 0
        model[3].bias[2] = 0
        model[4].bias[2] = 0.7
        x = torch.randn(3, 2, 5, 5)
        expected = model(x)
        export.shrink(model)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    assert model[0].out_channels == 3 and model[1].num_features == 3  # channel 1 stays: padding
    assert model[3].out_channels == 2 and model[7].in_features == 2 * 5 * 5


def test_shrink_refuses_gated_layers_and_other_models():
    from csext import export

    with pytest.raises(ValueError, match="call csext.finalize"):
        export.shrink(nn.Sequential(csext.GatedLinear(2, 2)))
    with pytest.raises(TypeError, match="shrink takes an nn.Sequential or a network with shrink_chains"):
        export.shrink(nn.Linear(2, 2))


def test_command_line_granularity(tmp_path):
    from csext.experiments import cli

    _, config = cli.parse(["search", "--granularity", "channel", "--out", str(tmp_path)])
    assert config.granularity == "channel"
    _, config = cli.parse(["compare", "--granularity", "channel", "--out", str(tmp_path)])
    assert config.granularity == "channel"
    assert cli.parse(["search", "--out", str(tmp_path)])[1].granularity == "weight"
    with pytest.raises(SystemExit):
        cli.parse(["search", "--granularity", "filter", "--out", str(tmp_path)])

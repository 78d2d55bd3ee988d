"""GatedLinear / GatedConv2d: construction, penalty in the backward, state_dict, dtype moves."""

import copy

import pytest
import torch
from torch import nn

import csext
from numerics import CPU_BACKENDS, mask_logits_like

BACKENDS = CPU_BACKENDS


def _small_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, groups=3),
        nn.ReLU(),
        nn.Conv2d(6, 4, 3, stride=2, padding_mode="reflect", padding=1),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 10),
        nn.ReLU(),
        nn.Linear(10, 3),
    )


def test_layers_initialise_like_plain_ones():
    torch.manual_seed(1)
    plain = nn.Linear(31, 7)
    torch.manual_seed(1)
    gated = csext.GatedLinear(31, 7, mask_init=-0.5)
    assert torch.equal(plain.weight, gated.weight) and torch.equal(plain.bias, gated.bias)
    assert gated.mask_logits.dtype == torch.float32 and torch.all(gated.mask_logits == -0.5)
    torch.manual_seed(2)
    plain_conv = nn.Conv2d(4, 8, (3, 2), stride=2, groups=2, bias=False)
    torch.manual_seed(2)
    gated_conv = csext.GatedConv2d(4, 8, (3, 2), stride=2, groups=2, bias=False)
    assert torch.equal(plain_conv.weight, gated_conv.weight) and gated_conv.bias is None
    assert gated.beta == 1.0 and gated.hard is False and gated.penalty == 0.0
    assert set(dict(gated.named_parameters())) == {"weight", "bias", "mask_logits"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_penalty_in_backward_equals_autograd_of_penalised_loss(backend):
    lam, beta = 0.05, 4.0
    x = torch.randn(5, 3, 8, 8)
    fused = _small_net()
    csext.sparsify(fused, mask_init=0.3, penalty=lam)
    explicit = copy.deepcopy(fused)
    csext.set_penalty(explicit, 0.0)
    for model in (fused, explicit):
        csext.set_beta(model, beta)
        for _, m in csext.gated_modules(model):
            m.backend = backend
            with torch.no_grad():
                m.mask_logits.copy_(mask_logits_like(m.weight))
    torch.manual_seed(7)
    masks = [mask_logits_like(m.weight) for _, m in csext.gated_modules(fused)]
    for model in (fused, explicit):
        for (_, m), s in zip(csext.gated_modules(model), masks):
            with torch.no_grad():
                m.mask_logits.copy_(s)
    fused(x).square().mean().backward()
    (explicit(x).square().mean() + lam * csext.mask_penalty(explicit)).backward()
    for (name, a), (_, b) in zip(fused.named_parameters(), explicit.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_from_dense_loads_plain_state_dict_and_matches_plain_layer():
    dense = nn.Linear(12, 5)
    source = nn.Linear(12, 5)
    dense.load_state_dict(source.state_dict())
    gated = csext.GatedLinear.from_dense(dense, mask_init=1.0)
    assert gated.weight is dense.weight  # shares the Parameter
    gated.hard = True  # s = 1 > 0 everywhere: the ticket is the dense layer
    x = torch.randn(4, 12)
    torch.testing.assert_close(gated(x), source(x), rtol=0, atol=0)
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular")
    gconv = csext.GatedConv2d.from_dense(conv, mask_init=2.0)
    gconv.hard = True
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(gconv(x), conv(x), rtol=0, atol=0)
    with pytest.raises(TypeError, match="module must be an nn.Linear"):
        csext.GatedLinear.from_dense(conv)


def test_finalize_loads_into_plain_model_and_computes_same_outputs():
    model = _small_net()
    csext.sparsify(model, mask_init=0.0)
    for _, m in csext.gated_modules(model):
        with torch.no_grad():
            m.mask_logits.copy_(mask_logits_like(m.weight))
    csext.set_hard(model)
    x = torch.randn(3, 3, 8, 8)
    expected = model(x)
    report = csext.sparsity_report(model)
    final = csext.finalize(model)
    assert not csext.gated_modules(final)
    plain = _small_net(seed=123)
    plain.load_state_dict(final.state_dict())
    torch.testing.assert_close(plain(x), expected, rtol=1e-6, atol=1e-6)
    kept = sum(int((m.weight != 0).sum()) for m in plain.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    assert kept == report.kept


def test_state_dict_round_trip_keeps_beta_hard_penalty():
    layer = csext.GatedConv2d(2, 3, 3, mask_init=-0.2)
    layer.beta, layer.hard, layer.penalty = 37.5, True, 1e-4
    clone = csext.GatedConv2d(2, 3, 3)
    clone.load_state_dict(layer.state_dict())
    assert (clone.beta, clone.hard, clone.penalty, clone.mask_init) == (37.5, True, 1e-4, -0.2)
    assert torch.equal(clone.mask_logits, layer.mask_logits)


def test_state_dict_holds_tensors_only_for_safetensors_and_loads_the_older_dict_form(tmp_path):
    """beta, hard, penalty, mask_init and mask_scale travel as one tensor: safetensors (Hugging
    Face's save_pretrained, Trainer checkpoints) refused the dict, which older checkpoints hold."""
    safetensors = pytest.importorskip("safetensors.torch")
    model = nn.Sequential(csext.GatedLinear(4, 3, mask_init=0.5), nn.ReLU(), csext.GatedConv2d(1, 2, 1))
    model[0].beta, model[0].hard, model[0].penalty, model[0].mask_scale = 37.5, True, 1e-4, 1.25
    model[2].beta = 3.0
    state = model.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    safetensors.save_file(state, tmp_path / "model.safetensors")
    clone = nn.Sequential(csext.GatedLinear(4, 3), nn.ReLU(), csext.GatedConv2d(1, 2, 1))
    clone.load_state_dict(safetensors.load_file(tmp_path / "model.safetensors"))
    settings = [(m.beta, m.hard, m.penalty, m.mask_init, m.mask_scale) for m in (clone[0], clone[2])]
    assert settings == [(37.5, True, 1e-4, 0.5, 1.25), (3.0, False, 0.0, 0.0, 1.0)]
    older = {**state, "0._extra_state": {"beta": 9.0, "hard": False, "penalty": 0.5, "mask_init": -1.0}}
    clone.load_state_dict(older)
    settings = (clone[0].beta, clone[0].hard, clone[0].penalty, clone[0].mask_init, clone[0].mask_scale)
    assert settings == (9.0, False, 0.5, -1.0, 1.0)
    with pytest.raises(ValueError, match="_extra_state of a gated layer must be a tensor of 5 values"):
        clone.load_state_dict({**state, "0._extra_state": torch.zeros(3)})
    with pytest.raises(ValueError, match="beta must be a finite number >= 1, got 0.5"):
        clone.load_state_dict({**state, "0._extra_state": torch.tensor([0.5, 0.0, 0.0, 0.0, 1.0])})


def test_lower_precision_keeps_mask_logits_float32():
    layer = csext.GatedLinear(8, 4).to(torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16 and layer.mask_logits.dtype == torch.float32
    assert isinstance(layer.mask_logits, nn.Parameter)
    out = layer(torch.randn(2, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    layer.half()
    assert layer.mask_logits.dtype == torch.float32
    layer.double()
    assert layer.weight.dtype == layer.mask_logits.dtype == torch.float64
    layer.float()
    assert layer.mask_logits.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_bfloat16_matches_reference(backend):
    layer = csext.GatedLinear(64, 32)
    layer.backend = backend
    layer.beta = 3.0
    with torch.no_grad():
        layer.mask_logits.copy_(mask_logits_like(layer.weight))
    x = torch.randn(16, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and layer.mask_logits.grad.dtype == torch.float32
    w_eff = csext.reference.gate(layer.weight, layer.mask_logits, 3.0).to(torch.bfloat16)
    expected = torch.nn.functional.linear(x.to(torch.bfloat16), w_eff, layer.bias.to(torch.bfloat16))
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_mask_and_effective_weight():
    layer = csext.GatedLinear(6, 3)
    layer.beta = 5.0
    with torch.no_grad():
        layer.mask_logits.copy_(mask_logits_like(layer.weight))
    soft = torch.sigmoid(5.0 * layer.mask_logits)
    torch.testing.assert_close(layer.mask(), soft)
    assert not layer.mask().requires_grad
    torch.testing.assert_close(layer.effective_weight(), layer.weight * soft)
    layer.hard = True
    assert torch.equal(layer.mask(), (layer.mask_logits > 0).float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_scale_multiplies_the_effective_weight(backend):
    """mask_scale c (the paper code's 1 / sigmoid(s0)): outputs and gradients of c * w * m + b,
    in soft and hard mode, carried by the state_dict and by finalize."""
    torch.manual_seed(5)
    model = _small_net()
    csext.sparsify(model, penalty=0.01)
    for _, m in csext.gated_modules(model):
        m.backend, m.beta, m.mask_scale = backend, 3.0, 2.0
        with torch.no_grad():
            m.mask_logits.copy_(mask_logits_like(m.weight))
    x = torch.randn(2, 3, 8, 8)
    for hard in (False, True):
        csext.set_hard(model, hard)
        reference = copy.deepcopy(model)
        for _, m in csext.gated_modules(reference):
            m.mask_scale = 1.0
            with torch.no_grad():  # c * w in the reference's weight: the gradient of w then needs a c
                m.weight.mul_(2.0)
        y = model(x)
        torch.testing.assert_close(y, reference(x), rtol=1e-5, atol=1e-5)
        y.square().sum().backward()
        reference(x).square().sum().backward()
        for (name, a), (_, b) in zip(model.named_parameters(), reference.named_parameters()):
            if a.grad is None:
                assert b.grad is None, name
                continue
            expected = b.grad * 2.0 if name.endswith(".weight") else b.grad  # every layer is gated: w' = 2 w
            torch.testing.assert_close(a.grad, expected, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
        model.zero_grad()
    restored = _small_net()
    csext.sparsify(restored)
    restored.load_state_dict(model.state_dict())
    assert all(m.mask_scale == 2.0 for _, m in csext.gated_modules(restored))
    with torch.no_grad():
        y = model(x)
        torch.testing.assert_close(csext.finalize(copy.deepcopy(model))(x), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="mask_scale must be a finite number > 0"):
        csext.functional.gated_linear(torch.randn(2, 4), torch.randn(3, 4), torch.randn(3, 4), 1.0, mask_scale=0.0)


def test_layers_run_on_the_meta_device():
    """Shape inference and deferred initialisation build models on the meta device."""
    with torch.device("meta"):
        model = nn.Sequential(csext.GatedConv2d(3, 4, 3), nn.Flatten(), csext.GatedLinear(4 * 6 * 6, 5))
        y = model(torch.randn(2, 3, 8, 8))
        y.sum().backward()
    assert y.shape == (2, 5) and y.device.type == "meta"
    assert model[0].mask_logits.grad.shape == model[0].weight.shape


@pytest.mark.parametrize("backend", ["auto", *BACKENDS, "triton"])
def test_jit_trace_passes_its_checks_and_computes_the_models_outputs_and_gradients(backend):
    """torch.jit.trace with its default check (a second trace must give the same graph), quietly:
    beta's tensor is traced as built, not taken from the eager cache, the shape checks do not
    compare traced sizes, and the triton backend is traced as its custom ops (its eager launches
    are invisible to the tracer). Soft, hard and rescaled gates and lam; another batch size; the
    traced module saved and loaded by torch.jit (on the fused backends)."""
    import io
    import warnings

    if backend not in csext.backends.available() + ["auto"]:
        pytest.skip(f"backend {backend!r} is not available here")
    model = _small_net()
    csext.sparsify(model, penalty=0.01)
    for _, m in csext.gated_modules(model):
        m.backend = backend
        with torch.no_grad():
            m.mask_logits.copy_(mask_logits_like(m.weight))
    csext.set_beta(model, 3.7)
    model[2].hard, model[4].mask_scale = True, 1.5
    twin = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(twin, torch.randn(2, 3, 8, 8))
    assert [str(w.message) for w in caught if issubclass(w.category, torch.jit.TracerWarning)] == []
    x = torch.randn(5, 3, 8, 8, requires_grad=True)
    if backend != "torch":  # the reference's lam is a Python autograd.Function, which torch.jit cannot save
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
        buffer.seek(0)
        torch.testing.assert_close(torch.jit.load(buffer)(x), model(x))
    torch.testing.assert_close(traced(x), model(x))
    grads = torch.autograd.grad(traced(x).square().sum(), [x, *twin.parameters()], allow_unused=True)
    expected = torch.autograd.grad(model(x).square().sum(), [x, *model.parameters()], allow_unused=True)
    assert [g is None for g in grads] == [g is None for g in expected] == [False] * 6 + [True] + [False] * 6
    for got, want in zip(grads, expected):
        if want is not None:  # the hard layer's mask logits get none
            torch.testing.assert_close(got, want)


def test_fx_symbolic_trace_records_each_layer_as_one_call():
    """torch.fx.symbolic_trace of a sparsified model: each gated layer one call_function node
    (its checks branch on shapes, which FX cannot trace), outputs and gradients as the model's."""
    model = _small_net()
    csext.sparsify(model, penalty=0.01)
    traced = torch.fx.symbolic_trace(model)
    called = [n.target.__name__ for n in traced.graph.nodes if n.op == "call_function"]
    assert called.count("gated_conv2d") == 2 and called.count("gated_linear") == 2
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
    traced(x).square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("make", [lambda: csext.GatedLinear(6, 5), lambda: csext.GatedConv2d(2, 3, 3, padding=1),
                                  lambda: csext.GatedConv1d(2, 3, 3), lambda: csext.GatedHFConv1D(5, 6)],
                         ids=["linear", "conv2d", "conv1d", "hf_conv1d"])
def test_forward_reads_parametrized_pruned_and_swapped_parameters(make):
    """The forward reads weight, mask_logits and bias from _parameters where they are there, and
    as attributes where torch.nn.utils.parametrize or prune moved them; torch.func.functional_call
    swaps them in _parameters."""
    torch.manual_seed(0)
    layer = make()
    layer.beta = 3.0
    layer.mask_logits.data.normal_()
    x = torch.randn(4, 6) if isinstance(layer, (csext.GatedLinear, csext.GatedHFConv1D)) else (
        torch.randn(2, 2, 5, 5) if isinstance(layer, csext.GatedConv2d) else torch.randn(2, 2, 7))

    def expected(weight, mask_logits, bias):
        plain = copy.deepcopy(layer)
        with torch.no_grad():
            plain.weight.copy_(weight)
            plain.mask_logits.copy_(mask_logits)
            if bias is not None:
                plain.bias.copy_(bias)
        return plain(x)

    doubled = copy.deepcopy(layer)
    torch.nn.utils.parametrize.register_parametrization(doubled, "weight", _Double())
    torch.testing.assert_close(doubled(x), expected(2 * layer.weight, layer.mask_logits, layer.bias))

    pruned = copy.deepcopy(layer)
    torch.nn.utils.prune.random_unstructured(pruned, "weight", amount=0.5)
    torch.testing.assert_close(pruned(x), expected(pruned.weight, layer.mask_logits, layer.bias))
    torch.nn.utils.prune.random_unstructured(pruned, "bias", amount=0.5)
    torch.testing.assert_close(pruned(x), expected(pruned.weight, layer.mask_logits, pruned.bias))

    swapped = {"weight": torch.randn_like(layer.weight), "mask_logits": torch.randn_like(layer.mask_logits)}
    torch.testing.assert_close(torch.func.functional_call(layer, swapped, (x,)),
                               expected(swapped["weight"], swapped["mask_logits"], layer.bias))


class _Double(nn.Module):
    def forward(self, weight):
        return 2 * weight

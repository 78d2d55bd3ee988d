"""GatedHFConv1D: transformers' Conv1D (GPT-2's linear layers, weight stored (in, out)) gated, its
math against docs/contract.md's, and a GPT-2 through sparsify, training, finalize and
save_pretrained."""

import copy

import pytest
import torch

import csext
from numerics import CPU_BACKENDS, FUSED_CASES, assert_compiles_as_eager, compare_with_torch_backend, mask_logits_like


def _explicit(x, weight, mask_logits, bias, beta, hard, lam):
    """The math of docs/contract.md by autograd: y = x (w * m) + b, loss terms and
    lam * sum(sigmoid(beta * s))."""
    mask = (mask_logits > 0).to(weight.dtype) if hard else torch.sigmoid(beta * mask_logits)
    y = x @ (weight * mask) + bias
    penalty = 0.0 if hard else lam * torch.sigmoid(beta * mask_logits).sum()
    return y, penalty


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gated_hf_conv1d_computes_the_spec_math(backend, hard):
    """Forward and every gradient (lam in the backward) of a GatedHFConv1D in float64, on a
    non-contiguous 3-D input, equal autograd of the the contract's formulas (docs/contract.md)."""
    torch.manual_seed(0)
    nf, nx, beta, lam = 7, 5, 2.5, 0.03
    layer = csext.GatedHFConv1D(nf, nx, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
        layer.mask_logits.copy_(mask_logits_like(layer.weight, torch.float64))
    layer.beta, layer.hard, layer.penalty, layer.backend = beta, hard, lam, backend
    x = torch.randn(2, nx, 3, dtype=torch.float64).transpose(1, 2).requires_grad_()  # (2, 3, nx), strided
    grad_out = torch.randn(2, 3, nf, dtype=torch.float64)
    y = layer(x)
    (y * grad_out).sum().backward()

    leaves = [t.detach().clone().requires_grad_() for t in (x, layer.weight, layer.mask_logits, layer.bias)]
    expected, penalty = _explicit(*leaves, beta, hard, lam)
    ((expected * grad_out).sum() + penalty).backward()
    torch.testing.assert_close(y, expected)
    for name, got, leaf in zip(("x", "weight", "mask_logits", "bias"),
                               (x.grad, layer.weight.grad, layer.mask_logits.grad, layer.bias.grad), leaves):
        want = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)  # hard: no gradient to s
        torch.testing.assert_close(got if got is not None else torch.zeros_like(leaf), want, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gated_hf_conv1d_under_autocast_computes_what_conv1d_does(backend):
    """Under bfloat16 autocast, a GatedHFConv1D gives what transformers' Conv1D gives holding the
    effective weight: addmm in bfloat16."""
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = csext.GatedHFConv1D(9, 6)
    layer.beta, layer.backend = 3.0, backend
    with torch.no_grad():
        layer.bias.normal_()
        layer.mask_logits.copy_(mask_logits_like(layer.weight))
    plain = Conv1D(9, 6)
    with torch.no_grad():
        plain.weight.copy_(layer.effective_weight())
        plain.bias.copy_(layer.bias)
    x = torch.randn(4, 3, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = layer(x), plain(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("backend,device,dtype", FUSED_CASES)
def test_gated_hf_conv1d_on_each_fused_backend_follows_the_comparison_rule(backend, device, dtype, hard):
    """docs/contract.md section 4 for functional.gated_hf_conv1d on every fused backend: output and every
    gradient against the torch backend, on an awkward batched shape."""
    w = torch.randn(19, 37)  # (in_features, out_features), as Conv1D stores it
    tensors = [("x", torch.randn(3, 5, 19)), ("w", w), ("s", mask_logits_like(w)), ("b", torch.randn(37))]

    def op(x, w, s, b, backend):
        return csext.functional.gated_hf_conv1d(x, w, s, 2.3, b, hard=hard, penalty=0.01, backend=backend)

    compare_with_torch_backend(op, tensors, dtype, (3, 5, 37), backend=backend, device=device)


def test_gated_hf_conv1d_compiles_without_a_graph_break():
    torch.manual_seed(0)
    layer = csext.GatedHFConv1D(6, 4)
    layer.penalty, layer.beta = 1e-2, 3.0
    with torch.no_grad():
        layer.mask_logits.copy_(mask_logits_like(layer.weight))
    assert_compiles_as_eager(layer, torch.randn(3, 2, 4))


def test_gated_hf_conv1d_traces_as_one_call_and_refuses_bad_shapes():
    torch.manual_seed(0)
    model = torch.nn.Sequential(csext.GatedHFConv1D(4, 3), torch.nn.ReLU())
    traced = torch.fx.symbolic_trace(model)
    assert [n.target.__name__ for n in traced.graph.nodes if n.op == "call_function"] == ["gated_hf_conv1d"]
    x = torch.randn(2, 5, 3)
    torch.testing.assert_close(traced(x), model(x))
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 3\) to match in_features, got \(2, 4\)"):
        model(torch.randn(2, 4))
    with pytest.raises(ValueError, match="weight must be 2-D"):
        csext.functional.gated_hf_conv1d(x, torch.randn(3), torch.randn(3), 1.0)


def test_gated_hf_conv1d_refuses_other_layers_and_initialises_like_conv1d():
    with pytest.raises(TypeError, match="module must be a transformers Conv1D, got Linear"):
        csext.GatedHFConv1D.from_dense(torch.nn.Linear(3, 2))
    layer = csext.GatedHFConv1D(8, 300, mask_init=-0.25)
    assert layer.weight.shape == layer.mask_logits.shape == (300, 8) and layer.bias.shape == (8,)
    assert torch.all(layer.bias == 0) and torch.all(layer.mask_logits == -0.25)
    assert abs(layer.weight.std().item() - 0.02) < 0.003  # Conv1D's normal(0, 0.02)


def test_gpt2_sparsify_train_finalize_and_reload(tmp_path):
    """A GPT-2 from a config: sparsify gates every Conv1D (sharing its Parameters, keeping its
    state_dict shapes), computes the dense model's logits with every gate open, trains with lam in
    the backward, and its finalized ticket saves and reloads with plain transformers to the same
    logits; export's prune form (and back) and to_sparse compute them too."""
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 50, (4, 12))
    with torch.no_grad():
        dense_logits = model(ids).logits
    dense_keys = {k: v.shape for k, v in model.state_dict().items()}
    conv1d = {name: m.weight for name, m in model.named_modules() if isinstance(m, Conv1D)}
    assert len(conv1d) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block

    with pytest.raises(ValueError, match="lm_head.weight is tied to transformer.wte.weight"):
        csext.sparsify(copy.deepcopy(model))
    gated = csext.sparsify(model, mask_init=0.5, penalty=1e-4, exclude=["lm_head"])
    assert [type(m) for m in gated] == [csext.GatedHFConv1D] * 8
    assert {name: m.weight for name, m in csext.gated_modules(model)}.keys() == conv1d.keys()
    assert all(m.weight is conv1d[name] for name, m in csext.gated_modules(model))  # shared, not copied
    state = model.state_dict()
    assert all(state[k].shape == shape for k, shape in dense_keys.items())
    assert set(state) - set(dense_keys) == {f"{n}.{k}" for n in conv1d for k in ("mask_logits", "_extra_state")}
    csext.set_hard(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense_logits, rtol=0, atol=0)  # every gate open: dense

    csext.set_hard(model, False)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    for step in range(30):
        csext.set_beta(model, csext.schedule.beta_at(step, 30, 50.0))
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        assert all(m.mask_logits.grad.abs().sum() > 0 for m in gated)
        optimizer.step()
    csext.set_hard(model)
    model.eval()
    remaining = csext.sparsity_report(model).remaining
    assert 0.0 < remaining < 1.0
    with torch.no_grad():
        ticket_logits = model(ids).logits
        pruned = csext.export.to_prune_form(copy.deepcopy(model))
        assert all(type(pruned.get_submodule(name)) is Conv1D for name in conv1d)
        for convert in (lambda m: m, csext.export.from_prune_form):
            torch.testing.assert_close(convert(pruned)(ids).logits, ticket_logits, rtol=1e-5, atol=1e-5)
        assert [type(m) for _, m in csext.gated_modules(pruned)] == [csext.GatedHFConv1D] * 8
        sparse_logits = csext.export.to_sparse(copy.deepcopy(model))(ids).logits
    torch.testing.assert_close(sparse_logits, ticket_logits, rtol=1e-5, atol=1e-5)

    csext.finalize(model)
    assert all(type(model.get_submodule(name)) is Conv1D for name in conv1d)
    kept = sum(int((model.get_submodule(n).weight != 0).sum()) for n in conv1d)
    assert kept / sum(w.numel() for w in conv1d.values()) == pytest.approx(remaining)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ticket_logits, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, ticket_logits, rtol=1e-5, atol=1e-5)

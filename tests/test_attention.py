"""GatedMultiheadAttention: nn.MultiheadAttention with its input and output projections gated,
against torch's own attention run on the effective weights."""

import copy
import warnings

import pytest
import torch
from torch import nn

import csext
from numerics import CPU_BACKENDS, FUSED_CASES, assert_compiles_as_eager, compare_with_torch_backend, mask_logits_like


def _gated_attention(batch_first, beta, lam, hard, backend, dtype=torch.float64, **kwargs):
    torch.manual_seed(0)
    attention = csext.GatedMultiheadAttention(8, 2, batch_first=batch_first, dtype=dtype, **kwargs)
    for part in (attention, attention.out_proj):
        with torch.no_grad():
            part.mask_logits.copy_(mask_logits_like(part.weight, dtype))
        part.beta, part.penalty, part.hard, part.backend = beta, lam, hard, backend
    with torch.no_grad():
        for p in (attention.in_proj_bias, attention.out_proj.bias):
            p.normal_()
    return attention


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gated_attention_is_torchs_attention_on_the_effective_weights(backend, batch_first, hard):
    """Output, attention weights and every gradient (lam of both projections in the backward) of
    a GatedMultiheadAttention equal nn.MultiheadAttention's run (torch.func.functional_call) on
    c * w * m, with lam * sum(sigmoid(beta * s)) added to the loss: self-attention, and cross-attention
    with a key padding mask, in float64."""
    beta, lam, scales = 2.0, 0.02, {"": 1.25, "out_proj.": 0.8}
    attention = _gated_attention(batch_first, beta, lam, hard, backend, add_bias_kv=True)
    attention.mask_scale, attention.out_proj.mask_scale = scales[""], scales["out_proj."]  # --rescale's c
    plain = nn.MultiheadAttention(8, 2, batch_first=batch_first, add_bias_kv=True, dtype=torch.float64)
    shape = (3, 5, 8) if batch_first else (5, 3, 8)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    memory = torch.randn((3, 4, 8) if batch_first else (4, 3, 8), dtype=torch.float64, requires_grad=True)
    padding = torch.zeros(3, 4, dtype=torch.bool)
    padding[1, 2:] = True
    for query, key, mask in ((x, x, None), (x, memory, padding)):
        params = dict(attention.named_parameters())
        leaves = {name: p.detach().clone().requires_grad_() for name, p in params.items()}
        clones = {id(t): t.detach().clone().requires_grad_() for t in (query, key)}  # one for self-attention
        inputs = [clones[id(query)], clones[id(key)]]

        def effective(prefix):
            s = leaves[prefix + "mask_logits"]
            mask_ = (s > 0).double() if hard else torch.sigmoid(beta * s)
            return scales[prefix] * leaves[prefix + ("weight" if prefix else "in_proj_weight")] * mask_

        weights = {"in_proj_weight": effective(""), "out_proj.weight": effective("out_proj."),
                   **{k: leaves[k] for k in ("in_proj_bias", "bias_k", "bias_v", "out_proj.bias")}}
        expected, expected_weights = torch.func.functional_call(
            plain, weights, (inputs[0], inputs[1], inputs[1]), {"key_padding_mask": mask})
        penalty = 0.0 if hard else lam * sum(torch.sigmoid(beta * leaves[k]).sum()
                                             for k in ("mask_logits", "out_proj.mask_logits"))
        grad_out = torch.randn_like(expected)
        ((expected * grad_out).sum() + penalty).backward()

        attention.zero_grad()
        for t in (x, memory):
            t.grad = None
        got, got_weights = attention(query, key, key, key_padding_mask=mask)
        (got * grad_out).sum().backward()
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(got_weights, expected_weights)
        for name, p in params.items():
            want = leaves[name].grad if leaves[name].grad is not None else torch.zeros_like(p)  # hard: none to s
            torch.testing.assert_close(p.grad if p.grad is not None else torch.zeros_like(p), want,
                                       msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(query.grad, inputs[0].grad)
        torch.testing.assert_close(key.grad, inputs[1].grad)


def test_sparsify_gates_attention_sharing_its_parameters_and_open_gates_give_the_dense_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True))
    model.eval()
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        dense = model(x)
    attention = model[0].self_attn
    params = {name: p for name, p in attention.named_parameters()}
    state = copy.deepcopy(attention.state_dict())
    gated = csext.sparsify(model, mask_init=1.0, penalty=1e-3)
    assert [type(m) for m in gated] == [csext.GatedMultiheadAttention, csext.GatedLinear, csext.GatedLinear,
                                        csext.GatedLinear]
    assert model[0].self_attn is gated[0] and gated[0].out_proj is gated[1]
    assert all(dict(gated[0].named_parameters())[name] is p for name, p in params.items())  # shared, not copied
    assert all(m.penalty == 1e-3 for m in gated)
    assert set(gated[0].state_dict()) == set(state) | {"mask_logits", "_extra_state", "out_proj.mask_logits",
                                                        "out_proj._extra_state"}
    csext.set_hard(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense, rtol=0, atol=1e-6)  # every gate open


def test_attention_with_other_key_features_is_left_dense_with_a_warning():
    model = nn.Sequential(nn.Linear(4, 4))
    model.cross = nn.MultiheadAttention(8, 2, kdim=6, vdim=6)
    with pytest.warns(UserWarning, match=r"left dense: cross \(nn.MultiheadAttention with kdim or vdim other than "
                                         r"embed_dim"):
        gated = csext.sparsify(model)
    assert [type(m) for m in gated] == [csext.GatedLinear] and type(model.cross) is nn.MultiheadAttention
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        csext.sparsify(copy.deepcopy(model), exclude=["cross"])  # said to: no warning
    with pytest.raises(ValueError, match="kdim and vdim equal to embed_dim"):
        csext.GatedMultiheadAttention(8, 2, kdim=6)


def test_gated_attention_compiles_without_a_graph_break():
    attention = _gated_attention(True, 3.0, 1e-2, False, "auto", dtype=torch.float32)
    x = torch.randn(2, 5, 8)
    assert_compiles_as_eager(attention, x, x, x, output=lambda out: out[0])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gated_attention_under_autocast_computes_what_torchs_attention_does(backend):
    """Under bfloat16 autocast, torch's attention holding the effective weights gives the same
    bfloat16 output (bias_k and bias_v stay float32 in both)."""
    attention = _gated_attention(True, 2.0, 0.0, False, backend, dtype=torch.float32, add_bias_kv=True)
    plain = nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True)
    state = {k: v for k, v in attention.state_dict().items() if "mask_logits" not in k and "_extra_state" not in k}
    with torch.no_grad():
        state["in_proj_weight"] = attention.effective_weight()
        state["out_proj.weight"] = attention.out_proj.effective_weight()
    plain.load_state_dict(state)
    x = torch.randn(2, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = attention(x, x, x)[0], plain(x, x, x)[0]
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("backend,device,dtype", FUSED_CASES)
def test_gated_attention_on_each_fused_backend_follows_the_comparison_rule(backend, device, dtype):
    """docs/contract.md section 4 for a GatedMultiheadAttention (self-attention, soft masks, lam) on every
    fused backend: output and every gradient against the torch backend."""
    attention = csext.GatedMultiheadAttention(16, 4, batch_first=True, device=device)
    w_in, w_out = torch.randn(48, 16) / 4, torch.randn(16, 16) / 4
    tensors = [("x", torch.randn(2, 7, 16)), ("w_in", w_in), ("s_in", mask_logits_like(w_in)),
               ("w_out", w_out), ("s_out", mask_logits_like(w_out)), ("b_in", torch.randn(48)),
               ("b_out", torch.randn(16))]

    def op(x, w_in, s_in, w_out, s_out, b_in, b_out, backend):
        for part in (attention, attention.out_proj):
            part.backend, part.beta, part.penalty = backend, 2.0, 0.01
        params = {"in_proj_weight": w_in, "mask_logits": s_in, "out_proj.weight": w_out,
                  "out_proj.mask_logits": s_out, "in_proj_bias": b_in, "out_proj.bias": b_out}
        return torch.func.functional_call(attention, params, (x, x, x), {"need_weights": False})[0]

    compare_with_torch_backend(op, tensors, dtype, (2, 7, 16), backend=backend, device=device)

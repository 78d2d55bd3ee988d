"""The triton backend against the torch backend by docs/contract.md section 4.

On a machine without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set
by conftest.py): float32 and float16 on small awkward shapes, few enough to keep CI quick. With
a GPU the same tests run on CUDA and add bfloat16 and autocast (bf16).
"""

import functools

import pytest
import torch

import csext
from csext import functional as CF
from numerics import compare_with_torch_backend, mask_logits_like

pytestmark = pytest.mark.skipif("triton" not in csext.backends.available(), reason="Triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _compare(op, tensors, dtype, out_shape):
    compare_with_torch_backend(op, tensors, dtype, out_shape, backend="triton", device=DEVICE)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
LINEAR_SHAPES = [  # (x shape, out_features): none a multiple of a block size
    ((37, 45), 29),
    ((2, 3, 17), 70),
    ((70, 40), 75),  # several tiles along every dimension
    ((1, 40), 33),  # a single row
    ((40,), 33),  # one sample, no batch dimension
]
# One output feature and 9 inputs in float32 only: with 9 weight gradients, a half-precision
# result rounded in another (correct) order than the torch backend's loses the 2x-max rule by
# chance (18 of 200 draws in the CPU interpreter; the cpp backend, which rounds in the torch
# backend's order, in none of them). Larger outputs did not fail in 40 draws each.
LINEAR_CASES = [(shape, dtype) for shape in LINEAR_SHAPES for dtype in DTYPES] + [(((1, 9), 1), torch.float32)]


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("shape,dtype", LINEAR_CASES)
def test_fused_linear_matches_torch_backend(dtype, hard, shape):
    x_shape, n = shape
    w = torch.randn(n, x_shape[-1])
    tensors = [("x", torch.randn(x_shape)), ("w", w), ("s", mask_logits_like(w)), ("b", torch.randn(n))]

    def op(x, w, s, b, backend):
        return CF.gated_linear(x, w, s, 3.7, b, hard=hard, penalty=0.01, backend=backend)

    _compare(op, tensors, dtype, x_shape[:-1] + (n,))


@pytest.mark.parametrize("frozen", ["nothing", "w", "w and s", "everything but b"])
@pytest.mark.parametrize("rows", [0, 1, 70])
def test_fused_bias_gradient(frozen, rows):
    """dL/db from the weight-gradient GEMM's G tiles (the first column of programs writes it),
    or, with w and s frozen, summed on its own; no rows give zeros."""
    w = torch.randn(75, 40, device=DEVICE)
    leaves = {"x": torch.randn(rows, 40, device=DEVICE), "w": w, "s": mask_logits_like(w).to(DEVICE),
              "b": torch.randn(75, device=DEVICE)}
    needs = {"nothing": "xwsb", "w": "xsb", "w and s": "xb", "everything but b": "b"}[frozen]
    leaves = {name: t.requires_grad_(name in needs) for name, t in leaves.items()}
    grad_out = torch.randn(rows, 75, device=DEVICE)
    results = []
    for backend in ("triton", "torch"):
        y = CF.gated_linear(leaves["x"], leaves["w"], leaves["s"], 2.0, leaves["b"], penalty=0.01, backend=backend)
        results.append(torch.autograd.grad(y, [leaves[name] for name in needs], grad_out))
    for name, got, want in zip(needs, *results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("split", [3, 5])
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_split_k_gemms_match_torch_backend(monkeypatch, dtype, hard, split):
    """The forward and input-gradient GEMMs with SPLIT programs per output tile
    (kernels/gated_matmul.py): K = 200 is 7 BLOCK_K steps, 3, 3 and 1 of them over 3 programs,
    and 2, 2, 2, 1 and none over 5; several tiles along M and N."""
    from csext.kernels import gated_matmul as mm

    split_k = {**mm.FIXED_GATED_CONFIG, "SPLIT": split}
    monkeypatch.setattr(mm, "gated_matmul", functools.partial(mm.gated_matmul, config=split_k))
    w = torch.randn(75, 200)
    tensors = [("x", torch.randn(70, 200)), ("w", w), ("s", mask_logits_like(w)), ("b", torch.randn(75))]

    def op(x, w, s, b, backend):
        return CF.gated_linear(x, w, s, 3.7, b, hard=hard, penalty=0.01, backend=backend)

    _compare(op, tensors, dtype, (70, 75))


def test_split_k_is_deterministic_and_leaves_its_counters_at_zero():
    """Whichever program of a tile comes last adds the partial sums in split order: the same bits
    on every call, and a one-program-per-tile result to float32 rounding. Each launch leaves the
    tile counters at zero for the next (the three calls here share them). Split-K is tried for
    small outputs only."""
    from csext.kernels import gated_matmul as mm

    x, w = torch.randn(70, 200, device=DEVICE), torch.randn(75, 200, device=DEVICE)
    s, b, beta = mask_logits_like(w).to(DEVICE), torch.randn(75, device=DEVICE), torch.tensor(2.0, device=DEVICE)
    outs = []
    for split in (3, 3, 3, 1):
        out = torch.full((70, 75), float("nan"), device=DEVICE)
        mm.gated_matmul(x, w, s, beta, b, out, False, "ieee", torch.float32,
                        config={**mm.FIXED_GATED_CONFIG, "SPLIT": split})
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    torch.testing.assert_close(outs[0], outs[3], rtol=1e-5, atol=1e-4)
    assert mm._tile_counters and not any(counters.any() for counters in mm._tile_counters.values())
    # autotuning tries split-K only where the output has few tiles and the reduction many steps
    assert mm._workspace_splits(256, 4096, 4096, {}) == mm.MAX_SPLIT
    assert mm._workspace_splits(8192, 4096, 4096, {}) == mm._workspace_splits(256, 4096, 64, {}) == 1
    tried = mm._prune_gated(mm.GATED_CONFIGS, {"M": 8192, "N": 4096, "K": 4096})
    assert tried and all(config.kwargs["SPLIT"] == 1 for config in tried)


@pytest.mark.parametrize("fused_max_rows", [0, 4096])
@pytest.mark.parametrize("mask_scale", [1.0, 1.7])
def test_both_linear_paths_with_bias_and_mask_scale(monkeypatch, fused_max_rows, mask_scale):
    """Both linear paths (fused GEMMs; elementwise gate + library GEMM), with mask_scale."""
    monkeypatch.setattr(csext.backends.triton, "FUSED_MAX_ROWS", fused_max_rows)
    w = torch.randn(19, 33)
    tensors = [("x", torch.randn(21, 33)), ("w", w), ("s", mask_logits_like(w)), ("b", torch.randn(19))]

    def op(x, w, s, b, backend):
        return CF.gated_linear(x, w, s, 2.0, b, penalty=0.05, backend=backend, mask_scale=mask_scale)

    _compare(op, tensors, torch.float32, (21, 19))


def test_non_contiguous_input_and_gradient():
    """x a transposed view, the bias a strided one, the output gradient an expanded one: the
    kernels follow strides."""
    w = torch.randn(23, 31, device=DEVICE, requires_grad=True)
    s = mask_logits_like(w).to(DEVICE).requires_grad_()
    x = torch.randn(31, 40, device=DEVICE).t().requires_grad_()
    b = torch.randn(23, 2, device=DEVICE)[:, 1].requires_grad_()
    grads = {}
    for backend in ("triton", "torch"):
        for t in (w, s, x, b):
            t.grad = None
        y = CF.gated_linear(x, w, s, 2.5, b, penalty=0.1, backend=backend)
        y.backward(torch.ones(1, 1, device=DEVICE).expand_as(y))
        grads[backend] = (y.detach(), x.grad, w.grad, s.grad, b.grad)
    for a, b in zip(grads["triton"], grads["torch"]):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5)


def _fused_layer_leaves(requires=("x", "w", "s", "b"), x_shape=(6, 13)):
    w = torch.randn(9, 13, device=DEVICE)
    leaves = {"x": torch.randn(x_shape, device=DEVICE), "w": w, "s": mask_logits_like(w).to(DEVICE),
              "b": torch.randn(9, device=DEVICE)}
    return {name: t.requires_grad_(name in requires) for name, t in leaves.items()}


@pytest.mark.parametrize("op", ["fused linear", "fused linear, batched x", "gate"])
@pytest.mark.parametrize("needs", ["xwsb", "xw", "s", "b"])
@pytest.mark.parametrize("hard", [False, True])
def test_gradients_of_any_subset_of_leaves(op, needs, hard):
    """The gate and the fused layer compute the gradients their leaves need, and those are the
    torch backend's, a batched x included; under the hard mask s takes none."""
    results = {}
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        leaves = _fused_layer_leaves(needs, x_shape=(2, 3, 13) if op.endswith("batched x") else (6, 13))
        if op != "gate":
            y = CF.gated_linear(leaves["x"], leaves["w"], leaves["s"], 2.5, leaves["b"], hard=hard, penalty=0.1,
                                backend=backend)
        else:
            y = CF.gate(leaves["w"], leaves["s"], 2.5, hard=hard, penalty=0.1, backend=backend)
        edges = "ws" if op == "gate" else "xwsb"
        assert y.requires_grad == any(name in needs and not (hard and name == "s") for name in edges)
        if y.requires_grad:
            y.square().sum().backward()
        results[backend] = [y.detach()] + [leaves[name].grad for name in "xwsb"]
    for i, (a, b) in enumerate(zip(results["triton"], results["torch"])):
        assert (a is None) == (b is None), i
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fused_layer_keeps_autograd_contracts(monkeypatch):
    """The fused layer saves x, w and s through save_for_backward: through saved-tensor hooks,
    checked for in-place changes, freed after the backward; an error in its backward reaches the
    caller; forward-mode AD, which the triton backend does not have, is refused."""
    from torch.autograd import forward_ad

    from csext.backends import triton

    def call(leaves, **kwargs):
        return CF.gated_linear(leaves["x"], leaves["w"], leaves["s"], 2.0, leaves["b"], penalty=0.1,
                               backend="triton", **kwargs)

    packed = []
    leaves = _fused_layer_leaves()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        y = call(leaves)
    assert {id(leaves[name]) for name in "xws"} <= {id(t) for t in packed}
    y.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.sum().backward()

    y = call(leaves)
    with torch.no_grad():
        leaves["x"].mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()

    def fail(*args):
        raise ValueError("from the backward")

    monkeypatch.setattr(triton, "_launch_linear_grad_input", fail)
    with pytest.raises(ValueError, match="from the backward"):
        call(leaves).sum().backward()

    leaves = _fused_layer_leaves(requires=())
    with forward_ad.dual_level():
        duals = {name: forward_ad.make_dual(t, torch.randn_like(t)) for name, t in leaves.items()}
        with pytest.raises(NotImplementedError, match="jvp"):
            call(duals)


@pytest.fixture
def full_fp32():
    """No TF32 in cuDNN's convolutions (on by default) or cuBLAS: the tests that compare float32
    results at a fixed tolerance compare the math, not TF32's rounding of slightly different inputs.
    (Set and restored by hand: torch.backends.cuda.matmul serves allow_tf32 from __getattr__, which
    some pytest versions' monkeypatch does not see.)"""
    cudnn, cublas = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, cublas.allow_tf32
    cudnn.allow_tf32 = cublas.allow_tf32 = False
    yield
    cudnn.allow_tf32, cublas.allow_tf32 = saved


def _shifted(t: torch.Tensor, by: int) -> torch.Tensor:
    """t's values in a view `by` elements into its storage (not 16-byte aligned), differentiably."""
    return torch.cat([t.new_zeros(by), t.flatten()])[by:].view(t.shape) if by else t


@pytest.mark.parametrize("fused_max_rows", [0, 4096])
def test_repeated_calls_with_fresh_data_and_unaligned_tensors(monkeypatch, fused_max_rows):
    """Each kernel three times on fresh data: on a GPU the second call launches the binary kept
    from the first (kernels/launch.py) and the third, on tensors 2 elements into their storage,
    needs another one, which Triton compiles for unaligned pointers."""
    from csext.kernels import gate, gated_matmul

    monkeypatch.setattr(csext.backends.triton, "FUSED_MAX_ROWS", fused_max_rows)
    for shift in (0, 0, 2):
        w = torch.randn(19, 37)
        tensors = [("x", torch.randn(21, 37)), ("w", w), ("s", mask_logits_like(w)), ("b", torch.randn(19))]

        def op(x, w, s, b, backend):
            x, w, s = (_shifted(t, shift) for t in (x, w, s))
            return CF.gated_linear(x, w, s, 2.0, b, penalty=0.05, backend=backend)

        _compare(op, tensors, torch.float16, (21, 19))
    if DEVICE == "cuda":
        used = [gate._launch_forward, gate._launch_backward] if fused_max_rows == 0 else [
            gated_matmul._launch_matmul, gated_matmul._launch_weight_grad]
        assert all(launcher.binaries for launcher in used)


@pytest.mark.parametrize("layer", ["fused linear", "fused linear, batched x", "gate + linear", "conv2d"])
@pytest.mark.parametrize("hard,of", [(False, "x"), (False, "w"), (False, "s"), (True, "x"), (True, "w")])
def test_double_backward(monkeypatch, full_fp32, layer, hard, of):
    """create_graph=True: a loss on a gradient (of x: a gradient penalty; of w or s) differentiates
    back to x, w, s and b as on the torch backend, penalty included."""
    monkeypatch.setattr(csext.backends.triton, "FUSED_MAX_ROWS", 4096 if layer.startswith("fused linear") else 0)
    if layer == "conv2d":
        x, w = torch.randn(2, 4, 5, 6, device=DEVICE), torch.randn(6, 2, 3, 3, device=DEVICE)
        call = lambda x, w, s, b, backend: CF.gated_conv2d(  # noqa: E731
            x, w, s, 2.0, b, 1, 1, 1, 2, hard=hard, penalty=0.01, backend=backend)
    else:
        x_shape = (2, 3, 5) if layer.endswith("batched x") else (3, 5)
        x, w = torch.randn(x_shape, device=DEVICE), torch.randn(4, 5, device=DEVICE)
        call = lambda x, w, s, b, backend: CF.gated_linear(  # noqa: E731
            x, w, s, 2.0, b, hard=hard, penalty=0.01, backend=backend)
    s, b = mask_logits_like(w).to(DEVICE), torch.randn(w.shape[0], device=DEVICE)
    grads = {}
    for backend in ("triton", "torch"):
        leaves = [t.clone().requires_grad_() for t in (x, w, s, b)]
        (grad,) = torch.autograd.grad(call(*leaves, backend).square().sum(), leaves["xws".index(of)],
                                      create_graph=True)
        grad.square().sum().backward()
        grads[backend] = [t.grad for t in leaves]
    for name, got, want in zip("xwsb", grads["triton"], grads["torch"]):
        assert (got is None) == (want is None), name
        if want is not None:
            scale = max(want.abs().max().item(), 1.0)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * scale, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("kind", ["gate", "fused linear", "gate + linear", "conv2d"])
def test_forward_mode_ad_is_refused(monkeypatch, kind):
    """The triton backend has no forward-mode AD (torch.func.jvp, jacfwd, hessian; a dual level):
    each layer says so instead of returning a wrong tangent. The torch and cpp backends have it."""
    monkeypatch.setattr(csext.backends.triton, "FUSED_MAX_ROWS", 4096 if kind == "fused linear" else 0)
    w = torch.randn(4, 5, device=DEVICE)
    s = mask_logits_like(w).to(DEVICE)
    if kind == "conv2d":
        x, w = torch.randn(2, 4, 5, 6, device=DEVICE), torch.randn(6, 2, 3, 3, device=DEVICE)
        s = mask_logits_like(w).to(DEVICE)
        call = lambda w: CF.gated_conv2d(x, w, s, 2.0, None, 1, 1, 1, 2, backend="triton")  # noqa: E731
    elif kind == "gate":
        call = lambda w: CF.gate(w, s, 2.0, backend="triton")  # noqa: E731
    else:
        x = torch.randn(3, 5, device=DEVICE)
        call = lambda w: CF.gated_linear(x, w, s, 2.0, backend="triton")  # noqa: E731
    with pytest.raises(NotImplementedError, match="jvp"):
        torch.func.jvp(call, (w,), (torch.randn_like(w),))


@pytest.mark.parametrize("path", ["fused", "gate"])
def test_torch_func_transforms_match_torch_backend(monkeypatch, full_fp32, path):
    """torch.func's grad (nested too), jacrev and vmap (over x, over the weights, per-sample
    gradients, a grad over a vmap) through the triton layers give the torch backend's results,
    penalty included."""
    monkeypatch.setattr(csext.backends.triton, "FUSED_MAX_ROWS", 4096 if path == "fused" else 0)
    x, w = torch.randn(3, 5, device=DEVICE), torch.randn(4, 5, device=DEVICE)
    s, b = mask_logits_like(w).to(DEVICE), torch.randn(4, device=DEVICE)
    xs, ws, bs = torch.randn(6, 3, 5, device=DEVICE), torch.randn(6, 4, 5, device=DEVICE), torch.randn(4, 6, device=DEVICE)
    xc, wc = torch.randn(2, 4, 5, 6, device=DEVICE), torch.randn(2, 6, 2, 3, 3, device=DEVICE)
    sc = mask_logits_like(wc[0]).to(DEVICE)
    results = {}
    for backend in ("triton", "torch"):
        def layer(x, w, s, b=b):
            return CF.gated_linear(x, w, s, 2.0, b, penalty=0.01, backend=backend)

        def loss(w, s, x=x):
            return layer(x, w, s).square().sum()

        def conv(w):
            return CF.gated_conv2d(xc, w, sc, 2.0, None, 1, 1, 1, 2, penalty=0.01, backend=backend)

        func = torch.func
        results[backend] = [
            *func.grad(loss, argnums=(0, 1))(w, s),
            func.grad(lambda w: func.grad(loss)(w, s).square().sum())(w),
            *func.jacrev(layer, argnums=(1, 2))(x, w, s),
            func.vmap(layer, in_dims=(0, None, None))(xs, w, s),
            func.vmap(layer, in_dims=(0, 0, None))(xs, ws, s),
            func.vmap(layer, in_dims=(None, None, None, 1))(x, w, s, bs),
            *func.vmap(func.grad(loss, argnums=(0, 1)), in_dims=(None, None, 0))(w, s, xs),
            *func.grad(lambda w, s: func.vmap(layer, in_dims=(0, None, None))(xs, w, s).sum(), argnums=(0, 1))(w, s),
            func.vmap(conv)(wc),
        ]
    for i, (got, want) in enumerate(zip(results["triton"], results["torch"], strict=True)):
        scale = max(want.abs().max().item(), 1.0)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * scale, msg=lambda m: f"result {i}: {m}")


@pytest.mark.parametrize("path", ["fused", "gate"])
def test_eager_calls_after_torch_func_grad_at_the_same_beta(monkeypatch, full_fp32, path):
    """A beta first used inside torch.func.grad is made there as a wrapper whose level ends with
    the transform. The beta cache must not keep it: the kernels read beta by pointer, and on CUDA
    a later eager call at that beta failed ("Cannot access data pointer of Tensor that doesn't
    have storage")."""
    from csext.backends import common

    monkeypatch.setattr(csext.backends.triton, "FUSED_MAX_ROWS", 4096 if path == "fused" else 0)
    monkeypatch.setattr(common, "_beta_tensors", {})
    beta = 3.0625
    x, w = torch.randn(3, 5, device=DEVICE), torch.randn(4, 5, device=DEVICE)
    s = mask_logits_like(w).to(DEVICE)
    torch.func.grad(lambda w: CF.gated_linear(x, w, s, beta, backend="triton").sum())(w)
    assert not any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in common._beta_tensors.values())
    w_ref = w.clone().requires_grad_()
    w.requires_grad_()
    got, want = (CF.gated_linear(x, weight, s, beta, backend=b) for weight, b in ((w, "triton"), (w_ref, "torch")))
    got.square().sum().backward()
    want.square().sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hard", [False, True])
def test_elementwise_gate_for_conv_weights(dtype, hard):
    w = torch.randn(6, 3, 3, 5)
    tensors = [("x", torch.randn(2, 6, 9, 11)), ("w", w), ("s", mask_logits_like(w)), ("b", torch.randn(6))]

    def op(x, w, s, b, backend):
        return CF.gated_conv2d(x, w, s, 1.9, b, 1, (1, 2), 1, 2, hard=hard, penalty=0.02, backend=backend)

    _compare(op, tensors, dtype, (2, 6, 9, 11))


def test_gate_channels_last_and_saturated_beta():
    w = torch.randn(8, 4, 3, 3, device=DEVICE).to(memory_format=torch.channels_last)
    s = (mask_logits_like(w) * 0.2).to(DEVICE).to(memory_format=torch.channels_last)
    out = CF.gate(w, s, 200.0, backend="triton")
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, csext.reference.gate(w, s, 200.0), rtol=2e-6, atol=1e-7)
    _compare(lambda w, s, backend: CF.gate(w, s, 200.0, penalty=1e-3, backend=backend),
             [("w", w.cpu().contiguous()), ("s", s.cpu().contiguous())], torch.float32, w.shape)


def test_autocast():
    """Under autocast the kernels run in the autocast dtype; weights and gradients stay float32."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    layer = csext.GatedLinear(45, 29, device=DEVICE)
    with torch.no_grad():
        layer.mask_logits.copy_(mask_logits_like(layer.weight))
    layer.beta, layer.penalty = 2.0, 0.01
    x = torch.randn(37, 45, device=DEVICE)
    results = {}
    for backend in ("triton", "torch"):
        layer.backend = backend
        layer.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=dtype):
            y = layer(x)
        y.float().square().sum().backward()
        results[backend] = (y.detach().float(), layer.weight.grad, layer.mask_logits.grad, layer.bias.grad)
        assert y.dtype == dtype and layer.weight.grad.dtype == torch.float32
    for a, b in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2)


def _graph_node_names(node) -> set:
    """The type names of the autograd nodes from `node` down to the leaves."""
    names, todo = set(), [node]
    while todo:
        node = todo.pop()
        if node is not None:
            names.add(type(node).__name__)
            todo.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("x_shape", [(37, 45), (2, 3, 45)])
@pytest.mark.parametrize("hard", [False, True])
def test_fused_gemms_cast_x_as_autocast_would(x_shape, hard):
    """Under autocast the fused GEMMs take float32 x and cast its tiles themselves, with no
    autograd node for the cast; output and every gradient are those of x cast beforehand, bit for
    bit (dL/dx rounded to the autocast dtype, then stored in x's)."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    w = torch.randn(29, 45, device=DEVICE, requires_grad=True)
    s = mask_logits_like(w).to(DEVICE).requires_grad_()
    b = torch.randn(29, device=DEVICE, requires_grad=True)
    x = torch.randn(x_shape, device=DEVICE, requires_grad=True)
    results = []
    for cast_first in (False, True):
        with torch.autocast(DEVICE, dtype=dtype):
            y = CF.gated_linear(x.to(dtype) if cast_first else x, w, s, 2.5, b, hard=hard, penalty=0.01,
                                backend="triton")
        assert y.dtype == dtype
        nodes = _graph_node_names(y.grad_fn)
        assert ("ToCopyBackward0" in nodes) == cast_first, nodes
        leaves = [x, w, b] if hard else [x, w, s, b]
        results.append([y, *torch.autograd.grad((y.float() * torch.linspace(-1, 1, 29, device=DEVICE)).sum(),
                                                leaves)])
    for folded, cast_first in zip(*results):
        assert folded.dtype == cast_first.dtype
        torch.testing.assert_close(folded, cast_first, rtol=0, atol=0)


def test_compiled_route_under_autocast_matches_eager():
    """torch.compile takes float32 x under autocast as eager mode does."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    layer = csext.GatedLinear(45, 29, device=DEVICE)
    layer.backend, layer.penalty = "triton", 0.01
    x = torch.randn(37, 45, device=DEVICE, requires_grad=True)
    results = []
    torch._dynamo.reset()
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    for run in (layer, torch.compile(layer, fullgraph=True, backend=backend)):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast(DEVICE, dtype=dtype):
            y = run(x)
        y.float().square().sum().backward()
        results.append([y, x.grad, layer.weight.grad, layer.mask_logits.grad, layer.bias.grad])
    assert results[1][0].dtype == dtype and results[1][1].dtype == torch.float32
    # the same kernels; inductor may sum the bias gradient in another order
    tolerance = dict(rtol=0, atol=0) if backend == "aot_eager" else dict(rtol=1e-4, atol=1e-4)
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, **tolerance)


@pytest.mark.parametrize("of", ["x", "w"])
def test_double_backward_under_autocast_reaches_x(of):
    """create_graph=True with float32 x under autocast: a loss on dL/dx or on dL/dw
    differentiates back to x and the weights as it does with x cast beforehand."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    w = torch.randn(6, 9, device=DEVICE)
    tensors = (torch.randn(5, 9, device=DEVICE), w, mask_logits_like(w).to(DEVICE), torch.randn(6, device=DEVICE))
    results = []
    for cast_first in (False, True):
        x, w, s, b = leaves = [t.clone().requires_grad_() for t in tensors]
        with torch.autocast(DEVICE, dtype=dtype):
            y = CF.gated_linear(x.to(dtype) if cast_first else x, w, s, 2.0, b, penalty=0.01, backend="triton")
        # dL/dw of a loss linear in y depends on x alone through the layer's own backward
        loss = y.float().square().sum() if of == "x" else (y.float() * torch.linspace(-1, 2, 6, device=DEVICE)).sum()
        (grad,) = torch.autograd.grad(loss, x if of == "x" else w, create_graph=True)
        grad.square().sum().backward()
        results.append([t.grad for t in leaves])
    assert results[0][0] is not None, "no gradient reached x"
    for name, folded, cast_first in zip("xwsb", *results):
        assert (folded is None) == (cast_first is None), name
        if folded is not None:  # half-precision sums added up in another order on each side
            scale = cast_first.abs().max().item()
            torch.testing.assert_close(folded, cast_first, rtol=1e-2, atol=1e-2 * scale, msg=lambda m: f"{name}: {m}")


def test_compile_fullgraph_without_recompiling_for_beta_or_penalty():
    layer = csext.GatedLinear(17, 11, device=DEVICE)
    layer.backend, layer.penalty = "triton", 0.01
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"  # the interpreter has no Inductor codegen
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    x = torch.randn(5, 17, device=DEVICE)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for beta, penalty in ((1.0, 0.01), (2.0, 0.02), (3.5, 0.015), (7.25, 0.1), (200.0, 0.5)):
        layer.beta, layer.penalty = beta, penalty  # lam steered too
        y = compiled(x)
        y.sum().backward()
        torch.testing.assert_close(y, CF.gated_linear(x, layer.weight, layer.mask_logits, beta, layer.bias,
                                                      backend="torch"), rtol=1e-5, atol=1e-5)
    # dynamo compiles once for the first value, then once more with beta dynamic
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2


@pytest.mark.parametrize("fused_max_rows", [0, 4096])
@pytest.mark.parametrize("hard", [False, True])
def test_compiled_autograd_matches_eager(monkeypatch, full_fp32, fused_max_rows, hard):
    """torch._dynamo.compiled_autograd traces the triton layers' backwards (the custom ops,
    opaque: it cannot trace the Launcher's launches) and gets eager's gradients."""
    from torch import nn

    monkeypatch.setattr(csext.backends.triton, "FUSED_MAX_ROWS", fused_max_rows)
    torch._dynamo.reset()
    model = nn.Sequential(csext.GatedConv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          csext.GatedLinear(4 * 25, 2)).to(DEVICE)
    csext.set_hard(model, hard)
    for _, m in csext.gated_modules(model):
        m.backend, m.penalty = "triton", 0.01
    x = torch.randn(3, 3, 5, 5, device=DEVICE, requires_grad=True)
    tensors = list(model.parameters()) + [x]

    def backward():
        for t in tensors:
            t.grad = None
        model(x).square().sum().backward()
        return [t.grad for t in tensors]

    eager = backward()
    with torch._dynamo.compiled_autograd._enable(torch.compile(backend="eager", fullgraph=True)):
        compiled = backward()
    for i, (a, b) in enumerate(zip(eager, compiled)):
        assert (a is None) == (b is None), i
        if a is not None:
            torch.testing.assert_close(b, a, msg=lambda m: f"tensor {i}: {m}")


def test_opcheck_triton_ops():
    from csext.backends import triton as _triton

    w = torch.randn(13, 21, device=DEVICE)
    s = mask_logits_like(w).to(DEVICE)
    x = torch.randn(7, 21, device=DEVICE)
    g = torch.randn(7, 13, device=DEVICE)
    beta = _triton.device_beta(2.0, w.device)
    torch.library.opcheck(_triton.triton_gate, (w, s, beta, False, 0.01, torch.float32))
    torch.library.opcheck(_triton.triton_gate_backward, (g.new_ones(w.shape), w, s, beta, 0.01))
    half = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    torch.library.opcheck(_triton.triton_gated_linear,
                          (x, w, s, beta, torch.randn(13, device=DEVICE), False, 0.01, torch.float32))
    torch.library.opcheck(_triton.triton_gated_linear, (x, w, s, beta, None, False, 0.01, half))  # autocast's
    torch.library.opcheck(_triton.triton_gated_linear_grad_input, (g, w, s, beta, True, torch.float32))
    torch.library.opcheck(_triton.triton_gated_linear_grad_input, (g.to(half), w, s, beta, False, torch.float32))
    torch.library.opcheck(_triton.triton_gated_linear_grad_weight, (g, x, w, s, beta, False, 0.01, True, True))
    torch.library.opcheck(_triton.triton_gated_linear_grad_weight, (g, x, w, s, beta, True, 0.01, True, False))
    torch.library.opcheck(_triton.triton_gated_linear_grad_weight, (g.to(half), x, w, s, beta, False, 0.01, True, True))


def test_float64_is_refused_with_a_clear_error():
    w = torch.randn(3, 4, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="triton.*float64"):
        CF.gate(w, torch.randn(3, 4, dtype=torch.float64, device=DEVICE), 1.0, backend="triton")

"""The registered ops pass torch.library.opcheck; torch.compile(fullgraph=True) equals eager."""

import contextlib
import copy

import pytest
import torch
from torch import nn

import csext
from numerics import CPU_BACKENDS, forward_over_reverse, mask_logits_like

needs_cpp = pytest.mark.skipif("cpp" not in csext.backends.available(), reason="the C++ extension is not built")
# cpu runs the cpp backend, cuda (a gpu test) the cuda one
ON_CPU_AND_CUDA = pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu,
    pytest.mark.skipif("cuda" not in csext.backends.available(), reason="the CUDA kernels of csext._C are not built"),
])])


@contextlib.contextmanager
def no_vmap_fallback():
    """torch.vmap without its fallback (one call per batch element, for an op without a vmap
    rule): such an op raises instead."""
    torch._C._functorch._set_vmap_fallback_enabled(False)
    try:
        yield
    finally:
        torch._C._functorch._set_vmap_fallback_enabled(True)


def _gate_samples():
    w = torch.randn(7, 5, requires_grad=True)
    s = mask_logits_like(w).requires_grad_()
    wb = torch.randn(3, 4, 3, 3, dtype=torch.bfloat16, requires_grad=True)
    sb = mask_logits_like(wb).to(memory_format=torch.channels_last).requires_grad_()
    wd = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    sd = mask_logits_like(wd, torch.float64).requires_grad_()
    B = csext.backends.common.beta_tensor
    return [
        (w, s, B(2.0), False, 0.1, None),
        (w, s, B(2.0), True, 0.0, None),
        (w, s, B(5.0), False, 0.0, torch.bfloat16),
        (wb, sb, B(1.0), False, 0.2, None),
        (wb.detach().to(memory_format=torch.channels_last), sb, B(3.0), False, 0.0, torch.float32),
        (wd, sd, B(1.5), False, 0.3, None),
    ]


@needs_cpp
@pytest.mark.parametrize("sample", range(6))
def test_opcheck_gate(sample):
    torch.library.opcheck(torch.ops.csext.gate.default, _gate_samples()[sample])


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck_gate_backward(dtype):
    w = torch.randn(9, 11, dtype=dtype)
    s = mask_logits_like(w, torch.float64 if dtype == torch.float64 else torch.float32)
    g = torch.randn(9, 11, dtype=dtype)
    torch.library.opcheck(torch.ops.csext.gate_backward.default, (g, w, s, csext.backends.common.beta_tensor(2.0), 0.1))



def _layer_samples():
    """(op, args) for csext::gated_linear and csext::gated_conv2d: bias or not, soft or hard,
    a lower-precision compute dtype, channels_last, float64."""
    B = csext.backends.common.beta_tensor
    w = torch.randn(7, 5, requires_grad=True)
    s = mask_logits_like(w).requires_grad_()
    b = torch.randn(7, requires_grad=True)
    cw = torch.randn(6, 2, 3, 3, requires_grad=True)
    cs = mask_logits_like(cw).requires_grad_()
    cb = torch.randn(6, requires_grad=True)
    wd = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    sd = mask_logits_like(wd, torch.float64).requires_grad_()
    x4 = torch.randn(2, 4, 9, 8)
    linear, conv = torch.ops.csext.gated_linear.default, torch.ops.csext.gated_conv2d.default
    return [
        (linear, (torch.randn(3, 5, requires_grad=True), w, s, B(2.0), b, False, 0.1, None)),
        (linear, (torch.randn(2, 3, 5), w, s, B(3.0), None, True, 0.0, None)),
        (linear, (torch.randn(4, 5, dtype=torch.bfloat16), w, s, B(1.5), b, False, 0.2, torch.bfloat16)),
        (linear, (torch.randn(5, 4, dtype=torch.float64, requires_grad=True), wd, sd, B(1.0), None, False, 0.3, None)),
        (conv, (x4.requires_grad_(), cw, cs, B(2.0), cb, [2, 1], [1, 0], [1, 2], 2, False, 0.1, None)),
        (conv, (x4.to(memory_format=torch.channels_last), cw, cs, B(4.0), None, [1, 1], [1, 1], [1, 1], 2, True, 0.0, None)),
        (conv, (x4.bfloat16(), cw, cs, B(1.0), cb, [1, 1], [0, 0], [1, 1], 2, False, 0.0, torch.bfloat16)),
    ]


@needs_cpp
@pytest.mark.parametrize("sample", range(7))
def test_opcheck_gated_layers(sample):
    op, args = _layer_samples()[sample]
    torch.library.opcheck(op, args)


@needs_cpp
@pytest.mark.parametrize("name", ["gate", "gate_backward", "gated_linear", "gated_conv2d"])
def test_ops_are_kept_out_of_cuda_graphs(name):
    """Their CUDA kernels read beta on the host: inside a CUDA graph they would replay the beta
    they were recorded with, so torch.compile's CUDA graphs (reduce-overhead) must run them
    between graphs (tests/test_cuda_graphs.py checks this on a GPU)."""
    assert torch.Tag.cudagraph_unsafe in getattr(torch.ops.csext, name).default.tags


@needs_cpp
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_gated_layer_is_one_autograd_node(kind):
    """Gate and layer in one node (csrc/autograd.cpp); a second backward fails as ATen's do."""
    if kind == "linear":
        layer, x = csext.GatedLinear(5, 3), torch.randn(2, 5)
    else:
        layer, x = csext.GatedConv2d(2, 3, 3), torch.randn(1, 2, 5, 5)
    y = layer(x.requires_grad_())
    assert y.grad_fn.name() == ("csext::GatedLinearBackward" if kind == "linear" else "csext::GatedConv2dBackward")
    assert [f.name() for f, _ in y.grad_fn.next_functions] == ["torch::autograd::AccumulateGrad"] * 4
    y.sum().backward(retain_graph=True)
    first = [t.grad.clone() for t in (x, layer.weight, layer.mask_logits, layer.bias)]
    y.sum().backward()
    for t, g in zip((x, layer.weight, layer.mask_logits, layer.bias), first):
        torch.testing.assert_close(t.grad, 2 * g)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.sum().backward()


@needs_cpp
@pytest.mark.parametrize("kind", ["gate", "linear", "conv2d"])
@pytest.mark.parametrize("hard", [False, True])
def test_forward_mode_ad_matches_torch_backend(kind, hard):
    """torch.func.jvp with a tangent for every input, and for the first alone, equals the torch
    backend's, penalty given (it acts on the backward only)."""
    F64 = torch.float64
    if kind == "gate":
        shape, x = (5, 4), None
    elif kind == "linear":
        shape, x = (5, 4), torch.randn(3, 4, dtype=F64)
    else:
        shape, x = (4, 2, 3, 3), torch.randn(2, 4, 6, 7, dtype=F64)
    w = torch.randn(shape, dtype=F64)
    s = mask_logits_like(w, F64)
    b = torch.randn(shape[0], dtype=F64)

    def run(backend, *args):
        penalty = 0.1
        if kind == "gate":
            return csext.functional.gate(*args, 2.5, hard=hard, penalty=penalty, backend=backend)
        layer = csext.functional.gated_linear if kind == "linear" else csext.functional.gated_conv2d
        x, w, s, b = args
        extra = (1, 1, 1, 2) if kind == "conv2d" else ()  # stride, padding, dilation, groups
        return layer(x, w, s, 2.5, b, *extra, hard=hard, penalty=penalty, backend=backend)

    primals = (w, s) if kind == "gate" else (x, w, s, b)
    tangents = tuple(torch.randn_like(p) for p in primals)
    for chosen in (tangents, tuple(t if i == 0 else torch.zeros_like(t) for i, t in enumerate(tangents))):
        out, tangent = torch.func.jvp(lambda *a: run("cpp", *a), primals, chosen)
        out_ref, tangent_ref = torch.func.jvp(lambda *a: run("torch", *a), primals, chosen)
        torch.testing.assert_close(out, out_ref)
        torch.testing.assert_close(tangent, tangent_ref)


@needs_cpp
@ON_CPU_AND_CUDA
def test_functorch_transforms_match_torch_backend(device):
    """torch.func's grad (nested too), jacrev, jacfwd and vmap (over x, over the weights, over
    the bias, per-sample gradients, and a grad over a vmap) through the C++ layer ops give the
    torch backend's results, penalty included, each op running batched (csrc/autograd.cpp and
    csext/backends/aten.py register their vmap rules), not once per batch element through vmap's
    fallback. Under a grad over a vmap, unbatched weights are gated once and the penalty's
    gradient added once, as on the torch backend (the fallback added it once per element)."""
    F64 = torch.float64
    x, w, b = (torch.randn(*shape, dtype=F64, device=device) for shape in ((3, 5), (4, 5), (4,)))
    s = mask_logits_like(w, F64).to(device)
    xs, ws, bs = (torch.randn(*shape, dtype=F64, device=device) for shape in ((6, 3, 5), (6, 4, 5), (4, 6)))
    xc, wc, xcs = (torch.randn(*shape, dtype=F64, device=device) for shape in ((2, 4, 5, 6), (2, 6, 2, 3, 3),
                                                                                (3, 2, 4, 5, 6)))
    sc = mask_logits_like(wc[0], F64).to(device)
    results = {}
    for backend in ("cpp" if device == "cpu" else "cuda", "torch"):
        def layer(x, w, s, b=b):
            return csext.functional.gated_linear(x, w, s, 2.0, b, penalty=0.1, backend=backend)

        def loss(w, s, x=x):
            return layer(x, w, s).square().sum()

        def conv(x, w, s=sc):
            return csext.functional.gated_conv2d(x, w, s, 2.0, None, 1, 1, 1, 2, penalty=0.1, backend=backend)

        def conv_loss(w, s, x=xc):
            return conv(x, w, s).square().sum()

        func = torch.func
        with no_vmap_fallback():
            results[backend] = [
                *func.grad(loss, argnums=(0, 1))(w, s),
                func.grad(lambda w: func.grad(loss)(w, s).square().sum())(w),
                *func.jacrev(layer, argnums=(1, 2))(x, w, s),
                *func.jacfwd(layer, argnums=(0, 1, 2))(x, w, s),
                *func.jacfwd(conv, argnums=(1, 2))(xc, wc[0], sc),
                func.vmap(layer, in_dims=(0, None, None))(xs, w, s),
                func.vmap(layer, in_dims=(0, 0, None))(xs, ws, s),
                func.vmap(layer, in_dims=(None, 1, 1))(x, ws.movedim(0, 1), ws.movedim(0, 1)),
                func.vmap(layer, in_dims=(None, None, None, 1))(x, w, s, bs),
                *func.vmap(func.grad(loss, argnums=(0, 1)), in_dims=(None, None, 0))(w, s, xs),
                *func.grad(lambda w, s: func.vmap(layer, in_dims=(0, None, None))(xs, w, s).sum(), argnums=(0, 1))(w, s),
                *func.grad(lambda w, s: func.vmap(loss)(w, s).sum(), argnums=(0, 1))(ws, ws.flip(0)),
                func.vmap(conv, in_dims=(None, 0))(xc, wc),
                func.vmap(conv, in_dims=(0, None))(xcs, wc[0]),
                *func.vmap(func.grad(conv_loss, argnums=(0, 1)), in_dims=(None, None, 0))(wc[0], sc, xcs),
                *func.grad(lambda w, s: func.vmap(conv, in_dims=(0, None, None))(xcs, w, s).sum(), argnums=(0, 1))(
                    wc[0], sc),
            ]
    fast, reference = results.values()
    for i, (got, want) in enumerate(zip(fast, reference, strict=True)):
        torch.testing.assert_close(got, want, msg=lambda m: f"result {i}: {m}")



@needs_cpp
@pytest.mark.parametrize("batched", ["weight", "mask_logits", "grad", "beta"])
def test_gate_ops_under_vmap_match_a_loop(batched):
    """csext::gate and csext::gate_backward under torch.vmap: one call on the stacked batch (an
    unbatched operand broadcast to it), or one call per element for a batched beta, each
    element's result as the op gives it alone."""
    n = 3
    args = {"grad": torch.randn(4, 5), "weight": torch.randn(4, 5)}
    args["mask_logits"], args["beta"] = mask_logits_like(args["weight"]), torch.tensor(2.0, dtype=torch.float64)
    stacked = {"beta": torch.tensor([1.5, 2.0, 7.0], dtype=torch.float64)} if batched == "beta" else {
        batched: torch.stack([args[batched] * (1 + i) for i in range(n)], dim=1)}
    in_dims = {"grad": None, "weight": None, "mask_logits": None, "beta": None, batched: 0 if batched == "beta" else 1}
    order = ("grad", "weight", "mask_logits", "beta")
    inputs = [stacked.get(k, args[k]) for k in order]
    one = lambda i: [stacked[k].select(in_dims[k], i) if k in stacked else args[k] for k in order]  # noqa: E731
    ops = torch.ops.csext
    with no_vmap_fallback():
        if batched != "grad":
            got = torch.vmap(lambda w, s, b: ops.gate(w, s, b, False, 0.1, torch.float16),
                             in_dims=tuple(in_dims[k] for k in order[1:]))(*inputs[1:])
            want = torch.stack([ops.gate(*one(i)[1:], False, 0.1, torch.float16) for i in range(n)])
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        got = torch.vmap(lambda *a: ops.gate_backward(*a, 0.1), in_dims=tuple(in_dims[k] for k in order))(*inputs)
        want = [torch.stack(t) for t in zip(*[ops.gate_backward(*one(i), 0.1) for i in range(n)])]
        for g, w_ in zip(got, want, strict=True):
            torch.testing.assert_close(g, w_, rtol=0, atol=0)


@needs_cpp
@pytest.mark.parametrize("where", ["torch.func.grad", "FakeTensorMode"])
def test_beta_cache_keeps_only_plain_tensors(monkeypatch, where):
    """The cached beta tensors (csext.backends.common.beta_tensor) are plain: one first made under
    torch.func.grad (a wrapper whose level ends with the transform) or under a fake mode (a fake
    tensor) is used for that call only, and the next eager call at that beta runs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from csext.backends import common

    monkeypatch.setattr(common, "_beta_tensors", {})
    beta = 3.0625
    w, x = torch.randn(4, 5), torch.randn(3, 5)
    s = mask_logits_like(w)

    def layer(x, w, s):
        return csext.functional.gated_linear(x, w, s, beta, backend="cpp")

    if where == "FakeTensorMode":
        with FakeTensorMode() as mode:
            assert layer(*map(mode.from_tensor, (x, w, s))).shape == (3, 4)
    else:
        torch.func.grad(lambda w: layer(x, w, s).sum())(w)
    assert all(type(t) is torch.Tensor and not torch._C._functorch.is_functorch_wrapped_tensor(t)
               for t in common._beta_tensors.values())
    torch.testing.assert_close(layer(x, w, s), csext.functional.gated_linear(x, w, s, beta, backend="torch"))


@needs_cpp
@ON_CPU_AND_CUDA
@pytest.mark.parametrize("kind", ["linear", "batched linear", "conv2d"])
@pytest.mark.parametrize("hard,of", [(False, "x"), (False, "w"), (False, "s"), (True, "x"), (True, "w")])
def test_double_backward(device, kind, hard, of):
    """create_graph=True: a loss on a gradient (of x: a gradient penalty, a Hessian-vector
    product; of w or s) differentiates back to x, w, s and b as on the torch backend, penalty
    included. A loss on dL/dw or dL/ds goes through csext::gate_backward's own autograd
    (csrc/autograd.cpp): without it the kernel's output has no history and the second
    derivatives came out zero, with only a warning."""
    F64 = torch.float64
    if kind == "conv2d":
        x, w = torch.randn(2, 4, 5, 6, dtype=F64), torch.randn(6, 2, 3, 3, dtype=F64)
    else:
        x_shape = (2, 3, 5) if kind == "batched linear" else (3, 5)
        x, w = torch.randn(x_shape, dtype=F64), torch.randn(4, 5, dtype=F64)
    s, b = mask_logits_like(w, F64), torch.randn(w.shape[0], dtype=F64)
    grads = {}
    for backend in ("cpp" if device == "cpu" else "cuda", "torch"):
        leaves = [t.to(device).requires_grad_() for t in (x, w, s, b)]
        if kind == "conv2d":
            y = csext.functional.gated_conv2d(*leaves[:3], 2.0, leaves[3], 1, 1, 1, 2, hard=hard, penalty=0.1,
                                              backend=backend)
        else:
            y = csext.functional.gated_linear(*leaves[:3], 2.0, leaves[3], hard=hard, penalty=0.1, backend=backend)
        (grad,) = torch.autograd.grad(y.square().sum(), leaves["xws".index(of)], create_graph=True)
        grad.square().sum().backward()
        grads[backend] = [t.grad for t in leaves]
    fast, reference = grads.values()
    for name, got, want in zip("xwsb", fast, reference):
        assert (got is None) == (want is None), name
        if want is not None:
            torch.testing.assert_close(got, want, msg=lambda m: f"{name}: {m}")


@needs_cpp
@ON_CPU_AND_CUDA
@pytest.mark.parametrize("kind", ["gate", "linear", "conv2d"])
def test_forward_over_reverse_matches_torch_backend(device, kind):
    """A backward without create_graph inside a forward-mode dual level gives gradients whose
    tangents are those of the torch backend (the layers' backward then runs through autograd,
    as with create_graph; it dropped the tangents), penalty included."""
    F64 = torch.float64
    if kind == "conv2d":
        x, w = torch.randn(2, 4, 5, 6, dtype=F64), torch.randn(6, 2, 3, 3, dtype=F64)
    else:
        x, w = torch.randn(3, 5, dtype=F64), torch.randn(4, 5, dtype=F64)
    inputs = {"x": x, "w": w, "s": mask_logits_like(w, F64), "b": torch.randn(w.shape[0], dtype=F64)}
    if kind == "gate":
        del inputs["x"], inputs["b"]
    inputs = {name: t.to(device).requires_grad_(name != "x") for name, t in inputs.items()}
    tangents = {name: torch.randn_like(t) for name, t in inputs.items()}
    got = forward_over_reverse(kind, "cpp" if device == "cpu" else "cuda", inputs, tangents)
    want = forward_over_reverse(kind, "torch", inputs, tangents)
    for i, (g, r) in enumerate(zip(got, want, strict=True)):
        assert g is not None, f"result {i}: no tangent"
        torch.testing.assert_close(g, r, msg=lambda m: f"result {i}: {m}")


@needs_cpp
@ON_CPU_AND_CUDA
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_hessian_matches_torch_backend(device, kind):
    """torch.func.hessian (forward over reverse) of a loss in w and s, as on the torch backend."""
    F64 = torch.float64
    if kind == "conv2d":
        x, w = torch.randn(2, 4, 5, 6, dtype=F64, device=device), torch.randn(2, 2, 3, 3, dtype=F64, device=device)
    else:
        x, w = torch.randn(3, 5, dtype=F64, device=device), torch.randn(2, 5, dtype=F64, device=device)
    s = mask_logits_like(w, F64).to(device)
    hessians = {}
    for backend in ("cpp" if device == "cpu" else "cuda", "torch"):
        def loss(w, s, backend=backend):
            if kind == "conv2d":
                y = csext.functional.gated_conv2d(x, w, s, 2.0, None, 1, 1, 1, 2, backend=backend)
            else:
                y = csext.functional.gated_linear(x, w, s, 2.0, backend=backend)
            return y.tanh().sum()

        hessians[backend] = torch.func.hessian(loss, argnums=(0, 1))(w, s)
    fast, reference = hessians.values()
    for i in range(2):
        for j in range(2):
            torch.testing.assert_close(fast[i][j], reference[i][j], msg=lambda m: f"d2/d{'ws'[i]}d{'ws'[j]}: {m}")


@needs_cpp
@pytest.mark.parametrize("hard", [False, True])
def test_compiled_autograd_matches_eager(hard):
    """torch._dynamo.compiled_autograd runs the gate's and the layers' nodes through the
    functions they bind (apply_with_saved), penalty included. In hard mode the mask logits get
    zeros there where eager autograd leaves them without a gradient."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(csext.GatedConv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), csext.GatedLinear(4 * 25, 2))
    csext.set_beta(model, 2.0)
    csext.set_hard(model, hard)
    for _, m in csext.gated_modules(model):
        m.penalty = 0.01
        with torch.no_grad():
            m.mask_logits.copy_(mask_logits_like(m.weight))
    x = torch.randn(3, 3, 5, 5, requires_grad=True)
    tensors = list(model.parameters()) + [x]

    def backward():
        for t in tensors:
            t.grad = None
        conv = model[0]
        extra = csext.functional.gate(conv.weight, conv.mask_logits, 3.0, penalty=0.02).sum()  # a second node on w, s
        (model(x).square().sum() + extra).backward()
        return [t.grad for t in tensors]

    eager = backward()
    with torch._dynamo.compiled_autograd._enable(torch.compile(backend="eager", fullgraph=True)):
        compiled = backward()
    for (name, _), a, b in zip(list(model.named_parameters()) + [("x", None)], eager, compiled):
        if a is None:
            assert hard and name.endswith("mask_logits") and b is not None and not b.any(), name
            continue
        torch.testing.assert_close(b, a, msg=lambda m: f"{name}: {m}")


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = nn.functional.max_pool2d(x, 2).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("backend", [b for b in csext.backends.available() if csext.backends.runs_on(b, "cpu")])
def test_compile_dynamic_shapes_do_not_recompile(backend):
    """torch.compile(dynamic=True) of a linear and a conv layer, trained on three batch sizes:
    one graph, its forward and backward traced with a symbolic batch (no size read as an int)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    linear, conv = csext.GatedLinear(9, 5), csext.GatedConv2d(3, 4, 3, padding=1)
    for layer in (linear, conv):
        layer.backend, layer.penalty = backend, 0.01
    step = torch.compile(lambda x, y: linear(x).sum() + conv(y).sum(), dynamic=True, fullgraph=True,
                         backend="aot_eager")
    for n in (2, 3, 7):
        x, y = torch.randn(n, 9, requires_grad=True), torch.randn(n, 3, 5, 5, requires_grad=True)
        step(x, y).backward()
        assert x.grad.shape == x.shape and y.grad.shape == y.shape
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    eager = SmallNet()
    csext.sparsify(eager, penalty=1e-3)
    csext.set_beta(eager, 3.0)
    for _, m in csext.gated_modules(eager):
        m.backend = backend
        with torch.no_grad():
            m.mask_logits.copy_(mask_logits_like(m.weight))
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 3, 8, 8)
    for step, hard in enumerate([False, False, True]):
        csext.set_hard(eager, hard)
        csext.set_hard(model, hard)
        if step == 1:  # a new temperature must not break the graph
            csext.set_beta(eager, 9.0)
            csext.set_beta(model, 9.0)
        y_eager, y_compiled = eager(x), compiled(x)
        torch.testing.assert_close(y_compiled, y_eager, rtol=1e-5, atol=1e-5)
        y_eager.square().mean().backward()
        y_compiled.square().mean().backward()
        for (name, a), (_, b) in zip(eager.named_parameters(), model.named_parameters()):
            if a.grad is None:
                assert b.grad is None, name
                continue
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
        eager.zero_grad()
        model.zero_grad()


@pytest.mark.parametrize("backend", [b for b in csext.backends.available() if csext.backends.runs_on(b, "cpu")])
def test_torch_export_with_a_dynamic_batch_saves_loads_and_trains(backend):
    """torch.export.export with an unbounded batch dimension (the triton backend's fused linear
    path, up to FUSED_MAX_ROWS rows, must not bound it), run above that bound, through
    torch.export.save / load, and backpropagated. An exported program holds the forward: lam,
    which acts in the backward alone, is not in it (README), so the gradients are compared at 0."""
    import io

    eager = SmallNet()
    csext.sparsify(eager, penalty=0.0)
    csext.set_beta(eager, 3.0)
    for _, m in csext.gated_modules(eager):
        m.backend = backend
        with torch.no_grad():
            m.mask_logits.copy_(mask_logits_like(m.weight))
    eager.fc2.hard = True
    eager.eval()  # BatchNorm from its running statistics, as a deployed model
    batch = torch.export.Dim("batch", min=2)
    program = torch.export.export(copy.deepcopy(eager), (torch.randn(4, 3, 8, 8),), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer).module()
    x = torch.randn(1024 + 3, 3, 8, 8)  # above the triton backend's FUSED_MAX_ROWS
    torch.testing.assert_close(loaded(x), eager(x), rtol=1e-5, atol=1e-5)
    x = torch.randn(5, 3, 8, 8)
    loaded(x).square().mean().backward()
    eager(x).square().mean().backward()
    for (name, a), (_, b) in zip(eager.named_parameters(), loaded.named_parameters()):
        if a.grad is None:
            assert b.grad is None, name
            continue
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_does_not_recompile_for_each_beta_or_penalty(backend):
    """The beta schedule changes beta every epoch (or step), and --target-remaining (or a user's
    warm-up) steers lam: neither may recompile each time (a float argument of the ops did, for
    lam, until Dynamo's recompile limit failed the fullgraph=True call). Gradients stay eager's."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    for m in csext.sparsify(model):
        m.backend = backend
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(5, 2, 4, 4)
    torch._dynamo.utils.counters.clear()
    betas = [1.0, 1.5, 2.25, 4.0, 9.5, 20.0, 47.0, 99.0, 150.0, 200.0]
    penalties = [1e-3, 2e-3, 1.5e-3, 4e-3, 8e-3, 5e-3, 1e-2, 3e-2, 2e-2, 1e-1]
    for beta, penalty in zip(betas, penalties):
        csext.set_beta(model, beta)
        csext.set_penalty(model, penalty)
        compiled(x).sum().backward()
        got = [p.grad for p in model.parameters()]
        model.zero_grad()
        model(x).sum().backward()
        for a, b in zip(got, [p.grad for p in model.parameters()]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        model.zero_grad()
    # dynamo compiles once for the first values, then once more with beta and lam dynamic
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2
    csext.set_hard(model)  # the ticket's retraining: once more, whatever lam is
    for penalty in penalties:
        csext.set_penalty(model, penalty)
        compiled(x).sum().backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3


@needs_cpp
@pytest.mark.parametrize("kind", ["gate", "linear", "conv2d"])
def test_eager_calls_enter_the_ops_unboxed_with_torch_ops_results(monkeypatch, kind):
    """In eager mode the cpp backend calls its ops through csext._C's typed entry
    (csrc/fast_path.cpp): the same op, so the same output and gradients, bit for bit, as through
    torch.ops; a __torch_function__ mode sees the call as torch.ops."""
    from torch.overrides import TorchFunctionMode

    from csext.backends import aten

    w = torch.randn(4, 3, 3, 3) if kind == "conv2d" else torch.randn(5, 7)
    s = mask_logits_like(w)
    x = torch.randn(2, 3, 6, 6) if kind == "conv2d" else torch.randn(2, 3, 7)
    b = torch.randn(w.shape[0])

    def run():
        leaves = [t.clone().requires_grad_() for t in (x, w, s, b)]
        if kind == "gate":
            y = csext.functional.gate(leaves[1], leaves[2], 3.0, penalty=0.01, backend="cpp")
        elif kind == "linear":
            y = csext.functional.gated_linear(*leaves[:3], 3.0, leaves[3], penalty=0.01, backend="cpp")
        else:
            y = csext.functional.gated_conv2d(*leaves[:3], 3.0, leaves[3], (2, 1), 1, penalty=0.01, backend="cpp")
        y.square().sum().backward()
        return [y] + [t.grad for t in leaves]

    calls = []
    original = aten._C

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(original, name)

    op_name = {"gate": "gate", "linear": "gated_linear", "conv2d": "gated_conv2d"}[kind]
    monkeypatch.setattr(aten, "_C", Spy())
    unboxed = run()
    assert calls == [op_name]

    class Seen(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            calls.append(str(func))
            return func(*args, **(kwargs or {}))

    calls.clear()
    with Seen():
        through_torch_ops = run()
    assert op_name not in calls and f"csext.{op_name}.default" in calls
    for a, b in zip(unboxed, through_torch_ops):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)

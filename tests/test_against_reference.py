"""Fused backends against the torch backend by docs/contract.md section 4, on awkward shapes and dtypes."""

import pytest
import torch

import csext
from csext import functional as CF
from numerics import FUSED_BACKENDS, assert_close_rule, compare_with_torch_backend, mask_logits_like, poison_allocator

pytestmark = pytest.mark.skipif(not FUSED_BACKENDS, reason="no fused backend is built")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Every backend that takes CPU tensors here, triton among them in its CPU interpreter.
ON_CPU = [b for b in csext.backends.available() if csext.backends.runs_on(b, "cpu")]
LINEAR_SHAPES = [  # (x shape, out_features)
    ((97, 431), 13),
    ((5, 97), 431),
    ((2, 3, 17), 33),
    ((1, 1), 1),
    ((19,), 6),
]
CONV_SHAPES = [  # (x shape, out_channels, kernel, stride, padding, dilation, groups)
    ((2, 6, 9, 11), 4, 3, 2, 1, 1, 2),
    ((1, 3, 8, 7), 5, (3, 2), 1, 2, 2, 1),
    ((3, 16, 10, 10), 16, 3, 1, 1, 1, 16),
    ((2, 4, 7, 6), 3, (3, 5), 1, "same", (2, 1), 1),  # symmetric 'same': the layer op
    ((2, 4, 7, 6), 3, (3, 4), 1, "same", 1, 1),  # asymmetric 'same': the composite path
    ((1, 2, 6, 6), 3, 3, 2, "valid", 1, 1),
]


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("shape", LINEAR_SHAPES)
def test_linear_matches_torch_backend(backend, dtype, hard, shape):
    x_shape, n = shape
    beta, penalty = 3.7, 0.01
    w = torch.randn(n, x_shape[-1])
    tensors = [("x", torch.randn(x_shape)), ("w", w), ("s", mask_logits_like(w)), ("b", torch.randn(n))]

    def op(x, w, s, b, backend):
        return CF.gated_linear(x, w, s, beta, b, hard=hard, penalty=penalty, backend=backend)

    compare_with_torch_backend(op, tensors, dtype, backend=backend, out_shape=x_shape[:-1] + (n,))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_conv2d_matches_torch_backend(backend, dtype, hard, shape):
    x_shape, cout, kernel, stride, padding, dilation, groups = shape
    beta, penalty = 1.9, 0.02
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    w = torch.randn(cout, x_shape[1] // groups, kh, kw)
    tensors = [("x", torch.randn(x_shape)), ("w", w), ("s", mask_logits_like(w)), ("b", torch.randn(cout))]

    def op(x, w, s, b, backend):
        return CF.gated_conv2d(x, w, s, beta, b, stride, padding, dilation, groups, hard=hard, penalty=penalty, backend=backend)

    out_shape = torch.nn.functional.conv2d(
        torch.empty(x_shape), torch.empty(w.shape), None, stride, padding, dilation, groups
    ).shape
    compare_with_torch_backend(op, tensors, dtype, backend=backend, out_shape=out_shape)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("beta", [1.0, 60.0, 200.0])
def test_gate_across_temperatures(backend, beta):
    """Large beta saturates the sigmoid: the fused slope m * (1 - m) must stay accurate."""
    w = torch.randn(257, 129)
    s = mask_logits_like(w) * 0.2
    tensors = [("w", w), ("s", s)]

    def op(w, s, backend):
        return CF.gate(w, s, beta, penalty=1e-3, backend=backend)

    compare_with_torch_backend(op, tensors, torch.float32, backend=backend, out_shape=w.shape)


@pytest.mark.parametrize("backend", ON_CPU)
@pytest.mark.parametrize("x_shape,n", [((0, 5), 4), ((3, 0), 4), ((3, 5), 0), ((0, 0), 0), ((2, 3, 0), 2), ((0,), 3)])
def test_linear_layers_with_nothing_in_them(backend, x_shape, n):
    """No rows, no inputs or no outputs (nn.Linear(0, 4) is a layer): the output and every
    gradient, with their shapes, as on the torch backend; the bias alone where there are no inputs."""
    k = x_shape[-1]
    tensors = (torch.randn(x_shape), torch.randn(n, k), mask_logits_like(torch.empty(n, k)), torch.randn(n))
    results = {}
    for name in (backend, "torch"):
        leaves = [t.clone().requires_grad_() for t in tensors]
        y = CF.gated_linear(*leaves[:3], 2.0, leaves[3], penalty=0.01, backend=name)
        y.backward(torch.ones_like(y))
        results[name] = [y.detach()] + [t.grad for t in leaves]
    for got, want in zip(results[backend], results["torch"]):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("hard", [False, True])
def test_reference_gate_grads_are_what_autograd_derives(dtype, hard):
    """csext.reference.gate_grads, docs/contract.md section 1's backward written out, against autograd
    through csext.reference.gate, penalty included, the gradient in a narrower dtype."""
    w = torch.randn(6, 7, dtype=dtype, requires_grad=True)
    s = mask_logits_like(w, torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
    out_dtype = torch.float16 if dtype != torch.float64 else dtype
    grad = torch.randn(6, 7).to(out_dtype)
    csext.reference.gate(w, s, 3.0, hard=hard, penalty=0.05, dtype=out_dtype).backward(grad)
    grad_w, grad_s = csext.reference.gate_grads(grad, w.detach(), s.detach(), 3.0, hard=hard, penalty=0.05)
    torch.testing.assert_close(grad_w, w.grad, rtol=0, atol=0)
    if hard:
        assert grad_s is None and s.grad is None
    else:
        torch.testing.assert_close(grad_s, s.grad)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_channels_last_weight(backend):
    w = torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last)
    s = mask_logits_like(w).to(memory_format=torch.channels_last)
    for b in (backend, "torch"):
        out = CF.gate(w, s, 2.0, backend=b)
        assert torch.allclose(out, csext.reference.gate(w, s, 2.0), rtol=2e-6, atol=1e-7)
    out = CF.gate(w, s, 2.0, backend=backend)
    assert out.is_contiguous(memory_format=torch.channels_last)
    mixed = CF.gate(w, s.contiguous(), 2.0, backend=backend)  # different layouts: still correct
    assert torch.allclose(mixed, csext.reference.gate(w, s, 2.0), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_large_tensor_spans_threads(backend):
    """More elements than one parallel task takes, with an odd count: every chunk is written."""
    w = torch.randn(3 * (1 << 15) + 7)
    s = mask_logits_like(w)
    poison_allocator(w)
    out = CF.gate(w, s, 4.0, backend=backend)
    assert_close_rule(out, CF.gate(w, s, 4.0, backend="torch"), CF.gate(w.double(), s.double(), 4.0, backend="torch"), "gate")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_huge_page_sized_outputs(backend):
    """Outputs of many MiB take the kernels' huge-page allocation path: forward and backward."""
    w = torch.randn(1031, 1100)  # 4.3 MiB in float32, not a multiple of 2 MiB
    s = mask_logits_like(w)
    g = torch.randn_like(w)
    results = {}
    for name, dtype in ((backend, torch.float32), ("torch", torch.float32), ("torch", torch.float64)):
        wd, sd = w.to(dtype).detach().requires_grad_(), s.to(dtype).detach().requires_grad_()
        poison_allocator(wd, wd, sd)
        out = CF.gate(wd, sd, 3.0, penalty=0.01, backend=name)
        out.backward(g.to(dtype))
        results[name, dtype] = (out.detach(), wd.grad, sd.grad)
    fused, plain, exact = results[backend, torch.float32], results["torch", torch.float32], results["torch", torch.float64]
    for f, p, e, what in zip(fused, plain, exact, ["output", "grad of w", "grad of s"]):
        assert not torch.isnan(f).any(), f"{what}: NaN (an element left unwritten?)"
        assert_close_rule(f, p, e, what)


@pytest.mark.parametrize("backend", [b for b in ON_CPU if b != "torch"])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
@pytest.mark.parametrize("frozen", ["weight", "mask_logits", "bias"])
@pytest.mark.parametrize("hard", [False, True])
def test_frozen_parameter_gets_no_gradient(backend, kind, frozen, hard):
    """A frozen weight, mask logits or bias gets no gradient; the others get the reference's."""
    grads = {}
    for name in (backend, "torch"):
        torch.manual_seed(3)
        if kind == "linear":
            layer, x = csext.GatedLinear(23, 9), torch.randn(4, 23)
        else:
            layer, x = csext.GatedConv2d(3, 5, 3, padding=1), torch.randn(2, 3, 6, 6)
        with torch.no_grad():
            layer.mask_logits.copy_(mask_logits_like(layer.weight))
        layer.beta, layer.hard, layer.penalty, layer.backend = 5.0, hard, 0.02, name
        getattr(layer, frozen).requires_grad_(False)
        layer(x).square().sum().backward()  # x needs no gradient either
        grads[name] = (layer.weight.grad, layer.mask_logits.grad, layer.bias.grad)
    for a, b in zip(grads[backend], grads["torch"]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert grads[backend][["weight", "mask_logits", "bias"].index(frozen)] is None

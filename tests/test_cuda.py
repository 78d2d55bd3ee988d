"""The cuda backend (csrc/cuda) against the torch backend by docs/contract.md section 4: float64 gradcheck,
and the error rule in float32, float16 and bfloat16. Every test needs a CUDA device and the
CUDA kernels of csext._C (built by setup.py where CUDA torch is present)."""

import pytest
import torch

import csext
from csext import functional as CF
from csext.backends.common import beta_tensor
from numerics import compare_with_torch_backend, mask_logits_like

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif("cuda" not in csext.backends.available(), reason="the CUDA kernels of csext._C are not built"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CONV_CASES = [  # (x shape, out_channels, kernel, stride, padding, dilation, groups, channels_last)
    ((2, 6, 9, 11), 4, 3, 2, 1, 1, 2, False),
    ((1, 3, 8, 7), 5, (3, 2), 1, 2, 2, 1, False),
    ((3, 16, 10, 10), 16, 3, 1, 1, 1, 16, True),
    ((4, 8, 12, 12), 24, 3, 1, 1, 1, 1, True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("shape", [((97, 431), 13), ((2, 3, 17), 33), ((1, 1), 1)])
def test_linear(dtype, hard, shape):
    x_shape, n = shape
    w = torch.randn(n, x_shape[-1])
    tensors = [("x", torch.randn(x_shape)), ("w", w), ("s", mask_logits_like(w)), ("b", torch.randn(n))]

    def op(x, w, s, b, backend):
        return CF.gated_linear(x, w, s, 3.7, b, hard=hard, penalty=0.01, backend=backend)

    compare_with_torch_backend(op, tensors, dtype, x_shape[:-1] + (n,), backend="cuda", device="cuda")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d(dtype, hard, case):
    x_shape, cout, kernel, stride, padding, dilation, groups, channels_last = case
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    w = torch.randn(cout, x_shape[1] // groups, kh, kw)
    tensors = [("x", torch.randn(x_shape)), ("w", w), ("s", mask_logits_like(w)), ("b", torch.randn(cout))]

    def op(x, w, s, b, backend):
        return CF.gated_conv2d(x, w, s, 1.9, b, stride, padding, dilation, groups, hard=hard, penalty=0.02,
                               backend=backend)

    out_shape = torch.nn.functional.conv2d(torch.empty(x_shape), torch.empty(w.shape), None, stride, padding,
                                           dilation, groups).shape
    compare_with_torch_backend(op, tensors, dtype, out_shape, backend="cuda", device="cuda", channels_last=channels_last)


@pytest.mark.parametrize("hard", [False, True])
def test_gradcheck_float64(hard):
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    s = mask_logits_like(w, dtype=torch.float64).cuda().requires_grad_()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, device="cuda", requires_grad=True)

    def fn(x, w, s):
        return CF.gated_conv2d(x, w, s, 2.5, padding=1, hard=hard, backend="cuda")

    assert torch.autograd.gradcheck(fn, (x, w, s), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("offset", [0, 1, 3])
@pytest.mark.parametrize("numel", [1, 7, 4096 + 5])
def test_unaligned_views_and_tails(offset, numel):
    """Views that start off a 16-byte boundary take the scalar path; lengths not a multiple of
    the vector width leave a tail: every element must be written, forward and backward."""
    w = torch.randn(numel + offset, device="cuda")[offset:]
    s = mask_logits_like(torch.empty(numel + offset)).cuda()[offset:]
    g = torch.randn(numel + offset, device="cuda", dtype=torch.bfloat16)[offset:]
    beta = beta_tensor(3.0)
    out = torch.ops.csext.gate(w, s, beta, False, 0.0, torch.bfloat16)
    torch.testing.assert_close(out, csext.reference.gate(w, s, 3.0, dtype=torch.bfloat16))
    grad_w, grad_s = torch.ops.csext.gate_backward(g, w, s, beta, 0.1)
    m = torch.sigmoid(3.0 * s)
    torch.testing.assert_close(grad_w, g.float() * m, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_s, 3.0 * m * (1 - m) * (g.float() * w + 0.1), rtol=1e-5, atol=1e-6)


def test_opcheck_on_cuda():
    w = torch.randn(13, 21, device="cuda")
    s = mask_logits_like(w).cuda()
    beta = beta_tensor(2.0)
    torch.library.opcheck(torch.ops.csext.gate.default, (w, s, beta, False, 0.01, torch.bfloat16))
    torch.library.opcheck(torch.ops.csext.gate_backward.default, (torch.randn_like(w), w, s, beta, 0.01))


def test_module_autocast_and_compile():
    """GatedConv2d on CUDA under bf16 autocast, eager and torch.compile(fullgraph=True)."""
    layer = csext.GatedConv2d(8, 16, 3, padding=1, device="cuda")
    with torch.no_grad():
        layer.mask_logits.copy_(mask_logits_like(layer.weight).cuda())
    layer.beta, layer.penalty = 3.0, 1e-3
    x = torch.randn(4, 8, 10, 10, device="cuda")
    results = {}
    for name, backend, fn in (("torch", "torch", layer), ("cuda", "cuda", layer),
                              ("compiled", "cuda", torch.compile(layer, fullgraph=True))):
        layer.backend = backend
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fn(x)
        y.float().square().mean().backward()
        results[name] = (y.float(), layer.weight.grad, layer.mask_logits.grad)
    for name in ("cuda", "compiled"):
        for a, b in zip(results[name], results["torch"]):
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)

"""gradcheck in float64 of every backend, for linear and convolutions, soft and hard, penalty > 0."""

import pytest
import torch

import csext
from csext import functional as CF
from numerics import CPU_BACKENDS, mask_logits_like

BACKENDS = CPU_BACKENDS

LINEAR_CASES = [  # (x shape, out_features, bias)
    ((3, 5), 4, True),
    ((2, 3, 7), 2, False),
]
CONV_CASES = [  # (x shape, out_channels, kernel, stride, padding, dilation, groups, bias)
    ((2, 4, 6, 5), 6, 3, 1, 1, 1, 2, True),
    ((1, 3, 7, 6), 2, (2, 3), 2, 0, 1, 1, False),
    ((1, 2, 8, 8), 3, 3, 1, 2, 2, 1, True),
]


def _central_differences(scalar, inputs, eps=1e-6):
    grads = []
    for t in inputs:
        g = torch.zeros_like(t)
        flat = t.detach().view(-1)
        for i in range(flat.numel()):
            saved = flat[i].item()
            flat[i] = saved + eps
            up = scalar(*inputs).item()
            flat[i] = saved - eps
            down = scalar(*inputs).item()
            flat[i] = saved
            g.view(-1)[i] = (up - down) / (2 * eps)
        grads.append(g)
    return grads


def _check(fn, inputs, beta, penalty, mask_logits):
    """gradcheck proper for penalty 0, forward mode and vmap's batched gradients included, and
    gradgradcheck: the second derivatives (create_graph=True; forward over reverse, as
    torch.func.hessian takes them). With penalty > 0 the backward adds lam * dP/ds whatever
    grad_output is (gradcheck rejects that by design), so the check is the gradient of the
    scalar sum(v * y) + lam * P against central differences, P's value entering without a
    gradient of its own."""
    if penalty == 0.0:
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, check_forward_ad=True,
                                        check_batched_grad=True, check_batched_forward_grad=True)
        assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, check_fwd_over_rev=True,
                                            check_batched_grad=True)
        return
    v = torch.randn_like(fn(*inputs))

    def scalar(*args):
        value = csext.reference.penalty_term(args[mask_logits], beta).detach()
        return (fn(*args) * v).sum() + penalty * value

    analytic = torch.autograd.grad(scalar(*inputs), inputs, allow_unused=True)
    with torch.no_grad():
        numeric = _central_differences(scalar, inputs)
    for i, (a, n) in enumerate(zip(analytic, numeric)):
        a = torch.zeros_like(n) if a is None else a
        if not torch.allclose(a, n, atol=1e-7, rtol=1e-5):
            raise AssertionError(f"input {i}: analytic and numerical gradients differ by {(a - n).abs().max():.3g}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("penalty", [0.0, 0.3])
@pytest.mark.parametrize("case", LINEAR_CASES)
def test_gradcheck_linear(backend, hard, penalty, case):
    x_shape, out_features, has_bias = case
    beta = 2.5
    x = torch.randn(x_shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(out_features, x_shape[-1], dtype=torch.float64, requires_grad=True)
    s = mask_logits_like(w, torch.float64).requires_grad_()
    b = torch.randn(out_features, dtype=torch.float64, requires_grad=True) if has_bias else None

    def fn(x, w, s, b=None):
        return CF.gated_linear(x, w, s, beta, b, hard=hard, penalty=penalty, backend=backend)

    # Hard mode sends no gradient to s, the penalty's included: the plain gradcheck applies.
    _check(fn, (x, w, s) + ((b,) if has_bias else ()), beta, 0.0 if hard else penalty, mask_logits=2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("penalty", [0.0, 0.3])
@pytest.mark.parametrize("case", CONV_CASES)
def test_gradcheck_conv2d(backend, hard, penalty, case):
    x_shape, out_channels, kernel, stride, padding, dilation, groups, has_bias = case
    beta = 1.5
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    x = torch.randn(x_shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(out_channels, x_shape[1] // groups, kh, kw, dtype=torch.float64, requires_grad=True)
    s = mask_logits_like(w, torch.float64).requires_grad_()
    b = torch.randn(out_channels, dtype=torch.float64, requires_grad=True) if has_bias else None

    def fn(x, w, s, b=None):
        return CF.gated_conv2d(
            x, w, s, beta, b, stride, padding, dilation, groups, hard=hard, penalty=penalty, backend=backend
        )

    # Hard mode sends no gradient to s, the penalty's included: the plain gradcheck applies.
    _check(fn, (x, w, s) + ((b,) if has_bias else ()), beta, 0.0 if hard else penalty, mask_logits=2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("penalty", [0.0, 0.3])
def test_gradcheck_conv1d_and_hf_conv1d(backend, hard, penalty):
    """functional.gated_conv1d (nn.Conv1d's, strided, grouped) and gated_hf_conv1d (transformers'
    Conv1D: weight (in, out), batched input)."""
    beta = 2.0
    x = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True)
    s = mask_logits_like(w, torch.float64).requires_grad_()
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)

    def conv1d(x, w, s, b):
        return CF.gated_conv1d(x, w, s, beta, b, 2, 1, 1, 2, hard=hard, penalty=penalty, backend=backend)

    _check(conv1d, (x, w, s, b), beta, 0.0 if hard else penalty, mask_logits=2)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    s = mask_logits_like(w, torch.float64).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def hf_conv1d(x, w, s, b):
        return CF.gated_hf_conv1d(x, w, s, beta, b, hard=hard, penalty=penalty, backend=backend)

    _check(hf_conv1d, (x, w, s, b), beta, 0.0 if hard else penalty, mask_logits=2)


def test_penalty_check_would_fail_without_penalty_gradient():
    """The penalty variant of the check is strict: dropping lam from the backward fails it."""
    beta, penalty = 2.0, 0.3
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    s = mask_logits_like(w, torch.float64).requires_grad_()

    def without_penalty(x, w, s):
        return CF.gated_linear(x, w, s, beta, penalty=0.0, backend="torch")

    with pytest.raises(AssertionError, match="input 2"):
        _check(without_penalty, (x, w, s), beta, penalty, mask_logits=2)

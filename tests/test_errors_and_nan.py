"""Bad input gets a clear error naming the argument; NaN in mask logits propagates."""

import pytest
import torch

import csext
from csext import functional as CF

# CPU_BACKENDS and, in its CPU interpreter, triton (its linear layer has its own checked path)
BACKENDS = [b for b in csext.backends.available() if csext.backends.runs_on(b, "cpu")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_arguments_are_named(backend):
    w, s, x = torch.randn(4, 6), torch.randn(4, 6), torch.randn(3, 6)
    cases = [
        (lambda: CF.gated_linear(x, w, torch.randn(4, 5), 1.0, backend=backend), ValueError, "mask_logits must have the shape of weight"),
        (lambda: CF.gated_linear(x, w, s.double(), 1.0, backend=backend), TypeError, "mask_logits must be torch.float32"),
        (lambda: CF.gated_linear(x, w, s.bfloat16(), 1.0, backend=backend), TypeError, "mask_logits must be"),
        (lambda: CF.gated_linear(x, w, s, float("nan"), backend=backend), ValueError, "beta must be a finite number >= 1"),
        (lambda: CF.gated_linear(x, w, s, float("inf"), backend=backend), ValueError, "beta must be"),
        (lambda: CF.gated_linear(x, w, s, 0.5, backend=backend), ValueError, "beta must be"),
        (lambda: CF.gated_linear(x, w, s, 1.0, penalty=-1.0, backend=backend), ValueError, "penalty must be"),
        (lambda: CF.gated_linear(torch.randn(3, 5), w, s, 1.0, backend=backend), ValueError, r"x must have shape \(\.\.\., 6\)"),
        (lambda: CF.gated_linear(torch.randn(()), w, s, 1.0, backend=backend), ValueError, "x must have shape"),
        (lambda: CF.gated_linear(x, w, s, 1.0, torch.randn(4, device="meta"), backend=backend), ValueError, "bias must be on the device"),
        (lambda: CF.gated_linear(x.to("meta"), w, s, 1.0, backend=backend), ValueError, "x must be on the device"),
        (lambda: CF.gated_linear(x, w, s.to("meta"), 1.0, backend=backend), ValueError, "same device"),
        (lambda: CF.gated_linear(x, w.int(), s, 1.0, backend=backend), TypeError, "weight must be float32"),
        (lambda: CF.gated_linear(x, w.view(2, 2, 6), s.view(2, 2, 6), 1.0, backend=backend), ValueError, "weight must be 2-D"),
        (lambda: CF.gated_linear(x.double(), w, s, 1.0, backend=backend), TypeError, r"x must have the dtype of weight \(torch.float32\)"),
        (lambda: CF.gated_linear(x, w, s, 1.0, torch.randn(4).half(), backend=backend), TypeError, "bias must have the dtype of weight"),
    ]
    cw, cs = torch.randn(5, 3, 3, 3), torch.randn(5, 3, 3, 3)
    cases += [
        (lambda: CF.gated_conv2d(torch.randn(2, 4, 8, 8), cw, cs, 1.0, backend=backend), ValueError, r"x must have shape \(N, 3, H, W\)"),
        (lambda: CF.gated_conv2d(torch.randn(2, 2, 3, 8, 8), cw, cs, 1.0, backend=backend), ValueError, "x must have shape"),
        (lambda: CF.gated_conv2d(torch.randn(2, 3, 8, 8), cw, cs[:4], 1.0, backend=backend), ValueError, "mask_logits must have the shape of weight"),
        (lambda: CF.gated_conv2d(torch.randn(2, 3, 8, 8).bfloat16(), cw, cs, 1.0, backend=backend), TypeError, "x must have the dtype"),
        (lambda: CF.gated_conv2d(torch.randn(2, 3, 8, 8), cw, cs, 1.0, stride=(1, 1, 1), backend=backend), ValueError,
         r"stride must be an int or a pair of ints, got \(1, 1, 1\)"),
        (lambda: CF.gated_conv2d(torch.randn(2, 3, 8, 8), cw, cs, 1.0, dilation=1.5, backend=backend), ValueError,
         "dilation must be an int or a pair of ints"),
        (lambda: CF.gated_linear(x, w, s, 1.0, mask_scale=True, backend=backend), ValueError, "mask_scale must be"),
        (lambda: CF.gate(w, s, 1.0, dtype=torch.int32, backend=backend), TypeError, "dtype must be float32"),
        (lambda: CF.gate(w, s, 1.0, dtype=torch.float64, backend=backend), TypeError, "float64 only for a float64"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


def test_cpp_op_checks_its_own_arguments():
    if "cpp" not in BACKENDS:
        pytest.skip("the C++ extension is not built")
    w, s = torch.randn(4, 6), torch.randn(4, 6)
    B = csext.backends.common.beta_tensor
    with pytest.raises(ValueError, match="mask_logits must have the shape of weight"):
        torch.ops.csext.gate(w, s[:3], B(1.0))
    with pytest.raises(TypeError, match="mask_logits must be float32"):
        torch.ops.csext.gate(w, s.half(), B(1.0))
    with pytest.raises(ValueError, match="beta must be a finite number >= 1"):
        torch.ops.csext.gate(w, s, B(0.0))
    with pytest.raises(ValueError, match="penalty must be"):
        torch.ops.csext.gate_backward(w, w, s, B(1.0), float("nan"))
    with pytest.raises(ValueError, match="grad must have the shape"):
        torch.ops.csext.gate_backward(w[:2], w, s, B(1.0), 0.0)
    with pytest.raises(TypeError, match="dtype must be"):
        torch.ops.csext.gate(w, s, B(1.0), dtype=torch.int32)
    with pytest.raises(ValueError, match="beta must be a 0-dim floating-point tensor on the CPU"):
        torch.ops.csext.gate(w, s, torch.ones(1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hard", [False, True])
def test_nan_mask_logits_propagate(backend, hard):
    w = torch.randn(3, 5, requires_grad=True)
    s = torch.randn(3, 5)
    s[1, 2] = float("nan")
    s.requires_grad_()
    x = torch.randn(4, 5)
    y = CF.gated_linear(x, w, s, 7.0, penalty=0.1, hard=hard, backend=backend)
    assert torch.isnan(y[:, 1]).all(), "the output row reading the NaN logit must be NaN"
    assert not torch.isnan(y[:, [0, 2]]).any()
    y.sum().backward()
    assert torch.isnan(w.grad[1, 2]) and torch.isfinite(w.grad[0]).all()
    if not hard:
        assert torch.isnan(s.grad[1, 2]) and torch.isfinite(s.grad[0]).all()
    w_eff = CF.gate(w, s, 7.0, hard=hard, backend=backend)
    assert torch.isnan(w_eff[1, 2]) and torch.isnan(w_eff).sum() == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_stay_finite(backend):
    w = torch.randn(6)
    s = torch.tensor([-1e30, -500.0, -0.5, 0.5, 500.0, 1e30])
    s.requires_grad_()
    out = CF.gate(w, s, 200.0, penalty=0.1, backend=backend)
    torch.testing.assert_close(out, w * torch.sigmoid(200.0 * s.detach()))
    out.sum().backward()
    assert torch.isfinite(s.grad).all()

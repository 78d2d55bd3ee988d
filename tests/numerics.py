"""Shared helpers of the tests: random inputs and the comparison rule of SPEC section 4."""

import torch

import csext

# The backends that run natively on CPU tensors, which these tests use. Triton's interpreter
# (tests/test_triton.py) and the CUDA kernels (tests/test_cuda.py) have tests of their own.
CPU_BACKENDS = [b for b in csext.backends.available() if b in ("torch", "cpp")]
FUSED_BACKENDS = [b for b in CPU_BACKENDS if b != "torch"]


def mask_logits_like(weight: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Fresh logits, never zero and away from the hard threshold (|s| >= 0.05)."""
    s = torch.randn(weight.shape, dtype=dtype)
    return s + 0.05 * torch.sign(s)


def poison_allocator(*like: torch.Tensor) -> None:
    """Leave NaN-filled freed blocks of the sizes the next outputs will take, so that an element a
    kernel fails to write shows as NaN (glibc hands freed blocks back for same-size requests)."""
    for t in like:
        torch.full_like(t, float("nan"))


def assert_close_rule(fused: torch.Tensor, plain: torch.Tensor, exact: torch.Tensor, name: str, floor: float = 1e-5):
    """SPEC section 4: the fused error against the fp64 reference is at most twice the error of
    the torch backend in the same dtype, plus a small absolute floor."""
    assert fused.shape == exact.shape, f"{name}: shape {tuple(fused.shape)} != {tuple(exact.shape)}"
    assert fused.dtype == plain.dtype, f"{name}: dtype {fused.dtype} != torch backend's {plain.dtype}"
    fused_err = (fused.double() - exact).abs().max().item()
    plain_err = (plain.double() - exact).abs().max().item()
    scale = exact.abs().max().item()
    assert fused_err <= 2 * plain_err + floor * max(scale, 1.0), (
        f"{name}: fused error {fused_err:.3g} > 2 x torch-backend error {plain_err:.3g} + floor"
    )

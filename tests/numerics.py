"""Shared helpers of the tests: random inputs and the comparison rule of docs/contract.md section 4."""

import copy

import pytest
import torch

import csext

# The backends that run natively on CPU tensors, which these tests use. Triton's interpreter
# (tests/test_triton.py) and the CUDA kernels (tests/test_cuda.py) have tests of their own.
CPU_BACKENDS = [b for b in csext.backends.available() if b in ("torch", "cpp")]
FUSED_BACKENDS = [b for b in CPU_BACKENDS if b != "torch"]


def _fused_cases():
    """(backend, device, dtype) of every fused path, for compare_with_torch_backend: cpp on the
    CPU, triton on CUDA or in its CPU interpreter (which has no bfloat16), cuda (gpu marker)."""
    available = csext.backends.available()
    triton_device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    cuda_marks = [pytest.mark.gpu, pytest.mark.skipif("cuda" not in available,
                                                      reason="the CUDA kernels of csext._C are not built")]
    return ([("cpp", "cpu", d) for d in dtypes if "cpp" in available]
            + [("triton", triton_device, d) for d in dtypes
               if "triton" in available and (d != torch.bfloat16 or triton_device == "cuda")]
            + [pytest.param("cuda", "cuda", d, marks=cuda_marks) for d in dtypes])


FUSED_CASES = _fused_cases()


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
    """docs/contract.md section 4: the fused error against the fp64 reference is at most twice the error of
    the torch backend in the same dtype, plus a small absolute floor."""
    assert fused.shape == exact.shape, f"{name}: shape {tuple(fused.shape)} != {tuple(exact.shape)}"
    assert fused.dtype == plain.dtype, f"{name}: dtype {fused.dtype} != torch backend's {plain.dtype}"
    fused_err = (fused.double() - exact).abs().max().item()
    plain_err = (plain.double() - exact).abs().max().item()
    scale = exact.abs().max().item()
    assert fused_err <= 2 * plain_err + floor * max(scale, 1.0), (
        f"{name}: fused error {fused_err:.3g} > 2 x torch-backend error {plain_err:.3g} + floor"
    )


def _run(op, tensors, dtype, device, backend, grad_out, channels_last):
    """op on fresh leaf copies of `tensors` (name, tensor) in `dtype` on `device`; mask logits
    ("s", "s_...") stay float32 except in the float64 reference. Returns the output and every gradient,
    on the CPU, with outputs poisoned beforehand."""
    leaves = []
    for name, t in tensors:
        if t is None:
            leaves.append(None)
            continue
        wanted = t.dtype if (name == "s" or name.startswith("s_")) and dtype != torch.float64 else dtype
        t = t.detach().to(device=device, dtype=wanted)
        if channels_last and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        leaves.append(t.requires_grad_())
    poison_allocator(*[t for t in leaves if t is not None])
    y = op(*leaves, backend=backend)
    poison_allocator(*[t for t in leaves if t is not None])
    y.backward(grad_out.to(device=device, dtype=y.dtype))
    return [y.detach().cpu()] + [None if t is None or t.grad is None else t.grad.cpu() for t in leaves]


def compare_with_torch_backend(op, tensors, dtype, out_shape, backend, device="cpu", channels_last=False):
    """docs/contract.md section 4 for `op(*leaves, backend=...)`: `backend` in `dtype` on `device` against
    the torch backend there, both against the torch backend in float64 on the CPU; output and
    every gradient, none missing, none NaN."""
    grad_out = torch.randn(out_shape)
    exact = _run(op, tensors, torch.float64, "cpu", "torch", grad_out, False)
    plain = _run(op, tensors, dtype, device, "torch", grad_out, channels_last)
    fused = _run(op, tensors, dtype, device, backend, grad_out, channels_last)
    names = ["output"] + [f"grad of {name}" for name, _ in tensors]
    for name, f, p, e in zip(names, fused, plain, exact):
        assert (f is None) == (p is None) == (e is None), f"{name}: present in one run only"
        if f is not None:
            assert not torch.isnan(f).any(), f"{name}: NaN (an element left unwritten?)"
            assert_close_rule(f, p, e, name)


def forward_over_reverse(kind: str, backend: str, inputs: dict, tangents: dict, penalty: float = 0.1) -> list:
    """The gradients of square(layer).sum() in the inputs that require grad, taken by a backward
    without create_graph inside a forward-mode dual level, and their tangents (forward over
    reverse). `kind` is "gate", "linear" or "conv2d" (stride 1, padding 1, groups 2); `inputs`
    and `tangents` map x, w, s (and b) to tensors."""
    from torch.autograd import forward_ad

    with forward_ad.dual_level():
        duals = {name: forward_ad.make_dual(t, tangents[name]) if name in tangents else t for name, t in inputs.items()}
        F = csext.functional
        if kind == "gate":
            y = F.gate(duals["w"], duals["s"], 2.0, penalty=penalty, backend=backend)
        elif kind == "linear":
            y = F.gated_linear(duals["x"], duals["w"], duals["s"], 2.0, duals.get("b"), penalty=penalty,
                               backend=backend)
        else:
            y = F.gated_conv2d(duals["x"], duals["w"], duals["s"], 2.0, duals.get("b"), 1, 1, 1, 2, penalty=penalty,
                               backend=backend)
        leaves = [duals[name] for name, t in inputs.items() if t.requires_grad]
        grads = torch.autograd.grad(y.square().sum(), leaves)
        return [part for g in grads for part in (forward_ad.unpack_dual(g).primal.clone(),
                                                 forward_ad.unpack_dual(g).tangent)]


def assert_history_close(got: list[dict], expected: list[dict], rtol: float = 1e-3, atol: float = 1e-3) -> None:
    """Two runs' history.csv rows (csext.experiments.search.read_history) agree: the same rows, numbers
    within float tolerance (an eager and a compiled run round differently), seconds aside."""
    assert len(got) == len(expected), f"{len(got)} rows against {len(expected)}"
    for i, (row, want) in enumerate(zip(got, expected)):
        for key, value in want.items():
            if key == "seconds":
                continue
            if isinstance(value, float):
                assert row[key] == pytest.approx(value, rel=rtol, abs=atol), f"row {i}, {key}: {row[key]} != {value}"
            else:
                assert row[key] == value, f"row {i}, {key}: {row[key]!r} != {value!r}"


def assert_compiles_as_eager(module: torch.nn.Module, *inputs: torch.Tensor, output=lambda out: out) -> None:
    """module under torch.compile(fullgraph=True) (any graph break fails) gives the gradients of a
    copy of it run eagerly, for loss = output(module(*inputs)).square().sum()."""
    eager = copy.deepcopy(module)
    torch._dynamo.reset()
    try:
        output(torch.compile(module, fullgraph=True)(*inputs)).square().sum().backward()
    finally:
        torch._dynamo.reset()
    output(eager(*inputs)).square().sum().backward()
    for (name, a), b in zip(module.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")

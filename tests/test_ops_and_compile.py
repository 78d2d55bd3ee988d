"""The registered ops pass torch.library.opcheck; torch.compile(fullgraph=True) equals eager."""

import copy

import pytest
import torch
from torch import nn

import csext
from numerics import CPU_BACKENDS, mask_logits_like

needs_cpp = pytest.mark.skipif("cpp" not in csext.backends.available(), reason="the C++ extension is not built")


def _gate_samples():
    w = torch.randn(7, 5, requires_grad=True)
    s = mask_logits_like(w).requires_grad_()
    wb = torch.randn(3, 4, 3, 3, dtype=torch.bfloat16, requires_grad=True)
    sb = mask_logits_like(wb).to(memory_format=torch.channels_last).requires_grad_()
    wd = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    sd = mask_logits_like(wd, torch.float64).requires_grad_()
    B = csext._ops.beta_tensor
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
    torch.library.opcheck(torch.ops.csext.gate_backward.default, (g, w, s, csext._ops.beta_tensor(2.0), 0.1))


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


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_does_not_recompile_for_each_beta(backend):
    """The beta schedule changes beta every epoch (or step): that must not recompile each time."""
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    for m in csext.sparsify(model):
        m.backend = backend
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(5, 6)
    torch._dynamo.utils.counters.clear()
    betas = [1.0, 1.5, 2.25, 4.0, 9.5, 20.0, 47.0, 99.0, 150.0, 200.0]
    for beta in betas:
        csext.set_beta(model, beta)
        compiled(x).sum().backward()
    # dynamo compiles once for the first value, then once more with beta dynamic
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2

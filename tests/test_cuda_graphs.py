"""CUDA graphs: a gated layer's forward+backward, captured once with torch.cuda.graph and
replayed on fresh inputs, gives what eager calls give, on the fused CUDA backends (the kernels
launch on the capturing stream, allocate from the graph's pool and never synchronise); and
torch.compile(mode="reduce-overhead"), which captures CUDA graphs itself, trains the layers as
eager mode does. Also bench/run.py's `graph` mode, which times such replays."""

import csv
import functools
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import csext
from csext import functional as CF
from numerics import mask_logits_like

BACKENDS = [b for b in ("cuda", "triton") if b in csext.backends.available()]
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not BACKENDS, reason="no fused CUDA backend is built")]

# (layer, input shape); the triton backend's linear layer takes its fused GEMMs up to
# FUSED_MAX_ROWS rows of x and the elementwise gate above: both are captured.
CASES = [
    ("linear", (37, 45), 0),
    ("linear", (37, 45), 1 << 20),
    ("linear, split-K", (37, 200), 1 << 20),  # the triton GEMMs, 3 programs a tile (kernels/gated_matmul.py)
    ("conv", (4, 6, 9, 11), 0),
    ("conv-channels-last", (4, 8, 10, 10), 0),
]


def _layer(kind: str, in_features: int, backend: str) -> torch.nn.Module:
    if kind.startswith("linear"):
        layer = csext.GatedLinear(in_features, 29, device="cuda")
    else:
        layer = csext.GatedConv2d(in_features, 12, 3, padding=1, device="cuda")
        if kind == "conv-channels-last":
            layer = layer.to(memory_format=torch.channels_last)
    with torch.no_grad():
        layer.mask_logits.copy_(mask_logits_like(layer.mask_logits).cuda())
    layer.beta, layer.penalty, layer.backend = 3.0, 1e-3, backend
    return layer


def _input(kind: str, shape) -> torch.Tensor:
    x = torch.randn(shape, device="cuda")
    return x.to(memory_format=torch.channels_last) if kind == "conv-channels-last" else x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,shape,fused_max_rows", CASES)
def test_replayed_graph_matches_eager_calls(monkeypatch, backend, kind, shape, fused_max_rows):
    if backend == "triton":
        monkeypatch.setattr(csext.backends.triton, "FUSED_MAX_ROWS", fused_max_rows)
    if kind == "linear, split-K":
        if backend != "triton":
            pytest.skip("split-K is the triton backend's")
        from csext.kernels import gated_matmul as mm

        split_k = {**mm.FIXED_GATED_CONFIG, "SPLIT": 3}
        monkeypatch.setattr(mm, "gated_matmul", functools.partial(mm.gated_matmul, config=split_k))
    layer = _layer(kind, shape[-1 if kind.startswith("linear") else 1], backend)
    params = list(layer.parameters())
    static_x = _input(kind, shape).requires_grad_()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        static_grad = torch.randn_like(layer(static_x))

    def step():
        static_x.grad = None
        for p in params:
            p.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            y = layer(static_x)
        y.backward(static_grad)
        return y

    side = torch.cuda.Stream()  # warm-up (and any autotuning) on a side stream, before capture
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = step()
    captured = (static_y, static_x.grad, layer.weight.grad, layer.mask_logits.grad, layer.bias.grad)
    # The graph must not read csext's cached beta tensors: they may be evicted, and their memory
    # reused (here by NaN-filled ones of the same size, on both streams), while the graph lives.
    csext.backends.common._beta_tensors.clear()
    if "triton" in csext.backends.available():  # nor split-K's cached tile counters (kept zeroed)
        from csext.kernels import gated_matmul as mm

        mm._tile_counters.clear()
    poison = [torch.full((), float("nan"), device="cuda") for _ in range(256)]
    with torch.cuda.stream(side):
        poison += [torch.full((), float("nan"), device="cuda") for _ in range(256)]
    torch.cuda.current_stream().wait_stream(side)

    for _ in range(2):  # fresh data each replay, compared with an eager call on the same data
        x, grad = _input(kind, shape), torch.randn_like(static_grad)
        with torch.no_grad():
            static_x.copy_(x)
            static_grad.copy_(grad)
        graph.replay()
        replayed = [t.clone() for t in captured]
        x.requires_grad_()
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        y.backward(grad)
        eager = (y, x.grad, layer.weight.grad, layer.mask_logits.grad, layer.bias.grad)
        for name, got, want in zip(("y", "dx", "dw", "ds", "db"), replayed, eager):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3, msg=lambda m, n=name: f"{n}: {m}")
    assert all(p.isnan() for p in poison)  # nor writes to memory it does not own


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_compile_reduce_overhead_trains_as_eager(backend, kind):
    """Three SGD steps at three betas and lams (the schedules move them), compiled with CUDA graphs and
    eager, from the same start: the same losses and weights. The cuda backend's ops read beta on
    the host and run between the graphs (tagged cudagraph_unsafe); the triton ones read it from
    device memory, inside them."""
    shape = (16, 40) if kind == "linear" else (4, 6, 9, 9)
    eager_layer = _layer(kind, shape[-1] if kind == "linear" else shape[1], backend)
    graphed_layer = _layer(kind, shape[-1] if kind == "linear" else shape[1], backend)
    graphed_layer.load_state_dict(eager_layer.state_dict())
    compiled = torch.compile(graphed_layer, mode="reduce-overhead", fullgraph=True)
    torch._dynamo.utils.counters.clear()
    inputs = [_input(kind, shape) for _ in range(3)]
    losses = {}
    for name, layer, fn in (("eager", eager_layer, eager_layer), ("graphed", graphed_layer, compiled)):
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
        losses[name] = []
        for beta, penalty, x in zip((1.0, 4.0, 16.0), (1e-3, 2e-3, 5e-4), inputs):
            layer.beta, layer.penalty = beta, penalty  # lam steered too (a graph input under compile)
            torch.compiler.cudagraph_mark_step_begin()
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = fn(x).float().square().mean()
            loss.backward()
            optimizer.step()
            losses[name].append(loss.item())
    skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    assert skips == 0, f"inductor ran {skips} graph(s) without CUDA graphs (TORCH_LOGS=perf_hints says why)"
    assert losses["graphed"] == pytest.approx(losses["eager"], rel=1e-2)
    for a, b in zip(graphed_layer.parameters(), eager_layer.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_bench_graph_mode_times_every_provider(tmp_path):
    path = Path(__file__).resolve().parents[1] / "bench" / "run.py"
    spec = importlib.util.spec_from_file_location("_csext_bench_run", path)
    bench = sys.modules["_csext_bench_run"] = importlib.util.module_from_spec(spec)  # for its dataclass
    spec.loader.exec_module(bench)
    results = tmp_path / "gpu.csv"
    providers = ",".join(["dense", "torch"] + BACKENDS)
    assert bench.main(["--device", "cuda", "--quick", "--autocast", "bf16", "--modes", "graph", "--repeats", "2",
                       "--warmup", "1", "--providers", providers, "--csv", str(results), "--plot",
                       str(tmp_path / "graph.png")]) == 0
    with open(results, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["op"], r["provider"]) for r in rows} == {(op, p) for op in ("linear", "conv") for p in providers.split(",")}
    assert all(r["mode"] == "graph" and float(r["median_ms"]) > 0 for r in rows)

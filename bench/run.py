"""Time csext's gated layers against plain nn.Linear / nn.Conv2d, within one process.

    python bench/run.py --device cpu --ops linear,conv --modes fwd,bwd,full
    python bench/run.py --device cuda --autocast bf16 --shapes gpu [--channels-last]

Providers: `dense` (the plain layer), `torch` (the reference backend, eager), `torch-compile`
(torch.compile of the reference backend) and every fused backend available on the device
(csext.backends.available()); on CUDA also `triton-fused` and `triton-gate`, the triton
backend's two linear paths forced (fused GEMMs; elementwise gate + cuBLAS). Each case runs all providers in turn, `--repeats` times, in a
rotating order so that drift on a noisy machine hits them alike; a provider's time is the
median of its samples and its ratio is that median over dense's median from the same run.

Modes: `fwd`, `bwd` and `full` (forward+backward) time eager calls, host included. `graph`
(CUDA only) replays a CUDA graph of one forward+backward: the GPU's time for the same work,
without the host's, which is what separates a slow kernel from a slow launch where the eager
times are host-bound.

Rows are appended (atomically, after each case) to a CSV under bench/results/, with the
machine, versions and commit; a PNG of ratio-to-dense is drawn from that CSV's latest run; the
table is printed.
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import io
import itertools
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import csext
from csext.experiments.files import write_atomic

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# (M, K, N): batch rows, in_features, out_features (the foundation issue's shapes)
LINEAR_SHAPES = [(32, 4096, 4096), (64, 1024, 1024), (256, 1024, 1024), (128, 784, 300)]
# (N, C, H): ResNet-20's 3x3 convolutions, C -> C channels at H x H pixels, batch 128
CONV_SHAPES = [(128, 16, 32), (128, 32, 16), (128, 64, 8)]
# The GPU issues' shapes: K = N = 4096 at three batch sizes, and LeNet-300's first layer;
# ResNet-20's and VGG-16's 3x3 convolutions (CIFAR-10, batch 128).
GPU_LINEAR_SHAPES = [(256, 4096, 4096), (2048, 4096, 4096), (8192, 4096, 4096), (128, 784, 300)]
GPU_CONV_SHAPES = CONV_SHAPES + [(128, 64, 32), (128, 128, 16), (128, 256, 8), (128, 512, 4), (128, 512, 2)]
QUICK_LINEAR_SHAPES = [(8, 97, 43)]
QUICK_CONV_SHAPES = [(4, 8, 8)]

OPS = ("linear", "conv")
MODES = ("fwd", "bwd", "full", "graph")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

FIELDS = [
    "run", "commit", "device", "machine", "torch", "triton", "threads", "dtype", "layout",
    "op", "shape", "mode", "provider", "median_ms", "q1_ms", "q3_ms", "ratio_to_dense", "repeats",
]


@dataclass
class Case:
    op: str
    shape: tuple
    channels_last: bool = False

    @property
    def label(self) -> str:
        if self.op == "linear":
            return "M={} K={} N={}".format(*self.shape)
        n, c, h = self.shape
        return f"N={n} C={c} {h}x{h}" + (" NHWC" if self.channels_last else "")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--ops", default="linear,conv", help=f"comma-separated, from {OPS}")
    parser.add_argument("--modes", default="fwd,bwd,full",
                        help=f"comma-separated, from {MODES}; graph: forward+backward replayed from a CUDA graph")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--autocast", choices=["bf16", "fp16"], default=None,
                        help="float32 layers and inputs run under torch.autocast in this dtype (rows say autocast-bf16)")
    parser.add_argument("--shapes", choices=["default", "gpu"], default="default",
                        help="default: the CPU shapes; gpu: the GPU issues' larger linear shapes and VGG-16's convolutions")
    parser.add_argument("--inner", type=int, default=None,
                        help="calls per timed sample, its time divided by them (default: 1 on CPU, 10 on CUDA)")
    parser.add_argument("--compile-ops", default="linear,conv",
                        help="ops whose torch-compile provider runs (compiling takes long); default both")
    parser.add_argument("--providers", default="all",
                        help="comma-separated, from dense, torch, torch-compile and the fused backends; default all")
    parser.add_argument("--repeats", type=int, default=25, help="timed samples per provider and case")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per provider before timing")
    parser.add_argument("--channels-last", action="store_true",
                        help="convolutions on channels_last inputs and weights (marked NHWC), for every provider")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: checks the harness, not the kernels")
    parser.add_argument("--csv", type=Path, default=RESULTS / "results.csv", help="CSV the rows are appended to")
    parser.add_argument("--plot", type=Path, default=None,
                        help="PNG to draw (default: <device>-<dtype>[-channels-last].png next to the CSV)")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from the CSV's latest run; time nothing")
    parser.add_argument("--no-save", action="store_true", help="print the table only; write no CSV or PNG")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="also profile a few forward+backward calls per case and provider; tables go to DIR")
    args = parser.parse_args(argv)

    args.ops = _split(args.ops, OPS, "--ops")
    args.modes = _split(args.modes, MODES, "--modes")
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    args.compile_ops = _split(args.compile_ops, OPS, "--compile-ops") if args.compile_ops else []
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    if "graph" in args.modes and device.type != "cuda":
        parser.error(f"--modes graph: CUDA graphs need --device cuda, got --device {args.device}")
    args.device = device
    # Triton on the CPU is its interpreter (TRITON_INTERPRET=1): nothing worth timing
    fused = [b for b in csext.backends.available()
             if b != "torch" and csext.backends.runs_on(b, device.type) and (b, device.type) != ("triton", "cpu")]
    if device.type == "cuda" and "triton" in fused:
        fused += ["triton-fused", "triton-gate"]
    known = ["dense", "torch", "torch-compile"] + fused
    args.providers = known if args.providers == "all" else _split(args.providers, known, "--providers")
    if "dense" not in args.providers:
        args.providers = ["dense"] + args.providers  # every ratio is against dense
    if args.inner is None:
        args.inner = 10 if device.type == "cuda" else 1
    if args.autocast:
        args.dtype = "float32"
    args.label = f"autocast-{args.autocast}" if args.autocast else args.dtype  # the CSV's dtype column
    if args.plot is None:
        suffix = "-channels-last" if args.channels_last else ""
        args.plot = args.csv.parent / f"{device.type}-{args.label}{suffix}.png"
    return args


def _split(text: str, allowed, option: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in items if t not in allowed]
    if unknown or not items:
        raise SystemExit(f"{option}: expected a comma-separated list from {list(allowed)}, got {text!r}")
    return items


# --- what is timed ---------------------------------------------------------------------------


class ForcedTritonPath(nn.Module):
    """A gated linear layer on the triton backend with one of its two paths forced."""

    def __init__(self, layer: nn.Module, fused: bool):
        super().__init__()
        self.layer, self.max_rows = layer, (1 << 62) if fused else -1

    def forward(self, x):
        triton = csext.backends.triton
        saved, triton.FUSED_MAX_ROWS = triton.FUSED_MAX_ROWS, self.max_rows
        try:
            return self.layer(x)
        finally:
            triton.FUSED_MAX_ROWS = saved


def make_layers(case: Case, providers: list[str], device: torch.device, dtype: torch.dtype,
                compile_ops=OPS) -> dict:
    """One module per provider, all with the same weights; gated ones with random mask logits."""
    torch.manual_seed(0)
    if case.op == "linear":
        _, k, n = case.shape
        dense = nn.Linear(k, n)
    else:
        _, c, _ = case.shape
        dense = nn.Conv2d(c, c, 3, padding=1, bias=False)  # ResNet convolutions have no bias
    dense = dense.to(device=device, dtype=dtype)
    if case.channels_last:
        dense = dense.to(memory_format=torch.channels_last)
    layers = {"dense": dense}
    for provider in providers:
        if provider == "dense" or (provider == "torch-compile" and case.op not in compile_ops):
            continue
        if provider.startswith("triton-") and case.op != "linear":
            continue
        gated_type = csext.GatedLinear if case.op == "linear" else csext.GatedConv2d
        gated = gated_type.from_dense(copy.deepcopy(dense))
        with torch.no_grad():
            gated.mask_logits.normal_()
        gated.beta, gated.penalty = 4.0, 1e-4
        gated.backend = {"torch-compile": "torch", "triton-fused": "triton", "triton-gate": "triton"}.get(provider, provider)
        if provider == "torch-compile":
            gated = torch.compile(gated)
        elif provider.startswith("triton-"):
            gated = ForcedTritonPath(gated, fused=provider == "triton-fused")
        layers[provider] = gated
    return layers


def make_input(case: Case, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if case.op == "linear":
        m, k, _ = case.shape
        shape = (m, k)
    else:
        n, c, h = case.shape
        shape = (n, c, h, h)
    x = torch.randn(shape, device=device, dtype=dtype)
    if case.channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x.requires_grad_()  # a mid-network input: its gradient is computed too


class Clock:
    """Wall time on the CPU; CUDA events (after a synchronize) on a GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def time(self, fn) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3


def sample(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, mode: str, clock: Clock,
           inner: int = 1, autocast=None) -> float:
    """One timed sample: the mean of `inner` calls, in ms. Gradients start empty each call, as
    after zero_grad(); `autocast` is None or the dtype the forward runs under."""
    params = list(layer.parameters())

    def forward():
        x.grad = None
        for p in params:
            p.grad = None
        if autocast is None:
            return layer(x)
        with torch.autocast(x.device.type, dtype=autocast):
            return layer(x)

    if mode == "fwd":
        return clock.time(lambda: [forward() for _ in range(inner)]) / inner
    if mode == "full":
        return clock.time(lambda: [forward().backward(grad_out) for _ in range(inner)]) / inner
    outputs = [forward() for _ in range(inner)]

    def backward():
        for y in outputs:
            x.grad = None
            for p in params:
                p.grad = None
            y.backward(grad_out)

    return clock.time(backward) / inner


def run_case(case: Case, args, clock: Clock) -> list[dict]:
    dtype = DTYPES[args.dtype]
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.autocast)
    torch._dynamo.reset()  # each case compiles for its own static shape
    layers = make_layers(case, args.providers, args.device, dtype, args.compile_ops)
    x = make_input(case, args.device, dtype)
    with torch.no_grad(), torch.autocast(args.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        grad_out = torch.randn_like(layers["dense"](x))  # in the output's layout and dtype
    rows = []
    for mode in args.modes:
        for layer in layers.values():
            for _ in range(max(args.warmup, 1)):
                sample(layer, x, grad_out, "full", clock, 1, autocast)  # compiles forward and backward
        if mode == "graph":
            graphs = capture_all(layers, x, grad_out, autocast, case.label)
            timers = {name: lambda g=g: clock.time(lambda: [g.replay() for _ in range(args.inner)]) / args.inner
                      for name, g in graphs.items()}
        else:
            timers = {name: lambda l=layer: sample(l, x, grad_out, mode, clock, args.inner, autocast)
                      for name, layer in layers.items()}
        times = {name: [] for name in timers}
        names = list(timers)
        for r in range(args.repeats):
            for name in names[r % len(names):] + names[: r % len(names)]:
                times[name].append(timers[name]())
        if mode == "graph":
            del graphs, timers  # each graph holds its own memory pool
            torch.cuda.empty_cache()
        dense = statistics.median(times["dense"])
        if mode == "full" and args.profile is not None:
            for name, layer in layers.items():
                label = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{case.op}-{case.label}-{name}")
                print(profile(lambda: sample(layer, x, grad_out, "full", clock, 1, autocast), label,
                              statistics.median(times[name]), args.device, args.profile))
        for name, ts in times.items():
            q1, median, q3 = statistics.quantiles(ts, n=4) if len(ts) > 1 else (ts[0],) * 3
            median = statistics.median(ts)
            rows.append({
                "op": case.op, "shape": case.label, "mode": mode, "provider": name,
                "median_ms": f"{median:.4f}", "q1_ms": f"{q1:.4f}", "q3_ms": f"{q3:.4f}",
                "ratio_to_dense": f"{median / dense:.3f}", "repeats": len(ts),
            })
    return rows


def capture(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, autocast=None) -> "torch.cuda.CUDAGraph":
    """A CUDA graph of one forward+backward of `layer`, as sample() calls it: gradients start
    empty, so the graph allocates them in its own pool and each replay writes them anew."""
    params = list(layer.parameters())

    def step():
        x.grad = None
        for p in params:
            p.grad = None
        # autocast's cache of cast weights must be off while capturing (see make_graphed_callables)
        with torch.autocast("cuda", dtype=autocast or torch.bfloat16, enabled=autocast is not None, cache_enabled=False):
            y = layer(x)
        y.backward(grad_out)

    side = torch.cuda.Stream()  # warm up on a side stream before capturing, as torch.cuda.graph asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def capture_all(layers: dict, x, grad_out, autocast, label: str) -> dict:
    """A graph per provider; one that cannot be captured is left out, and says why (dense must be)."""
    graphs = {}
    for name, layer in layers.items():
        try:
            graphs[name] = capture(layer, x, grad_out, autocast)
        except Exception as error:  # whatever stops a provider's capture: reported, its row left out
            if name == "dense":
                raise
            print(f"{label} {name}: no CUDA graph ({type(error).__name__}: {error})", file=sys.stderr)
    return graphs


PROFILED_CALLS = 5  # calls (a training step, or a layer's forward+backward) under the profiler


def kernel_time_us(events) -> float:
    """The GPU's time in kernels among profiler events, as the profiler's own table totals it:
    kernels are device events, and the CPU operator that launched one also carries its time as
    its own self device time, so a sum over every event counts each kernel twice."""
    from torch.autograd import DeviceType

    return sum(e.self_device_time_total for e in events
               if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False))


def profile(call, name: str, wall_ms: float, device: torch.device, out: Path) -> str:
    """Profile a few calls of `call`; write the operator tables to out/profile-<name>.txt and
    return the summary: kernel time per call against the (unprofiled) median wall time."""
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(PROFILED_CALLS):
            call()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    if device.type == "cuda":
        kernel_ms = kernel_time_us(events) / 1e3 / PROFILED_CALLS
        summary = (f"{name}: wall {wall_ms:.3f} ms per call, kernels {kernel_ms:.3f} ms per call "
                   f"(the GPU is busy {kernel_ms / wall_ms:.0%} of the time)")
    else:
        summary = f"{name}: wall {wall_ms:.3f} ms per call; operator times in profile-{name}.txt"
    tables = [summary, "", "by self CPU time", events.table(sort_by="self_cpu_time_total", row_limit=30)]
    if device.type == "cuda":
        tables += ["by self device time", events.table(sort_by="self_device_time_total", row_limit=20)]
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / f"profile-{name}.txt", "\n".join(tables).encode())
    return summary


# --- where it is recorded ----------------------------------------------------------------------


def machine_info(device: torch.device) -> dict:
    if device.type == "cuda":
        machine = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    else:
        machine = f"{_cpu_model()}, {os.cpu_count()} cores"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    return {
        "run": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": _commit(),
        "device": device.type,
        "machine": machine,
        "torch": torch.__version__,
        "triton": triton_version,
        "threads": torch.get_num_threads(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> str:
    if os.environ.get("BENCH_COMMIT"):  # a copy of the tree without .git (the GPU machine's)
        return os.environ["BENCH_COMMIT"]
    try:
        root = HERE.parent
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        # results written by an earlier run (bench/results) leave the code as committed
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)bench/results"], cwd=root, capture_output=True, text=True,
                               check=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def append_rows(path: Path, rows: list[dict], fields: list[str] = FIELDS) -> None:
    """Append to the CSV by writing a complete new file and renaming it over the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else ""
    if old and old.splitlines()[0].split(",") != fields:
        raise SystemExit(f"--csv {path}: its header is not this harness's ({','.join(fields)}); use another file")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fields, lineterminator="\n", extrasaction="ignore")
    if not old:
        writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, (old + buffer.getvalue()).encode())


def latest_run(path: Path, device: str, dtype: str, layout: str) -> list[dict]:
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if (r["device"], r["dtype"], r["layout"]) == (device, dtype, layout)]
    if not rows:
        return []
    last = max(r["run"] for r in rows)
    return [r for r in rows if r["run"] == last]


def plot(rows: list[dict], path: Path) -> bool:
    """Bars of time / dense time per shape: a row of panels per op, a column per mode.
    False where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ops = [op for op in OPS if any(r["op"] == op for r in rows)]
    modes = [mode for mode in MODES if any(r["mode"] == mode for r in rows)]
    providers = [p for p in dict.fromkeys(r["provider"] for r in rows) if p != "dense"]
    fig, axes = plt.subplots(len(ops), len(modes), figsize=(4.2 * len(modes), 3.6 * len(ops)), squeeze=False)
    for (i, op), (j, mode) in itertools.product(enumerate(ops), enumerate(modes)):
        ax = axes[i][j]
        panel = [r for r in rows if r["op"] == op and r["mode"] == mode]
        shapes = list(dict.fromkeys(r["shape"] for r in panel))
        width = 0.8 / max(len(providers), 1)
        for k, provider in enumerate(providers):
            ratio = {r["shape"]: float(r["ratio_to_dense"]) for r in panel if r["provider"] == provider}
            xs = [s + (k - (len(providers) - 1) / 2) * width for s in range(len(shapes))]
            ax.bar(xs, [ratio.get(s, float("nan")) for s in shapes], width, label=provider)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(shapes)), [s.replace(" ", "\n") for s in shapes], fontsize=7)
        ax.set_title(f"{op}, {mode}")
        ax.set_ylabel("time / plain layer")
    axes[0][0].legend(fontsize=8)
    first = rows[0]
    fig.suptitle(f"{first['machine']} | torch {first['torch']} | {first['dtype']} | commit {first['commit']}", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buffer.getvalue())
    return True


def table(rows: list[dict], providers: list[str]) -> str:
    """Markdown: one line per (op, shape, mode), each provider's median ms and ratio to dense."""
    lines = ["| op | shape | mode | " + " | ".join(providers) + " |", "|" + "---|" * (3 + len(providers))]
    keyed = {(r["op"], r["shape"], r["mode"], r["provider"]): r for r in rows}
    for op, shape, mode in dict.fromkeys((r["op"], r["shape"], r["mode"]) for r in rows):
        cells = []
        for p in providers:
            r = keyed.get((op, shape, mode, p))
            cells.append("-" if r is None else f"{float(r['median_ms']):.3f} ms ({float(r['ratio_to_dense']):.2f}x)")
        lines.append(f"| {op} | {shape} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    layout = "channels_last" if args.channels_last else "contiguous"
    if args.plot_only:
        rows = latest_run(args.csv, args.device.type, args.label, layout) if args.csv.exists() else []
        if not rows:
            raise SystemExit(f"--plot-only: {args.csv} holds no {args.device.type} {args.label} {layout} rows")
        print(f"plot: {args.plot}" if plot(rows, args.plot) else "no plot: matplotlib is not installed")
        return 0
    info = machine_info(args.device)
    cases = []
    for op in args.ops:
        if args.quick:
            shapes = {"linear": QUICK_LINEAR_SHAPES, "conv": QUICK_CONV_SHAPES}[op]
        elif args.shapes == "gpu":
            shapes = {"linear": GPU_LINEAR_SHAPES, "conv": GPU_CONV_SHAPES}[op]
        else:
            shapes = {"linear": LINEAR_SHAPES, "conv": CONV_SHAPES}[op]
        cases += [Case(op, shape, channels_last=args.channels_last and op == "conv") for shape in shapes]
    try:
        from tqdm import tqdm
    except ImportError:
        def tqdm(iterable, **_):
            return iterable
    clock = Clock(args.device)
    rows = []
    for case in tqdm(cases, desc="bench", unit="case", file=sys.stderr):
        case_rows = [{**info, "dtype": args.label, "layout": layout, **row} for row in run_case(case, args, clock)]
        if not args.no_save:
            append_rows(args.csv, case_rows)  # case by case: a run cut short keeps the cases it finished
        rows += case_rows

    print(f"{info['machine']} | torch {info['torch']} | triton {info['triton']} | {info['threads']} threads | "
          f"{args.label} | commit {info['commit']} | {info['run']}")
    print(f"median of {args.repeats} samples of {args.inner} calls; (ratio) = time / plain nn.Linear or nn.Conv2d in the same run"
          + ("; graph = forward+backward replayed from a CUDA graph (the GPU's time)" if "graph" in args.modes else ""))
    print(table(rows, args.providers))
    if not args.no_save:
        drawn = plot(latest_run(args.csv, args.device.type, args.label, layout), args.plot)
        print(f"appended {len(rows)} rows to {args.csv}" + (f"; plot: {args.plot}" if drawn else "; no plot (matplotlib is not installed)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

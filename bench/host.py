"""Host time of one gated layer call: tiny layers, so that kernels cost next to nothing and
what is timed is the work around them (Python, dispatch, autograd nodes, launches).

    python bench/host.py --device cpu
    python bench/host.py --device cuda --autocast bf16

A layer this small runs at the speed of its host code on a GPU, and so does a network of
small layers (ResNet-20 at batch 128 on an H100): these microseconds, times the number of
layers, are what a CS step adds to the dense step there. Each provider (the plain layer
`dense`, then a gated layer on each backend of the device) runs `--calls` forward+backward
calls per sample, in a rotating order; a figure is the median over `--repeats` samples, and
`extra_us` is the provider's median less dense's from the same run. Rows are appended
(atomically) to bench/results/host.csv.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import csext

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import append_rows, machine_info  # noqa: E402

FIELDS = ["run", "commit", "device", "machine", "torch", "triton", "threads", "dtype", "layer", "provider",
          "median_us", "q1_us", "q3_us", "extra_us", "ratio_to_dense", "repeats", "calls"]
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=30, help="timed samples per provider and layer")
    parser.add_argument("--calls", type=int, default=200, help="forward+backward calls per sample")
    parser.add_argument("--autocast", choices=sorted(AUTOCAST), default=None,
                        help="run every call under torch.autocast in this dtype")
    parser.add_argument("--csv", type=Path, default=Path(__file__).resolve().parent / "results" / "host.csv")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    if args.repeats < 2 or args.calls < 1:
        parser.error("--repeats must be >= 2 and --calls >= 1")
    return args


def layers(device: torch.device) -> dict:
    """name -> (plain layer, input): the smallest linear and 3x3 convolution worth the name."""
    return {"linear 8->8, 4 rows": (nn.Linear(8, 8), torch.randn(4, 8)),
            "conv 3x3 4->4, 1x4x6x6": (nn.Conv2d(4, 4, 3, padding=1), torch.randn(1, 4, 6, 6))}


def providers(plain: nn.Module, device: torch.device) -> dict:
    found = {"dense": plain}
    for backend in csext.backends.available():
        if csext.backends.runs_on(backend, device.type) and (backend, device.type) != ("triton", "cpu"):
            gated_type = csext.GatedLinear if isinstance(plain, nn.Linear) else csext.GatedConv2d
            gated = gated_type.from_dense(copy.deepcopy(plain))
            gated.beta, gated.penalty, gated.backend = 4.0, 1e-4, backend
            found[backend] = gated
    return found


def sample(layer: nn.Module, x: torch.Tensor, calls: int, device: torch.device, autocast=None) -> float:
    """Mean host time of one forward+backward call, in microseconds."""
    start = time.perf_counter()
    for _ in range(calls):
        with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            y = layer(x)
        y.sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()  # once per sample: the tiny kernels never fill the queue
    return (time.perf_counter() - start) / calls * 1e6


def main(argv=None) -> int:
    args = parse_args(argv)
    info = {**machine_info(args.device), "dtype": f"autocast-{args.autocast}" if args.autocast else "float32"}
    autocast = AUTOCAST.get(args.autocast)
    rows = []
    for name, (plain, x) in layers(args.device).items():
        plain, x = plain.to(args.device), x.to(args.device).requires_grad_()
        found = providers(plain, args.device)
        for layer in found.values():
            sample(layer, x, args.calls, args.device, autocast)  # warm up
        times = {p: [] for p in found}
        order = list(found)
        for r in range(args.repeats):
            for p in order[r % len(order):] + order[: r % len(order)]:
                times[p].append(sample(found[p], x, args.calls, args.device, autocast))
        dense = statistics.median(times["dense"])
        for p, ts in times.items():
            q1, _, q3 = statistics.quantiles(ts, n=4)
            median = statistics.median(ts)
            rows.append({**info, "layer": name, "provider": p, "median_us": f"{median:.2f}", "q1_us": f"{q1:.2f}",
                         "q3_us": f"{q3:.2f}", "extra_us": f"{median - dense:.2f}",
                         "ratio_to_dense": f"{median / dense:.3f}", "repeats": len(ts), "calls": args.calls})
    print(f"{info['machine']} | torch {info['torch']} | {info['threads']} threads | {info['dtype']} | "
          f"commit {info['commit']}")
    print("host time of one forward+backward call (median); extra = over the plain layer in the same run")
    for row in rows:
        print(f"  {row['layer']:24s} {row['provider']:8s} {float(row['median_us']):8.1f} us "
              f"(+{float(row['extra_us']):6.1f} us, {row['ratio_to_dense']}x)")
    if not args.no_save:
        append_rows(args.csv, rows, FIELDS)
        print(f"appended {len(rows)} rows to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

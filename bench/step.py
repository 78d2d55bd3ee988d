"""Time one CS training step of a whole network against the dense step, within one process.

    python bench/step.py --device cuda --model resnet20 --autocast bf16 [--channels-last] [--compile]

Providers: `dense` (the plain network), and the CS network (csext.sparsify, lam > 0, beta 4)
on each backend that runs on the device, `cs-<backend>`. A step is forward, cross-entropy
loss, backward and an SGD (momentum) update of weights and mask logits, on a CIFAR-10-shaped
random batch. Samples rotate among providers; each time is a median, each ratio is over the
dense median of the same run. With --compile every model's forward (dense ones too) runs
through torch.compile, which removes most of the per-layer host work of eager mode. Rows are
appended (atomically) to bench/results/step.csv.

With --profile DIR each provider also runs a few steps under torch.profiler: DIR gets the
operator tables (profile-<provider>.txt), and the summary line says how much of a step's wall
time the GPU spends in kernels. A GPU busy for a small share of the step is waiting for the
host: there, host work per layer (bench/host.py) is what a CS step adds.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import csext
from csext.experiments import nets

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import Clock, append_rows, machine_info, profile  # noqa: E402

FIELDS = ["run", "commit", "device", "machine", "torch", "triton", "threads", "model", "batch", "dtype",
          "layout", "provider", "median_ms", "q1_ms", "q3_ms", "ratio_to_dense", "repeats"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="resnet20", choices=["resnet20", "vgg16", "conv4"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--autocast", choices=["bf16", "fp16"], default=None)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile each model (dense and CS alike)")
    parser.add_argument("--repeats", type=int, default=30, help="timed steps per provider")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--csv", type=Path, default=Path(__file__).resolve().parent / "results" / "step.csv")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="also profile a few steps per provider; tables and a summary go to DIR")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    return args


def make_step(model, x, y, autocast, compile_model=False):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if compile_model:
        model = torch.compile(model)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    return step


def main(argv=None) -> int:
    args = parse_args(argv)
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.autocast)
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    dense = nets.build(args.model, (3, 32, 32), 10).to(args.device, memory_format=layout)
    x = torch.randn(args.batch, 3, 32, 32, device=args.device).contiguous(memory_format=layout)
    y = torch.randint(0, 10, (args.batch,), device=args.device)
    steps = {"dense": make_step(dense, x, y, autocast, args.compile)}
    for backend in csext.backends.available():
        if not csext.backends.runs_on(backend, args.device.type) or (backend, args.device.type) == ("triton", "cpu"):
            continue  # Triton on the CPU is its interpreter: nothing to time
        model = copy.deepcopy(dense)
        for m in csext.sparsify(model, penalty=1e-4, exclude=nets.DEFAULT_EXCLUDE[args.model]):
            m.beta, m.backend = 4.0, backend
            with torch.no_grad():
                m.mask_logits.normal_()
        steps[f"cs-{backend}"] = make_step(model.to(memory_format=layout), x, y, autocast, args.compile)
    clock = Clock(args.device)
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times = {name: [] for name in steps}
    names = list(steps)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(clock.time(steps[name]))
    info = machine_info(args.device)
    dense_median = statistics.median(times["dense"])
    rows = []
    for name, ts in times.items():
        q1, _, q3 = statistics.quantiles(ts, n=4)
        median = statistics.median(ts)
        rows.append({**info, "model": args.model, "batch": args.batch,
                     "dtype": f"autocast-{args.autocast}" if args.autocast else "float32",
                     "layout": "channels_last" if args.channels_last else "contiguous",
                     "provider": name + ("-compile" if args.compile else ""),
                     "median_ms": f"{median:.4f}", "q1_ms": f"{q1:.4f}", "q3_ms": f"{q3:.4f}",
                     "ratio_to_dense": f"{median / dense_median:.3f}", "repeats": len(ts)})
    print(f"{info['machine']} | torch {info['torch']} | {args.model} batch {args.batch} | "
          f"{rows[0]['dtype']} {rows[0]['layout']} | commit {info['commit']}")
    for row in rows:
        print(f"  {row['provider']:20s} {float(row['median_ms']):8.3f} ms  ({row['ratio_to_dense']}x dense)")
    if not args.no_save:
        append_rows(args.csv, rows, FIELDS)
        print(f"appended {len(rows)} rows to {args.csv}")
    if args.profile is not None:
        medians = {name: statistics.median(ts) for name, ts in times.items()}
        for name, step in steps.items():
            print("  " + profile(step, name, medians[name], args.device, args.profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())

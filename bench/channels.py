"""Inference speed of shrunk channel tickets against the dense network, on this CPU.

    python bench/channels.py speed --model vgg16 --keep 0.5,0.25,0.1
        random weights, a channel ticket keeping each gated layer's first `keep` fraction of
        units (the paper's layers: nets.DEFAULT_EXCLUDE), finalized and shrunk (csext.export.shrink)
    python bench/channels.py compare --runs DIR [DIR ...]
        the tickets of `compare --granularity channel --methods cs,l1` runs (timed there, in
        each ticket's "speed"), one row per ticket in bench/results/channels-mnist1d.csv
    python bench/channels.py ticket --run DIR
        the last ticket of a `search --granularity channel` run: its test accuracy and the dense
        run's (results.json), the shrunk ticket's output checked against the finalized one

Each row times the dense and the shrunk network in one run, interleaved, at batch 1 and 256
(median of `--repeats` timed calls after warm-up), with FLOPs (multiply-adds of the Linear and
convolution layers, counted by hooks on one batch-1 forward), and is appended to
bench/results/channels.csv with the CPU, torch version and commit.
"""

import argparse
import copy
import datetime
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import csext
from csext import export
from csext.experiments import nets

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import append_rows  # noqa: E402  (written whole, then renamed: a CSV never half-written)

RESULTS = Path(__file__).parent / "results" / "channels.csv"
FIELDS = ["run", "commit", "device", "machine", "torch", "threads", "model", "ticket", "seed", "units_kept",
          "weights_kept", "dense_acc", "ticket_acc", "flops_dense", "flops_shrunk", "flops_ratio", "batch",
          "dense_ms", "shrunk_ms", "speedup", "repeats"]
SHAPES = {"vgg16": (3, 32, 32), "resnet20": (3, 32, 32), "conv4": (3, 32, 32), "mlp": (40,), "cnn1d": (40,)}


def machine() -> str:
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {torch.get_num_threads()} threads"


def commit() -> str:
    out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                         cwd=Path(__file__).parent)
    return out.stdout.strip() or "unknown"


def flops(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of the Linear and convolution layers in one forward of x."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Linear):
            total += output.numel() * module.in_features
        else:
            total += output.numel() * module.weight[0].numel()

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return total


def time_pair(dense: nn.Module, shrunk: nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median milliseconds of each network on x, timed alternately in one run."""
    times = {id(dense): [], id(shrunk): []}
    with torch.inference_mode():
        for _ in range(3):
            dense(x)
            shrunk(x)
        for _ in range(repeats):
            for net in (dense, shrunk):
                start = time.perf_counter()
                net(x)
                times[id(net)].append(1000 * (time.perf_counter() - start))
    return statistics.median(times[id(dense)]), statistics.median(times[id(shrunk)])


def rows_for(name, ticket_name, seed, dense, shrunk, units_kept, weights_kept, accs, repeats, shape):
    base = {"run": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "commit": commit(),
            "device": "cpu", "machine": machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "model": name, "ticket": ticket_name, "seed": seed, "units_kept": f"{units_kept:.4f}",
            "weights_kept": f"{weights_kept:.4f}", "dense_acc": accs[0], "ticket_acc": accs[1]}
    one = torch.randn(1, *shape)
    f_dense, f_shrunk = flops(dense, one), flops(shrunk, one)
    rows = []
    for batch in (1, 256):
        x = torch.randn(batch, *shape)
        dense_ms, shrunk_ms = time_pair(dense, shrunk, x, repeats if batch > 1 else 10 * repeats)
        rows.append({**base, "flops_dense": f_dense, "flops_shrunk": f_shrunk,
                     "flops_ratio": f"{f_dense / f_shrunk:.3f}", "batch": batch, "dense_ms": f"{dense_ms:.4f}",
                     "shrunk_ms": f"{shrunk_ms:.4f}", "speedup": f"{dense_ms / shrunk_ms:.3f}",
                     "repeats": repeats if batch > 1 else 10 * repeats})
    return rows


def write(rows) -> None:
    append_rows(RESULTS, rows, FIELDS)
    for row in rows:
        print(", ".join(f"{k}={row[k]}" for k in ("model", "ticket", "units_kept", "ticket_acc", "dense_acc",
                                                   "batch", "dense_ms", "shrunk_ms", "speedup", "flops_ratio")))


def check_same(a: nn.Module, b: nn.Module, shape) -> None:
    x = torch.randn(8, *shape)
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=1e-4, atol=1e-4)


def speed(args) -> None:
    shape = SHAPES[args.model]
    for keep in [float(k) for k in args.keep.split(",")]:
        torch.manual_seed(0)
        dense = nets.build(args.model, shape, 10).eval()
        ticket = copy.deepcopy(dense)
        gated = csext.sparsify(ticket, granularity="channel", exclude=nets.DEFAULT_EXCLUDE[args.model])
        with torch.no_grad():
            for m in gated:  # keep the first ceil(keep * units) units of each layer
                units = m.mask_logits.shape[0]
                m.mask_logits.fill_(-1.0)[: max(1, math.ceil(keep * units))] = 1.0
        weights_kept = csext.sparsity_report(ticket).remaining
        csext.finalize(ticket)
        finalized = copy.deepcopy(ticket)
        export.shrink(ticket)
        check_same(finalized, ticket, shape)
        write(rows_for(args.model, f"first {keep:g} of units", "", dense, ticket, keep, weights_kept, ("", ""),
                       args.repeats, shape))


def ticket(args) -> None:
    from csext.experiments.search import load_network

    run = Path(args.run)
    results = json.loads((run / "results.json").read_text())
    best = results["tickets"][-1] if args.round is None else results["tickets"][args.round - 1]
    dense = load_network(run / "dense.pt").eval()
    finalized = load_network(run / f"ticket-{best['round']}.pt").eval()
    shrunk = export.shrink(copy.deepcopy(finalized))
    shape = SHAPES[results["model"]]
    check_same(finalized, shrunk, shape)
    kept = sum(p.numel() for p in shrunk.parameters()) / sum(p.numel() for p in dense.parameters())  # parameters
    write(rows_for(results["model"], f"cs channel round {best['round']}", results["seed"], dense, shrunk, kept,
                   best["remaining"], (f"{results['dense']['test_acc']:.4f}", f"{best['test_acc']:.4f}"),
                   args.repeats, shape))


COMPARE_RESULTS = Path(__file__).parent / "results" / "channels-mnist1d.csv"
COMPARE_FIELDS = ["commit", "machine", "torch", "threads", "model", "seed", "settings", "method", "round", "remaining",
                  "dense_acc", "dense_val_acc", "test_acc", "val_acc", "flops_ratio", "speedup_b1", "speedup_b256",
                  "within_1_point", "within_1_point_on_validation"]


def compare_runs(args) -> None:
    rows = []
    for run in args.runs:
        summary = json.loads((Path(run) / "summary.json").read_text())
        config = json.loads((Path(run) / "cs" / "results.json").read_text())["config"]
        settings = (f"penalty={config['penalty']} mask_init={config['mask_init']} "
                    f"target_remaining={config['target_remaining']} val_fraction={config['val_fraction']}")
        dense = summary["dense"]
        for method, entry in summary["methods"].items():
            for t in entry["tickets"]:
                rows.append({"commit": commit(), "machine": machine(), "torch": torch.__version__,
                             "threads": json.loads((Path(run) / method / "results.json").read_text())["tickets"][0]
                             ["speed"]["threads"], "model": summary["model"], "seed": summary["seed"],
                             "settings": settings, "method": method, "round": t["round"],
                             "remaining": f"{t['remaining']:.4f}", "dense_acc": dense["test_acc"],
                             "dense_val_acc": dense.get("val_acc", ""), "test_acc": t["test_acc"],
                             "val_acc": t.get("val_acc", ""), "flops_ratio": t["flops_ratio"],
                             "speedup_b1": t["speedup"]["1"], "speedup_b256": t["speedup"]["256"],
                             "within_1_point": t["test_acc"] >= dense["test_acc"] - 0.01,
                             "within_1_point_on_validation": "val_acc" in t and t["val_acc"] >= dense["val_acc"] - 0.01})
    append_rows(COMPARE_RESULTS, rows, COMPARE_FIELDS)
    for row in rows:
        print(", ".join(f"{k}={row[k]}" for k in COMPARE_FIELDS[4:]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--model", default="vgg16", choices=sorted(SHAPES))
    s.add_argument("--keep", default="0.5,0.25,0.1")
    s.add_argument("--repeats", type=int, default=20)
    t = sub.add_parser("ticket")
    t.add_argument("--run", required=True)
    t.add_argument("--round", type=int, default=None)
    t.add_argument("--repeats", type=int, default=50)
    c = sub.add_parser("compare")
    c.add_argument("--runs", nargs="+", required=True)
    args = parser.parse_args(argv)
    {"speed": speed, "ticket": ticket, "compare": compare_runs}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

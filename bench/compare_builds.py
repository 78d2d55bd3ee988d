"""Two builds of csext on this machine, in one run: the host time of tiny gated layers
(bench/host.py) and the CPU ratios of the layer shapes (bench/run.py), each against the plain
layer of the same process.

    python bench/compare_builds.py BEFORE AFTER [--rounds 5]

BEFORE and AFTER are checkouts of csext with the extension built in place (`pip install
--no-build-isolation -e .`, or `python setup.py build_ext --inplace`). Each round runs each
checkout's own bench/host.py and bench/run.py with that checkout first on the path, the two
builds in alternating order; a figure is the median over rounds of each round's ratio to the
plain layer, and its spread (lowest to highest round) is the noise this run measured. Rows are
appended (atomically) to bench/results/builds.csv.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import append_rows, machine_info  # noqa: E402

FIELDS = ["run", "commit", "device", "machine", "torch", "triton", "threads", "build", "build_commit", "bench",
          "case", "provider", "ratio_median", "ratio_low", "ratio_high", "rounds"]


def _commit(checkout: Path) -> str:
    done = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def _rows(checkout: Path, script: str, args: list[str]) -> list[dict]:
    """Run `checkout`/bench/`script` with `checkout` first on the path; its CSV rows."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.csv"
        env = {**os.environ, "PYTHONPATH": str(checkout)}
        done = subprocess.run([sys.executable, str(checkout / "bench" / script), *args, "--csv", str(out)],
                              cwd=checkout, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not out.exists():
            raise SystemExit(f"{checkout}/bench/{script} failed:\n{done.stdout}\n{done.stderr}")
        with open(out, newline="") as f:
            return list(csv.DictReader(f))


def one_round(checkout: Path, repeats: int, host_only: bool) -> dict:
    """(bench, case, provider) -> ratio to the plain layer, for one build."""
    ratios = {}
    for row in _rows(checkout, "host.py", ["--device", "cpu", "--repeats", str(repeats)]):
        ratios["host", row["layer"], row["provider"]] = float(row["ratio_to_dense"])
    if host_only:
        return ratios
    for row in _rows(checkout, "run.py", ["--device", "cpu", "--modes", "full", "--providers", "dense,cpp",
                                          "--repeats", str(repeats)]):
        ratios["layer", f"{row['op']} {row['shape']}", row["provider"]] = float(row["ratio_to_dense"])
    return ratios


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=15, help="samples per provider within each bench run")
    parser.add_argument("--host-only", action="store_true", help="the tiny layers of bench/host.py alone")
    parser.add_argument("--csv", type=Path, default=HERE / "results" / "builds.csv")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    builds = {"before": args.before.resolve(), "after": args.after.resolve()}
    for name, checkout in builds.items():
        if not (checkout / "bench" / "host.py").exists():
            parser.error(f"{name}: {checkout} is not a csext checkout (no bench/host.py)")
    samples = {name: [] for name in builds}
    for r in range(args.rounds):
        order = list(builds) if r % 2 == 0 else list(builds)[::-1]
        for name in order:
            samples[name].append(one_round(builds[name], args.repeats, args.host_only))
            print(f"round {r + 1}/{args.rounds}: {name} done", flush=True)
    import torch

    info = machine_info(torch.device("cpu"))
    rows = []
    keys = [k for k in samples["before"][0] if k[2] != "dense" and k[2] != "torch"]
    print(f"{info['machine']} | torch {info['torch']} | {info['threads']} threads | "
          f"before {_commit(builds['before'])}, after {_commit(builds['after'])} | median over {args.rounds} rounds "
          f"(low-high) of each round's ratio to the plain layer")
    for key in keys:
        line = f"  {key[0]:5s} {key[1]:36s} {key[2]:5s}"
        for name, checkout in builds.items():
            values = [s[key] for s in samples[name] if key in s]
            median = statistics.median(values)
            line += f"  {name} {median:6.3f} ({min(values):.3f}-{max(values):.3f})"
            rows.append({**info, "build": name, "build_commit": _commit(checkout), "bench": key[0], "case": key[1],
                         "provider": key[2], "ratio_median": f"{median:.3f}", "ratio_low": f"{min(values):.3f}",
                         "ratio_high": f"{max(values):.3f}", "rounds": len(values)})
        print(line)
    if not args.no_save:
        append_rows(args.csv, rows, FIELDS)
        print(f"appended {len(rows)} rows to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

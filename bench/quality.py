"""Ticket quality of the CS search on the default data and model, recorded in the repository.

    python bench/quality.py                 # about 3.5 minutes on 2 CPU cores

Runs `python -m csext search` with its defaults (mnist1d, mlp, 3 rounds) for seeds 0, 1, 2, and
with --target-remaining 0.2, 0.05 and 0.01 for seed 0. Prints a markdown table (dense accuracy;
per round the remaining fraction, accuracy, epochs and seconds) and writes every results.json,
with machine, versions and commit, to bench/results/quality-mnist1d-mlp.json (atomically).
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as harness  # noqa: E402  (bench/run.py: the machine line and commit)

from csext.experiments.files import write_atomic  # noqa: E402
from csext.experiments.search import Search, SearchConfig  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--targets", default="0.2,0.05,0.01")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "quality-mnist1d-mlp.json")
    args = parser.parse_args(argv)
    targets = [float(t) for t in args.targets.split(",") if t]

    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for seed in range(args.seeds):
            runs.append(Search(SearchConfig(seed=seed), Path(scratch) / f"seed{seed}", progress=False).run())
        for target in targets:
            runs.append(Search(SearchConfig(target_remaining=target), Path(scratch) / f"target{target}", progress=False).run())

    import torch

    info = harness.machine_info(torch.device("cpu"))
    print(f"{info['machine']} | torch {info['torch']} | commit {info['commit']} | {info['run']}")
    print("| run | dense acc | round 1: remaining, acc | round 2 | round 3 | epochs spent | seconds (last round) |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        target = r["config"]["target_remaining"]
        name = f"seed {r['seed']}" + (f", --target-remaining {target}" if target is not None else "")
        cells = [f"{t['remaining']:.2%}, {t['test_acc']:.3f}" for t in r["tickets"]]
        last = r["tickets"][-1]
        print(f"| {name} | {r['dense']['test_acc']:.3f} | " + " | ".join(cells) + f" | {last['epochs_spent']} | {last['seconds']:.1f} |")
    plain = [r for r in runs if r["config"]["target_remaining"] is None]
    dense = statistics.mean(r["dense"]["test_acc"] for r in plain)
    for i in range(len(plain[0]["tickets"])):
        acc = statistics.mean(r["tickets"][i]["test_acc"] for r in plain)
        remaining = statistics.mean(r["tickets"][i]["remaining"] for r in plain)
        print(f"mean over {len(plain)} seeds, round {i + 1}: {remaining:.2%} remain, accuracy {acc:.3f} "
              f"({(acc - dense) * 100:+.1f} points against dense {dense:.3f})")
    for r in runs:
        target = r["config"]["target_remaining"]
        if target is not None:
            landed = r["tickets"][-1]["remaining"]
            print(f"--target-remaining {target}: landed at {landed:.4f} ({(landed / target - 1) * 100:+.1f}% relative)")
    write_atomic(args.out, (json.dumps({"machine": info, "runs": runs}, indent=1) + "\n").encode())
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CS against the baselines over several seeds, on the default data and model.

    python bench/compare_seeds.py --runs runs/compare-seeds      # about 2.5 minutes a seed, 2 CPU cores

Runs `python -m csext compare --imp-rounds 12 --seed N --out RUNS/seedN` for each seed (a seed
whose summary.json exists is kept), prints a markdown table per seed and the means over seeds,
and writes every summary, with machine, versions and commit, to
bench/results/compare-seeds-mnist1d-mlp.json (atomically).
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as harness  # noqa: E402  (bench/run.py: the machine line and commit)

from csext.experiments import cli  # noqa: E402
from csext.experiments.files import write_atomic  # noqa: E402


def within_one_point(summary: dict, method: str):
    """The method's sparsest ticket within one point of the dense accuracy, or None."""
    return summary["methods"][method].get("sparsest_within_1_point")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, required=True, help="folder of the comparisons, one per seed")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--imp-rounds", type=int, default=12)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "compare-seeds-mnist1d-mlp.json")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s]

    summaries = []
    for seed in seeds:
        folder = args.runs / f"seed{seed}"
        if not (folder / "summary.json").exists():
            cli.main(["compare", "--imp-rounds", str(args.imp_rounds), "--seed", str(seed), "--out", str(folder),
                      "--quiet"] + (["--resume"] if folder.exists() else []))
        summaries.append(json.loads((folder / "summary.json").read_text()))

    import torch

    info = harness.machine_info(torch.device("cpu"))
    print(f"{info['machine']} | torch {info['torch']} | commit {info['commit']} | {info['run']}")
    methods = list(summaries[0]["methods"])
    print("| method | " + " | ".join(f"seed {s['seed']} (dense {s['dense']['test_acc']:.3f})" for s in summaries)
          + " | mean remaining, accuracy, epochs (seeds with a ticket) |")
    print("|---|" + "---|" * (len(summaries) + 1))
    for method in methods:
        found = [within_one_point(s, method) for s in summaries]
        cells = ["none" if t is None else f"{t['remaining']:.2%} at {t['test_acc']:.3f}, {t['epochs_spent']} ep"
                 for t in found]
        hits = [t for t in found if t is not None]
        mean = "none" if not hits else (
            f"{statistics.mean(t['remaining'] for t in hits):.2%}, {statistics.mean(t['test_acc'] for t in hits):.3f}, "
            f"{statistics.mean(t['epochs_spent'] for t in hits):.0f} ep ({len(hits)} of {len(found)})")
        print(f"| {method} | " + " | ".join(cells) + f" | {mean} |")
    write_atomic(args.out, (json.dumps({"machine": info, "summaries": summaries}, indent=1) + "\n").encode())
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

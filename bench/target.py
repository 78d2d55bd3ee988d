"""--target-remaining against untargeted runs that land at the same fraction (issue 30).

For each model and seed, with the search's defaults otherwise:
    untargeted        the default search (R rounds)
    untargeted-lam4   the same with lam x4: a sparser end
    same              targeted at where `untargeted` ended          -> against its round R
    denser            targeted at where `untargeted`'s round R-1 was -> against that round
    sparser           targeted at where `untargeted-lam4` ended     -> against its round R
Each targeted run's last ticket is compared with the untargeted ticket at that fraction; the
rows, with the difference in test accuracy, go to a CSV with the commit, CPU and torch version.

    python bench/target.py --data mnist1d --models mlp,cnn1d --seeds 0,1,2 --csv bench/results/target-mnist1d.csv
"""

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch


def run(out: Path, data: str, model: str, seed: int, extra: list[str]) -> dict:
    """One search (skipped where its results exist), its results.json."""
    results = out / "results.json"
    if not results.exists():
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one core a run; the runs go in parallel
        subprocess.run([sys.executable, "-m", "csext", "search", "--data", data, "--model", model, "--seed", str(seed),
                        "--out", str(out), "--quiet", *extra], check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(results.read_text())


def last_penalties(out: Path) -> str:
    """lam at the end of each search round of the run in `out` (its history.csv)."""
    with open(out / "history.csv", newline="") as f:
        ends = {row["round"]: row["penalty"] for row in csv.DictReader(f) if row["phase"] == "search"}
    return " ".join(ends.values())


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{os.cpu_count()}-core {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="mnist1d")
    parser.add_argument("--models", default="mlp,cnn1d")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--penalty", type=float, default=2e-5, help="lam of the untargeted and targeted runs")
    parser.add_argument("--work", default="/tmp/csext-target-bench", help="folder of the runs")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--csv", required=True)
    args = parser.parse_args()
    work = Path(args.work) / Path(args.data).stem
    models, seeds = args.models.split(","), [int(s) for s in args.seeds.split(",")]
    lam = ["--penalty", f"{args.penalty:g}"]
    pool = ThreadPoolExecutor(args.jobs)

    def runs(kind: str, targets: dict | None = None, extra=()) -> dict:
        jobs = {}
        for model in models:
            for seed in seeds:
                more = list(extra) + ([] if targets is None else ["--target-remaining", repr(targets[model, seed])])
                jobs[model, seed] = pool.submit(run, work / model / f"seed{seed}" / kind, args.data, model, seed, more)
        return {key: job.result() for key, job in jobs.items()}

    untargeted = runs("untargeted", extra=lam)
    lam4 = runs("untargeted-lam4", extra=["--penalty", f"{4 * args.penalty:g}"])
    cases = {
        "same": ({k: r["tickets"][-1]["remaining"] for k, r in untargeted.items()}, untargeted, -1),
        "denser": ({k: r["tickets"][-2]["remaining"] for k, r in untargeted.items()}, untargeted, -2),
        "sparser": ({k: r["tickets"][-1]["remaining"] for k, r in lam4.items()}, lam4, -1),
    }
    targeted = {case: runs(f"target-{case}", targets, lam) for case, (targets, _, _) in cases.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows = []
    for case, (targets, against, index) in cases.items():
        for model in models:
            for seed in seeds:
                t, u = targeted[case][model, seed], against[model, seed]
                ticket, reference = t["tickets"][-1], u["tickets"][index]
                shift = t.get("target", {}).get("threshold_shift")
                rows.append({
                    "data": Path(args.data).name, "model": model, "seed": seed, "case": case,
                    "target": targets[model, seed], "targeted_remaining": ticket["remaining"],
                    "targeted_test_acc": ticket["test_acc"],
                    "untargeted_run": f"{'lam x4' if against is lam4 else 'default'}, round {reference['round']}",
                    "untargeted_remaining": reference["remaining"], "untargeted_test_acc": reference["test_acc"],
                    "difference_points": round(100 * (ticket["test_acc"] - reference["test_acc"]), 2),
                    "threshold_shift": "" if shift is None else f"{shift['from']:.4f}->{shift['to']:.4f}",
                    "lam_at_round_ends": last_penalties(work / model / f"seed{seed}" / f"target-{case}"),
                    "commit": commit, "cpu": cpu_name(), "torch": torch.__version__,
                })
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    for case in cases:
        for model in models:
            picked = [r for r in rows if r["case"] == case and r["model"] == model]
            mean = sum(r["difference_points"] for r in picked) / len(picked)
            print(f"{case:8s} {model:8s} " + "  ".join(
                f"seed {r['seed']}: {r['targeted_remaining']:.4f} {r['targeted_test_acc']:.3f} vs "
                f"{r['untargeted_remaining']:.4f} {r['untargeted_test_acc']:.3f}" for r in picked)
                + f"  mean difference {mean:+.2f} points")


if __name__ == "__main__":
    main()

"""The paper's "all runs" mode: independent CS searches over a grid of (mask_init, lam), spread
over the ranks of torchrun (run i on rank i mod world size; one process runs them all), merged
by rank 0 into DIR/summary.json and one plot.

    torchrun --nproc-per-node 4 -m csext search --sweep-mask-init 0,-0.05 --sweep-penalty 1e-5,2e-5 --out DIR
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

from . import distributed
from .files import write_atomic
from .plots import pyplot, remaining_axis, save_png
from .search import RESULTS, Search, SearchConfig, sparsest_within_a_point, ticket_summary

SUMMARY = "summary.json"
PLOT = "sweep.png"


def settings(config: SearchConfig, mask_inits, penalties) -> list[SearchConfig]:
    """One config per (mask_init, lam) of the grid, in a fixed order."""
    mask_inits = list(mask_inits) or [config.mask_init]
    penalties = list(penalties) or [config.penalty]
    return [dataclasses.replace(config, mask_init=s0, penalty=lam) for s0, lam in itertools.product(mask_inits, penalties)]


def run_folder(out: Path, config: SearchConfig) -> Path:
    return out / f"mask_init={config.mask_init:g},penalty={config.penalty:g}"


def run_sweep(config: SearchConfig, mask_inits, penalties, out, resume: bool = False, progress: bool = True) -> dict | None:
    """Run this rank's share of the grid, then (rank 0) merge. Returns the summary on rank 0."""
    out = Path(out)
    grid = settings(config, mask_inits, penalties)
    rank, world = distributed.rank(), distributed.world_size()
    with distributed.independent():  # each run is a whole single-process search
        for i, run_config in enumerate(grid):
            if i % world != rank:
                continue
            folder = run_folder(out, run_config)
            finished = (folder / RESULTS).exists()
            if not (resume and finished):
                Search(run_config, folder, resume=resume and (folder / "checkpoint.pt").exists(),
                       progress=progress).run()
    distributed.barrier()
    if not distributed.is_main():
        return None
    runs = []
    for run_config in grid:
        results = json.loads((run_folder(out, run_config) / RESULTS).read_text())
        runs.append({"mask_init": run_config.mask_init, "penalty": run_config.penalty, "dense": results["dense"],
                     "tickets": [ticket_summary(t) for t in results["tickets"]]})
    summary = {"data": config.data, "model": config.model, "seed": config.seed, "runs": runs}
    # over the whole grid, as the paper's "all runs" reports it: each ticket with its setting
    dense = runs[0]["dense"]  # the same for every setting: s0 and lam act after it
    tickets = [{"mask_init": run["mask_init"], "penalty": run["penalty"], **t} for run in runs for t in run["tickets"]]
    summary["sparsest_within_1_point"] = sparsest_within_a_point(tickets, dense)
    if "val_acc" in dense:
        summary["sparsest_within_1_point_on_validation"] = sparsest_within_a_point(tickets, dense, "val_acc")
    write_atomic(out / SUMMARY, (json.dumps(summary, indent=2) + "\n").encode())
    _plot(summary, out / PLOT)
    return summary


def _plot(summary: dict, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    # one colour per s0, one marker and line style per lam: a grid of settings stays readable
    mask_inits = sorted({run["mask_init"] for run in summary["runs"]}, reverse=True)
    penalties = sorted({run["penalty"] for run in summary["runs"]})
    colours, markers, styles = plt.get_cmap("tab10"), "os^DvP*X", ("-", "--", ":", "-.")
    for run in summary["runs"]:
        tickets = run["tickets"]
        i, j = mask_inits.index(run["mask_init"]), penalties.index(run["penalty"])
        ax.plot([t["remaining"] for t in tickets], [t["test_acc"] for t in tickets], color=colours(i % 10),
                marker=markers[j % len(markers)], linestyle=styles[j % len(styles)], markersize=4,
                label=f"s0={run['mask_init']:g}, lam={run['penalty']:g}")
    ax.axhline(summary["runs"][0]["dense"]["test_acc"], color="gray", linestyle="--", label="dense")
    remaining_axis(ax, [], log=True)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"CS sweep: {summary['model']} on {summary['data']}, seed {summary['seed']}", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_png(plt, fig, path)
    return True

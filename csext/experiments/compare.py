"""`python -m csext compare`: CS and the baselines of csext.experiments.baselines on one setup.

Writes DIR/<method>/results.json (docs/contract.md section 3) and each ticket retrained, as the plain network
(DIR/<method>/ticket-R.pt, read by csext.experiments.search.load_network), for each method, DIR/summary.json, and two
plots: test accuracy against remaining fraction (log axis) and against epochs spent, a line per
method, the dense accuracy as a reference line. magnitude, snip and random prune to the
fractions CS's tickets reached (when cs is among the methods), else to `fractions`; so does l1,
L1-norm filter pruning, whose tickets are whole units.

Each ticket's results entry gets "speed" (csext.experiments.speed.measure): its FLOPs and CPU
latency at batch 1 and 256 against the dense network of the same architecture, the ticket timed
as the network it can run as: shrunk (csext.export.shrink) where it removes whole units (cs with
--granularity channel, l1), as saved (dense layers holding zeros) where it removes single weights.
A third plot draws test accuracy against the measured speedup at batch 256.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

from .. import __version__, backends
from . import nets
from .baselines import METHODS, STRUCTURED, MethodRun
from .files import FileError, check_output_folder, write_atomic
from .plots import pyplot, remaining_axis, save_png
from .search import (CHECKPOINT, RESULTS, ConfigError, Search, SearchConfig, accuracies, build_plain, changed_settings,
                     epoch_bar, load_data, load_network, make_optimizer, sparsest_within_a_point, ticket_summary,
                     train_epochs, training_module, TICKET_NETWORK)
from .speed import measure

SUMMARY = "summary.json"
SPEED_PLOT = "accuracy_vs_speedup.png"


def dense_baseline(config: SearchConfig, data, progress: bool = False) -> dict:
    """The plain network trained for the dense budget: {"test_acc" (and "val_acc"), "epochs", "seconds"}."""
    started = time.perf_counter()
    model = build_plain(config, data)
    train_epochs(training_module(model, config), data, make_optimizer(model, config), config, config.dense_budget,
                 phase=0, bar=epoch_bar("dense", config.dense_budget, progress))
    return {**accuracies(model, data, config), "epochs": config.dense_budget,
            "seconds": round(time.perf_counter() - started, 3)}


def compare(config: SearchConfig, methods, out, fractions=(0.2, 0.1, 0.05), imp_rounds: int = 10,
            l0_penalty: float = 0.1, progress: bool = True, resume: bool = False, timing_repeats: int = 20) -> dict:
    """Run `methods` on one setup into `out`. With `resume`, continue a comparison that was cut
    short: the cs search from its checkpoint, the methods that wrote results kept (their settings
    checked), the others run."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"--methods must be a comma-separated list from {', '.join(METHODS)}, got {list(methods)}")
    if any(not 0.0 < f <= 1.0 for f in fractions) or not fractions:
        raise ConfigError(f"--fractions must lie in (0, 1], got {list(fractions)}")
    if imp_rounds < 1:
        raise ConfigError(f"--imp-rounds must be >= 1, got {imp_rounds}")
    if timing_repeats < 1:
        raise ConfigError(f"--timing-repeats must be >= 1, got {timing_repeats}")
    if not str(out).strip():  # Path("") is the working directory
        raise ConfigError(f"--out must name a folder, got {str(out)!r}")
    out = Path(out)
    written = [m for m in METHODS if (out / m / RESULTS).exists() or (out / m / CHECKPOINT).exists()
               or any((out / m).glob("ticket-*.pt"))]
    if not resume and ((out / SUMMARY).exists() or written):
        raise ConfigError(f"--out {out} already holds a comparison: pass --resume to continue it, or another --out")
    if not 0.0 <= l0_penalty < math.inf:
        raise ConfigError(f"--l0-penalty must be a finite number >= 0, got {l0_penalty}")
    config.check()
    data = load_data(config)
    try:
        check_output_folder(out)
    except FileError as error:
        raise ConfigError(str(error)) from None
    per_method = {}
    if "cs" in methods:
        search = Search(config, out / "cs", resume=resume and (out / "cs" / CHECKPOINT).exists(), progress=progress)
        per_method["cs"] = search.run()
        if _time_tickets(per_method["cs"], out / "cs", config, data, config.granularity == "channel", timing_repeats):
            write_atomic(out / "cs" / RESULTS, (json.dumps(per_method["cs"], indent=2) + "\n").encode())
        fractions = [t["remaining"] for t in per_method["cs"]["tickets"]]
        dense = per_method["cs"]["dense"]
    else:
        dense = None
    settings = {"fractions": list(fractions), "imp_rounds": imp_rounds, "l0_penalty": l0_penalty}
    kept = {m: _kept_results(out / m / RESULTS, config, settings) for m in methods if m != "cs" and m in written}
    if dense is None:  # the baselines' reference: kept with their results, else trained again
        dense = next(iter(kept.values()))["dense"] if kept else dense_baseline(config, data, progress)
    template = _results_template(config, dense)
    for method in methods:
        if method == "cs":
            continue
        if method in kept:
            results = kept[method]
        else:
            run = MethodRun(method, config, data, fractions=fractions, imp_rounds=imp_rounds, l0_penalty=l0_penalty,
                            progress=progress, out=out / method)
            results = {**template, "method": method, "tickets": run.run()["tickets"]}
            results["config"] = {**template["config"], **settings}
            _time_tickets(results, out / method, config, data, method in STRUCTURED, timing_repeats)
            write_atomic(out / method / RESULTS, (json.dumps(results, indent=2) + "\n").encode())
        per_method[method] = results
        if progress:
            print(f"{method}: " + ", ".join(f"{t['remaining']:.2%} -> {t['test_acc']:.3f}" for t in results["tickets"]))
    summary = summarise(per_method, dense, config)
    write_atomic(out / SUMMARY, (json.dumps(summary, indent=2) + "\n").encode())
    plot_comparison(summary, out)
    return summary


def _time_tickets(results: dict, folder: Path, config: SearchConfig, data, structured: bool, repeats: int) -> bool:
    """Add "speed" to each ticket of `results` that lacks it, from its network in `folder`
    (shrunk where `structured`), against the plain network; whether any was added."""
    from ..export import shrink  # the networks' rebuild, needed only here

    added = False
    for ticket in results["tickets"]:
        if "speed" in ticket:
            continue
        # the run's own MODULE:FACTORY model, named on the command line (never read from the file)
        factory = nets.factory(config.model) if nets.is_factory_path(config.model) else None
        network = load_network(folder / TICKET_NETWORK.format(round=ticket["round"]), factory=factory)
        if structured:
            network = shrink(network)
        ticket["speed"] = {**measure(build_plain(config, data).cpu(), network, data.input_shape, repeats),
                           "shrunk": structured}
        added = True
    return added


def _kept_results(path: Path, config: SearchConfig, settings: dict) -> dict:
    """A baseline's results.json from an earlier, interrupted comparison, if made with these settings."""
    try:
        results = json.loads(path.read_text())
        now = json.loads(json.dumps({**dataclasses.asdict(config), **settings}))  # as results.json holds it
        changed = changed_settings(results["config"], now)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"--resume: {path} is not a readable results file "
                          f"({type(error).__name__}: {error})") from None
    if changed:
        raise ConfigError(f"--resume: {path} was made with other settings ({', '.join(changed)}); "
                          f"use them or another --out")
    return results


def _results_template(config: SearchConfig, dense: dict) -> dict:
    import torch

    return {"method": None, "data": config.data, "model": config.model, "seed": config.seed,
            "config": dataclasses.asdict(config), "dense": dense, "tickets": [],
            "environment": {"torch": torch.__version__, "csext": __version__,
                            "backend": backends.resolve("auto", torch.device(config.device).type),
                            "device": config.device}}


def summarise(per_method: dict, dense: dict, config: SearchConfig) -> dict:
    """Per method its tickets, and the sparsest ticket within 1 point of dense accuracy on the
    test set, and (with --val-fraction) on the validation set: the choice that leaves the test
    set out of it."""
    summary = {"data": config.data, "model": config.model, "seed": config.seed, "dense": dense, "methods": {}}
    for method, results in per_method.items():
        tickets = [{**ticket_summary(t), **_speed_summary(t)} for t in results["tickets"]]
        entry = summary["methods"][method] = {"tickets": tickets,
                                              "sparsest_within_1_point": sparsest_within_a_point(tickets, dense)}
        if "val_acc" in dense:
            entry["sparsest_within_1_point_on_validation"] = sparsest_within_a_point(tickets, dense, "val_acc")
    return summary


def _speed_summary(ticket: dict) -> dict:
    """What the summary keeps of a ticket's measured cost: FLOPs ratio and speedups (dense / ticket)."""
    speed = ticket.get("speed")
    if speed is None:
        return {}
    return {"flops_ratio": round(speed["flops_ratio"], 4), "speedup": speed["speedup"], "shrunk": speed["shrunk"]}


def plot_comparison(summary: dict, out: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    for x_key, name in (("remaining", "accuracy_vs_remaining.png"), ("epochs_spent", "accuracy_vs_epochs.png")):
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for method, entry in summary["methods"].items():
            tickets = sorted(entry["tickets"], key=lambda t: t[x_key])
            ax.plot([t[x_key] for t in tickets], [t["test_acc"] for t in tickets], "o-", label=method, markersize=4)
        ax.axhline(summary["dense"]["test_acc"], color="gray", linestyle="--", label="dense")
        if x_key == "remaining":
            remaining_axis(ax, [], log=True)
        else:
            ax.set_xlabel("epochs spent (search and retraining)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{summary['model']} on {summary['data']}, seed {summary['seed']}", fontsize=10)
        ax.legend(fontsize=8)
        save_png(plt, fig, out / name)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for method, entry in summary["methods"].items():
        tickets = sorted((t for t in entry["tickets"] if "speedup" in t), key=lambda t: t["speedup"]["256"])
        ax.plot([t["speedup"]["256"] for t in tickets], [t["test_acc"] for t in tickets], "o-", label=method,
                markersize=4)
    ax.axhline(summary["dense"]["test_acc"], color="gray", linestyle="--", label="dense")
    ax.axvline(1.0, color="gray", linestyle=":", linewidth=0.8)
    ax.set_xlabel("measured speedup over dense (batch 256, CPU)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{summary['model']} on {summary['data']}, seed {summary['seed']}", fontsize=10)
    ax.legend(fontsize=8)
    save_png(plt, fig, out / SPEED_PLOT)
    return True

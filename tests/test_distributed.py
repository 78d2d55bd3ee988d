"""torchrun --nproc-per-node 2 -m csext search: DDP on gloo, identical masks, files written once."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

import csext
from csext.experiments import search
from numerics import assert_history_close

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")


def _tiny_npz(path, n_train, n_test, seed):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(3, 12)) * 2
    y_train, y_test = rng.integers(0, 3, n_train), rng.integers(0, 3, n_test)
    np.savez(path, x_train=(centers[y_train] + rng.normal(size=(n_train, 12))).astype(np.float32), y_train=y_train,
             x_test=(centers[y_test] + rng.normal(size=(n_test, 12))).astype(np.float32), y_test=y_test)


def _run(args, cwd, ranks=None, **env):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks else [sys.executable]
    env = {**os.environ, "PYTHONPATH": str(Path(csext.__file__).parents[1]), "OMP_NUM_THREADS": "1",
           "CSEXT_CHECK_RANKS": "1", **env}  # every step: the ranks' mask logits must agree, else the run fails
    return subprocess.run(command + ["-m", "csext", "search", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_two_process_search_matches_one_process(tmp_path):
    _tiny_npz(tmp_path / "tiny.npz", 200, 60, seed=0)
    args = ["--data", str(tmp_path / "tiny.npz"), "--epochs", "3", "--rounds", "2", "--quiet"]
    done = _run(args + ["--out", str(tmp_path / "ddp")], tmp_path, ranks=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("results:") == 1  # rank 0 reports, once
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == [
        "accuracy_vs_remaining.png", "checkpoint.pt", "dense.pt", "history.csv", "results.json", "ticket-1.pt",
        "ticket-2.pt", "training.png"]
    history = search.read_history(tmp_path / "ddp" / search.HISTORY)  # rank 0's epochs, once each
    assert [(row["phase"], row["round"], row["epoch"]) for row in history] == [
        (kind, r, e) for kind, r in [("dense", 0), ("search", 1), ("retrain", 1), ("search", 2), ("retrain", 2)]
        for e in (1, 2, 3)]
    results = json.loads((tmp_path / "ddp" / "results.json").read_text())
    checkpoint = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)
    for ticket, saved in zip(results["tickets"], checkpoint["tickets"]):
        assert ticket["per_layer"] == pytest.approx({n: m.double().mean().item() for n, m in saved["mask"].items()})
    # the same search in one process: the same tickets (the gradient is the same mean, split in two)
    single = _run(args + ["--out", str(tmp_path / "one")], tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    alone = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    for a, b in zip(checkpoint["tickets"], alone["tickets"]):
        for name in a["mask"]:
            agree = (a["mask"][name] == b["mask"][name]).float().mean().item()
            assert agree > 0.99, (name, agree)
    # --resume under torchrun reads the rank-0 checkpoint on every rank
    again = _run(args + ["--out", str(tmp_path / "ddp"), "--resume"], tmp_path, ranks=2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "ddp" / "results.json").read_text())["tickets"] == results["tickets"]


def test_two_process_compiled_search_compiles_whole_networks(tmp_path):
    """--compile under torchrun: each network compiles as one graph inside DDP, with no graph
    break and under the recompile limit (torch.compile(DDP(m)) compiled an nn.Sequential's layers
    one frame each, up to the limit), and trains as the eager two-process run."""
    _tiny_npz(tmp_path / "tiny.npz", 200, 60, seed=0)
    args = ["--data", str(tmp_path / "tiny.npz"), "--epochs", "2", "--rounds", "1", "--quiet"]
    eager = _run(args + ["--out", str(tmp_path / "eager")], tmp_path, ranks=2)
    assert eager.returncode == 0, eager.stderr[-3000:]
    compiled = _run(args + ["--out", str(tmp_path / "compiled"), "--compile"], tmp_path, ranks=2,
                    TORCH_LOGS="graph_breaks,recompiles")
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    assert "Graph break" not in compiled.stderr and "recompile_limit" not in compiled.stderr, compiled.stderr[-3000:]
    assert compiled.stderr.count("Recompiling function") <= 2 * 4  # per rank: plain, soft (beta dynamic), hard
    eager, compiled = (search.read_history(tmp_path / run / search.HISTORY) for run in ("eager", "compiled"))
    assert_history_close(compiled, eager)


def _check_worker(rank, port, results):
    import torch.distributed as dist
    from torch import nn

    from csext.experiments import distributed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = nn.Sequential(nn.Linear(4, 3))
        csext.sparsify(model)
        distributed.assert_same_on_all_ranks(model)  # equal: passes
        if rank == 1:
            model[0].mask_logits.data[0, 0] = 0.5  # one logit crosses the threshold on one rank
        try:
            distributed.assert_same_on_all_ranks(model)
            results.put((rank, "passed"))
        except RuntimeError as error:
            results.put((rank, str(error)))
    finally:
        dist.destroy_process_group()


def test_rank_check_catches_a_difference():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.Queue()
    mp.start_processes(_check_worker, args=(port, results), nprocs=2, start_method="spawn")
    outcomes = dict(results.get(timeout=60) for _ in range(2))
    assert all("mask logits differ between ranks" in outcomes[r] for r in (0, 1)), outcomes


def _fsdp_worker(rank, port, results):
    """A gated model sharded by FSDP2's fully_shard against the same model whole, in one process."""
    import copy
    import traceback

    import torch.distributed as dist
    from torch import nn
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 5 * 5, 9),
                              nn.ReLU(), nn.Linear(9, 3))
        gated = csext.sparsify(model, penalty=1e-3)
        csext.set_beta(model, 3.0)
        with torch.no_grad():
            for m in gated:
                m.mask_logits.normal_()
        whole = copy.deepcopy(model)
        for m in gated:
            fully_shard(m)
        fully_shard(model)
        outcome = {"sharded": type(model[0].mask_logits).__name__}
        outcome["report"] = (csext.sparsity_report(model).as_dict(), csext.sparsity_report(whole).as_dict())
        penalty = csext.mask_penalty(model)
        outcome["penalty"] = (type(penalty).__name__, penalty.item(), csext.mask_penalty(whole).item())
        x, y = torch.randn(8, 2, 5, 5, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 3
        errors = []
        for lam_in_the_loss in (False, True):  # lam fused in the backward, then as mask_penalty in the loss
            csext.set_penalty(model, 0.0 if lam_in_the_loss else 1e-3)
            csext.set_penalty(whole, 0.0 if lam_in_the_loss else 1e-3)
            for net in (model, whole):
                net.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x.chunk(2)[rank]), y.chunk(2)[rank])  # this rank's half
            whole_loss = nn.functional.cross_entropy(whole(x), y)
            if lam_in_the_loss:
                loss = loss + 1e-3 * csext.mask_penalty(model)
                whole_loss = whole_loss + 1e-3 * csext.mask_penalty(whole)
            loss.backward()
            whole_loss.backward()
            for (name, p), q in zip(model.named_parameters(), whole.parameters()):
                errors.append((lam_in_the_loss, name, (p.grad.full_tensor() - q.grad).abs().max().item()))
        outcome["grad errors"] = errors
        for name, call in [("finalize", csext.finalize), ("sparsify", csext.sparsify),
                           ("to_sparse", csext.export.to_sparse)]:
            try:
                call(model)
                outcome[name] = "not refused"
            except ValueError as error:
                outcome[name] = str(error)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:  # the gathered state dict, finalized in an unsharded copy
            copied = copy.deepcopy(whole)
            copied.load_state_dict(full)
            outcome["finalized"] = torch.equal(csext.finalize(copied)(x), csext.finalize(whole)(x))
        results.put((rank, outcome))
    except Exception:
        results.put((rank, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch without torch.distributed")
def test_fsdp2_fully_shard_trains_reports_and_refuses_to_rebuild_shards():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").Queue()
    mp.start_processes(_fsdp_worker, args=(port, results), nprocs=2, start_method="spawn")
    outcomes = dict(results.get(timeout=120) for _ in range(2))
    for rank, outcome in outcomes.items():
        assert isinstance(outcome, dict), outcome  # else the worker's traceback
        assert outcome["sharded"] == "DTensor"
        mine, whole = outcome["report"]
        assert mine == whole  # every rank counts all shards, not its own
        kind, value, expected = outcome["penalty"]
        assert kind == "Tensor" and value == pytest.approx(expected, rel=1e-6)
        for lam_in_the_loss, name, error in outcome["grad errors"]:
            assert error < 1e-6, (lam_in_the_loss, name, error)
        for name in ("finalize", "sparsify", "to_sparse"):
            assert outcome[name].startswith(f"{name}: parameter ") and "sharded across ranks" in outcome[name]
        assert "get_model_state_dict" in outcome["finalize"] and "before fully_shard" in outcome["sparsify"]
    assert outcomes[0]["finalized"] is True


def test_sweep_spreads_runs_over_ranks_and_merges(tmp_path):
    _tiny_npz(tmp_path / "tiny.npz", 160, 40, seed=1)
    args = ["--data", str(tmp_path / "tiny.npz"), "--epochs", "2", "--rounds", "2", "--quiet",
            "--sweep-mask-init", "0,-0.05", "--sweep-penalty", "1e-4,1e-3"]
    done = _run(args + ["--out", str(tmp_path / "ranks")], tmp_path, ranks=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("summary:") == 1
    alone = _run(args + ["--out", str(tmp_path / "alone")], tmp_path)
    assert alone.returncode == 0, alone.stderr[-3000:]
    merged = json.loads((tmp_path / "ranks" / "summary.json").read_text())
    single = json.loads((tmp_path / "alone" / "summary.json").read_text())
    assert [(r["mask_init"], r["penalty"]) for r in merged["runs"]] == [(0.0, 1e-4), (0.0, 1e-3), (-0.05, 1e-4), (-0.05, 1e-3)]
    assert [r["tickets"] for r in merged["runs"]] == [r["tickets"] for r in single["runs"]]  # independent runs
    # over the grid, each ticket with its setting: the fewest weights within a point of dense
    every = [{"mask_init": r["mask_init"], "penalty": r["penalty"], **t} for r in merged["runs"] for t in r["tickets"]]
    close = [t for t in every if t["test_acc"] >= merged["runs"][0]["dense"]["test_acc"] - 0.01]
    assert merged["sparsest_within_1_point"] == (min(close, key=lambda t: t["remaining"]) if close else None)
    assert "sparsest_within_1_point_on_validation" not in merged  # no --val-fraction
    assert ("all runs: sparsest ticket within 1 point of dense: " in done.stdout) == bool(close)
    assert ("all runs: no ticket within 1 point of dense\n" in done.stdout) == (not close)
    assert (tmp_path / "ranks" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sum(1 for p in (tmp_path / "ranks").iterdir() if p.is_dir()) == 4

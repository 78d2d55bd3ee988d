"""The ticket search: schedule and reset arithmetic, rewinding, tickets, the command line,
checkpoints and --resume, and bad input."""

import argparse
import hashlib
import io
import json
import os
import subprocess
import tarfile
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import csext
from csext import schedule
from csext.experiments import cli, files, nets, search
from csext.experiments import data as csext_data
from csext.experiments.data import DataError, load
from numerics import assert_history_close


def _write_npz(path: Path, n_train=96, n_test=40, features=12, classes=3, seed=0, **overrides) -> Path:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, features)) * 2
    y_train, y_test = rng.integers(0, classes, n_train), rng.integers(0, classes, n_test)
    arrays = {
        "x_train": (centers[y_train] + rng.normal(size=(n_train, features))).astype(np.float32),
        "y_train": y_train,
        "x_test": (centers[y_test] + rng.normal(size=(n_test, features))).astype(np.float32),
        "y_test": y_test,
    }
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


SMALL = ["--model", "mlp", "--rounds", "2", "--epochs", "3", "--batch-size", "32", "--rewind-iter", "2",
         "--penalty", "1e-3", "--quiet"]


def _without_seconds(results: dict) -> dict:
    results = json.loads(json.dumps(results))
    results["dense"].pop("seconds")
    for t in results["tickets"]:
        t.pop("seconds")
    return results


def _history_without_seconds(out: Path) -> list[dict]:
    return [{**row, "seconds": None} for row in search.read_history(out / search.HISTORY)]


# --- arithmetic -------------------------------------------------------------------------------


def test_beta_schedule():
    assert schedule.beta_at(0, 10) == 1.0
    assert schedule.beta_at(9, 10) == pytest.approx(200.0)
    assert schedule.beta_at(3, 7, 64.0) == pytest.approx(8.0)  # 64 ** (3 / 6)
    values = [schedule.beta_at(i, 85) for i in range(85)]
    ratios = [b / a for a, b in zip(values, values[1:])]
    assert max(ratios) == pytest.approx(min(ratios))  # geometric
    with pytest.raises(ValueError, match="at least 2"):
        schedule.beta_at(0, 1)
    with pytest.raises(ValueError, match="index"):
        schedule.beta_at(10, 10)


@pytest.mark.parametrize("reset", ["paper", "official"])
def test_reset_between_rounds(reset):
    model = nn.Sequential(nn.Linear(3, 2))
    csext.sparsify(model, mask_init=-0.1)
    s = torch.tensor([[0.5, -0.3, 0.001], [-2.0, 0.0, -0.0004]])
    model[0].mask_logits.data.copy_(s)
    schedule.reset_mask_logits(model, beta_final=200.0, mask_init=-0.1, reset=reset)
    source = s * 200.0 if reset == "paper" else s
    torch.testing.assert_close(model[0].mask_logits.data, torch.clamp(source, max=-0.1), rtol=0, atol=0)
    with pytest.raises(ValueError, match="reset must be one of"):
        schedule.reset_mask_logits(model, 200.0, 0.0, reset="other")


def test_param_groups_keep_mask_logits_out_of_weight_decay():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 2))
    csext.sparsify(model)
    groups = {g["name"]: g for g in schedule.param_groups(model, 5e-4)}
    assert groups["mask_logits"]["weight_decay"] == 0.0
    assert len(groups["mask_logits"]["params"]) == 2
    assert groups["weights"]["weight_decay"] == 5e-4
    assert {id(p) for p in groups["weights"]["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert groups["biases_and_norms"]["weight_decay"] == 0.0


def test_rewind_restores_weights_and_batchnorm_buffers_exactly():
    model = nets.build("resnet20", (3, 8, 8), 10)
    csext.sparsify(model, exclude=nets.DEFAULT_EXCLUDE["resnet20"])
    saved = schedule.capture(model)
    assert not any(k.endswith(("mask_logits", "_extra_state")) for k in saved)
    before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        model(torch.randn(4, 3, 8, 8)).sum().backward()
        optimizer.step()
    assert not torch.equal(model.bn.running_mean, before["bn.running_mean"])
    masks = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("mask_logits")}
    schedule.restore(model, saved)
    for k, v in model.state_dict().items():
        if not torch.is_tensor(v):
            continue
        expected = masks[k] if k.endswith("mask_logits") else before[k]
        assert torch.equal(v, expected), k


def test_retrained_ticket_keeps_pruned_weights_exactly_zero():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
    csext.sparsify(model)
    rewind = schedule.capture(model)
    mask = {name: torch.rand(m.weight.shape) < 0.3 for name, m in csext.gated_modules(model)}
    search.prepare_ticket(model, mask, rewind)
    config = search.SearchConfig(weight_decay=1e-2, momentum=0.9, lr=0.5)
    optimizer = search.make_optimizer(model, config)
    assert all(not m.mask_logits.requires_grad for _, m in csext.gated_modules(model))
    for _ in range(20):
        nn.functional.cross_entropy(model(torch.randn(8, 10)), torch.randint(0, 3, (8,))).backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, m in csext.gated_modules(model):
        assert torch.all(m.weight[~mask[name]] == 0), name
        assert torch.any(m.weight[mask[name]] != 0), name
    assert csext.sparsity_report(model).kept == sum(int(v.sum()) for v in mask.values())


# --- the command -----------------------------------------------------------------------------


def test_search_command_end_to_end(tmp_path, capsys):
    data = _write_npz(tmp_path / "small.npz")
    out = tmp_path / "run"
    assert cli.main(["search", "--data", str(data), "--out", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "round 2:" in printed and "results.json" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"method", "data", "model", "seed", "config", "scaling", "dense", "tickets", "environment"}
    assert results["method"] == "cs" and results["model"] == "mlp" and results["seed"] == 0
    assert set(results["dense"]) == {"test_acc", "epochs", "seconds"} and results["dense"]["epochs"] == 3
    assert [t["round"] for t in results["tickets"]] == [1, 2]
    for i, t in enumerate(results["tickets"], start=1):
        assert set(t) == {"round", "remaining", "test_acc", "epochs_spent", "seconds", "per_layer"}
        assert 0.0 <= t["remaining"] <= 1.0 and 0.0 <= t["test_acc"] <= 1.0
        assert t["epochs_spent"] == i * (3 + 3)  # search and retraining, every round so far
        assert set(t["per_layer"]) == {"1", "3", "5"}
    assert results["tickets"][1]["remaining"] <= results["tickets"][0]["remaining"]
    assert set(results["environment"]) == {"torch", "csext", "backend", "device"}
    assert (out / search.PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same run again is refused rather than overwritten
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["search", "--data", str(data), "--out", str(out), *SMALL])
    assert exit_info.value.code == 2
    assert "already holds a run" in capsys.readouterr().err


def test_resume_after_a_kill_gives_the_same_results(tmp_path, monkeypatch, capsys):
    """Killed (Ctrl-C) mid-search: one line pointing to --resume, exit code 130, no traceback;
    the resumed run ends with the results of an uninterrupted one."""
    data = _write_npz(tmp_path / "small.npz")
    args = ["search", "--data", str(data), *SMALL]
    assert cli.main([*args, "--out", str(tmp_path / "whole")]) == 0
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())

    real_train_epoch, calls = search.train_epoch, {"n": 0}

    def killed_on_the_eighth_epoch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 8:  # inside round 2's search: after dense, search 1, retrain 1
            raise KeyboardInterrupt
        return real_train_epoch(*a, **k)

    monkeypatch.setattr(search, "train_epoch", killed_on_the_eighth_epoch)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*args, "--out", str(tmp_path / "killed")])
    assert exit_info.value.code == 130 and capsys.readouterr().err == (
        f"python -m csext search: interrupted (Ctrl-C); the same command with --resume continues from what "
        f"{tmp_path / 'killed'} holds (a search from its last finished epoch)\n")
    assert (tmp_path / "killed" / "checkpoint.pt").exists()
    assert not (tmp_path / "killed" / "results.json").exists()
    monkeypatch.setattr(search, "train_epoch", real_train_epoch)
    assert cli.main([*args, "--out", str(tmp_path / "killed"), "--resume"]) == 0
    resumed = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert _without_seconds(resumed) == _without_seconds(whole)
    assert _history_without_seconds(tmp_path / "killed") == _history_without_seconds(tmp_path / "whole")


def test_compile_trains_as_eager_and_resumes_either_way(tmp_path, monkeypatch):
    """--compile: the dense, search and retraining phases under torch.compile, with no graph break,
    train as eager does (every history row within float tolerance), and a run started with it
    resumes without it (how a run is executed is not one of its settings)."""
    data = _write_npz(tmp_path / "small.npz")
    args = ["search", "--data", str(data), *SMALL]
    assert cli.main([*args, "--out", str(tmp_path / "eager")]) == 0

    real_train_epoch, calls = search.train_epoch, {"n": 0}

    def compiled_then_killed_on_the_eighth_epoch(model, *a, **k):
        calls["n"] += 1
        if calls["n"] == 8:  # inside round 2's search: dense, search 1 and retrain 1 ran compiled
            raise KeyboardInterrupt
        assert isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
        return real_train_epoch(model, *a, **k)

    monkeypatch.setattr(search, "train_epoch", compiled_then_killed_on_the_eighth_epoch)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        with pytest.raises(SystemExit):
            cli.main([*args, "--out", str(tmp_path / "mixed"), "--compile"])
        assert not torch._dynamo.utils.counters["graph_break"]
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 3  # plain, soft mask, hard mask
    finally:
        torch._dynamo.reset()
    monkeypatch.setattr(search, "train_epoch", real_train_epoch)
    assert cli.main([*args, "--out", str(tmp_path / "mixed"), "--resume"]) == 0
    eager, mixed = (search.read_history(tmp_path / run / search.HISTORY) for run in ("eager", "mixed"))
    assert len(eager) == 3 + 2 * (3 + 3)
    assert_history_close(mixed, eager)
    results = json.loads((tmp_path / "mixed" / "results.json").read_text())
    assert results["config"]["compile"] is False  # the settings of the command that finished it


USER_NETS = """
from torch import nn


class TokenTransformer(nn.Module):
    \"\"\"Each feature a token: embedded, one encoder layer, mean-pooled, classified.\"\"\"

    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.embed = nn.Linear(1, 16)
        self.encoder = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x.flatten(1).unsqueeze(-1))).mean(1))


def not_a_network(input_shape, num_classes):
    return 3
"""


def test_a_users_network_by_module_and_factory(tmp_path, monkeypatch, capsys):
    """--model MODULE:FACTORY searches a network of the user's (here a transformer: its attention
    is gated too), saves tickets that load_network rebuilds, compare's baselines run on it, and
    bad names exit 2 naming --model."""
    (tmp_path / "csext_user_nets.py").write_text(USER_NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "csext_user_nets", raising=False)
    data = _write_npz(tmp_path / "small.npz")
    out = tmp_path / "run"
    args = ["search", "--data", str(data), "--rounds", "1", "--epochs", "2", "--penalty", "1e-3", "--quiet"]
    assert cli.main([*args, "--model", "csext_user_nets:TokenTransformer", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["tickets"][0]["per_layer"]) == {"embed", "encoder.self_attn", "encoder.self_attn.out_proj",
                                                       "encoder.linear1", "encoder.linear2", "head"}
    with pytest.raises(ValueError, match="pass factory="):  # the file names the factory; it is never imported
        search.load_network(out / "ticket-1.pt")
    ticket = search.load_network(out / "ticket-1.pt", factory=nets.factory("csext_user_nets:TokenTransformer"))
    config = search.SearchConfig(data=str(data))
    assert search.evaluate(ticket, load(str(data)), config) == results["tickets"][0]["test_acc"]
    # the baselines too: L0 gates the attention's in_proj_weight, as csext's mask logits do
    assert cli.main(["compare", *args[1:], "--model", "csext_user_nets:TokenTransformer", "--methods", "l0,imp",
                     "--imp-rounds", "1", "--out", str(tmp_path / "compare")]) == 0
    for method in ("l0", "imp"):
        ticket = json.loads((tmp_path / "compare" / method / "results.json").read_text())["tickets"][0]
        assert set(ticket["per_layer"]) == set(results["tickets"][0]["per_layer"])
    capsys.readouterr()
    for model, message in (("csext_user_nets:not_a_network", "returned a value of type int, not an nn.Module"),
                           ("no_such_module_here:build", "cannot import no_such_module_here:build")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*args, "--model", model, "--out", str(tmp_path / "bad")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "--model" in err and message in err, err


def test_history_has_a_row_per_epoch_that_agrees_with_the_results(tmp_path):
    data = _write_npz(tmp_path / "small.npz")
    out = tmp_path / "run"
    assert cli.main(["search", "--data", str(data), "--out", str(out), *SMALL]) == 0
    results = json.loads((out / "results.json").read_text())
    history = search.read_history(out / search.HISTORY)
    assert (out / search.HISTORY).read_text().splitlines()[0] == ",".join(search.HISTORY_COLUMNS)
    phases = [("dense", 0)] + [(kind, r) for r in (1, 2) for kind in ("search", "retrain")]
    assert [(row["phase"], row["round"], row["epoch"]) for row in history] == [
        (kind, r, e) for kind, r in phases for e in (1, 2, 3)]
    for row in history:
        assert 0 <= row["train_acc"] <= 1 and 0 <= row["test_acc"] <= 1 and row["loss"] > 0 and row["seconds"] >= 0
        assert row["lr"] == pytest.approx(search.learning_rate(search.SearchConfig(), row["epoch"] - 1, 3))
        if row["phase"] == "search":  # beta of the epoch's schedule, lam as set
            assert row["beta"] == pytest.approx(schedule.beta_at(row["epoch"] - 1, 3, 200.0), rel=1e-5)
            assert row["penalty"] == pytest.approx(1e-3)
        else:
            assert row["beta"] is None and row["penalty"] is None
    by_phase = {(row["phase"], row["round"]): row for row in history}  # each phase's last epoch
    assert by_phase["dense", 0]["test_acc"] == results["dense"]["test_acc"]
    assert by_phase["dense", 0]["remaining"] == 1.0
    for ticket in results["tickets"]:
        for kind in ("search", "retrain"):  # the search ends at the ticket; the retraining keeps it
            assert by_phase[kind, ticket["round"]]["remaining"] == pytest.approx(ticket["remaining"], rel=1e-5)
        assert by_phase["retrain", ticket["round"]]["test_acc"] == ticket["test_acc"]
    assert (out / search.TRAINING_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    older = tmp_path / "older.csv"  # written before the val_acc column
    older.write_text("phase,round,epoch,lr,beta,penalty,loss,train_acc,test_acc,remaining,seconds\n"
                     "search,1,2,0.1,14.1,2e-05,1.5,0.4,0.45,0.2,0.1\n")
    assert search.read_history(older) == [{"phase": "search", "round": 1, "epoch": 2, "lr": 0.1, "beta": 14.1,
                                           "penalty": 2e-05, "loss": 1.5, "train_acc": 0.4, "test_acc": 0.45,
                                           "val_acc": None, "remaining": 0.2, "seconds": 0.1}]


def test_the_dense_network_and_each_retrained_ticket_are_saved_as_plain_networks(tmp_path):
    data = _write_npz(tmp_path / "small.npz")
    out = tmp_path / "run"
    assert cli.main(["search", "--data", str(data), "--out", str(out), "--rescale", *SMALL]) == 0  # mask_scale != 1
    results = json.loads((out / "results.json").read_text())
    config, dataset = search.SearchConfig(data=str(data)), load(str(data))
    dense = search.load_network(out / search.DENSE_NETWORK)
    assert not dense.training and search.evaluate(dense, dataset, config) == results["dense"]["test_acc"]
    for ticket in results["tickets"]:
        path = out / search.TICKET_NETWORK.format(round=ticket["round"])
        network = search.load_network(path)
        assert not csext.model.gated_modules(network)  # plain nn.Linear layers
        assert search.evaluate(network, dataset, config) == ticket["test_acc"]
        layers = dict(network.named_modules())
        for name, fraction in ticket["per_layer"].items():  # pruned weights exactly zero, kept ones not
            assert (layers[name].weight != 0).float().mean().item() == pytest.approx(fraction)
        saved = torch.load(path, weights_only=True)
        assert (saved["round"], saved["remaining"], saved["test_acc"]) == (ticket["round"], ticket["remaining"],
                                                                           ticket["test_acc"])
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"load_network: .*bad.pt is not a network saved by csext's search"):
        search.load_network(tmp_path / "bad.pt")


def test_a_ticket_that_closes_a_layer_is_named_in_a_warning(tmp_path, capsys):
    """conv4 has no normalization layers: at s0 = 0 its seven halved layers pass almost no signal,
    and its gates close in the first epochs. The command says so, and names what to try."""
    rng = np.random.default_rng(0)
    centers, y_train, y_test = rng.normal(size=(3, 3, 8, 8)), rng.integers(0, 3, 96), rng.integers(0, 3, 40)
    images = lambda y: (centers[y] + rng.normal(size=(len(y), 3, 8, 8))).astype(np.float32)
    data = _write_npz(tmp_path / "images.npz", x_train=images(y_train), y_train=y_train, x_test=images(y_test),
                      y_test=y_test)
    args = ["search", "--data", str(data), "--model", "conv4", "--rounds", "1", "--epochs", "2", "--quiet"]
    assert cli.main([*args, "--out", str(tmp_path / "closed")]) == 0
    err = capsys.readouterr().err
    results = json.loads((tmp_path / "closed" / "results.json").read_text())  # the run still finishes
    closed = [name for name, fraction in results["tickets"][0]["per_layer"].items() if fraction == 0]
    assert closed and err == (f"python -m csext search: warning: search round 1: {', '.join(closed)} keep no weight, "
                              f"so in a network without skip connections the ticket's output no longer depends on "
                              f"its input. Without normalization layers the soft mask scales every layer's output "
                              f"by sigmoid(s0) (0.5 at --mask-init 0), which shrinks the signal and the gradients "
                              f"that would keep gates open; try --rescale (the authors' code divides the mask by "
                              f"sigmoid(s0)), a higher --mask-init, a lower --penalty or more --epochs\n")
    with pytest.warns(search.SearchWarning, match=f"{closed[-1]} keep no weight"):  # in Python, a warning
        search.Search(cli.parse([*args, "--out", str(tmp_path / "python")])[1], tmp_path / "python",
                      progress=False).run()


def test_validation_split_is_held_out_of_training_and_reported_beside_test_accuracy(tmp_path, capsys):
    data = _write_npz(tmp_path / "small.npz", n_train=100)
    whole = load(str(data))
    split = csext_data.with_validation(whole, 0.2)
    assert (len(split.y_train), len(split.y_val)) == (80, 20)
    rows = torch.cat([split.x_train, split.x_val])  # every training sample once, in one part or the other
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, whole.x_train.tolist()))
    assert torch.equal(csext_data.with_validation(whole, 0.2).x_val, split.x_val)  # the same draw each time
    assert torch.equal(split.x_test, whole.x_test)

    out = tmp_path / "run"
    assert cli.main(["search", "--data", str(data), "--out", str(out), "--val-fraction", "0.2", *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "(validation " in printed
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["val_fraction"] == 0.2 and 0 <= results["dense"]["val_acc"] <= 1
    config = search.SearchConfig(data=str(data), val_fraction=0.2)
    for ticket in results["tickets"]:
        network = search.load_network(out / search.TICKET_NETWORK.format(round=ticket["round"]))
        assert search.accuracies(network, split, config) == {"test_acc": ticket["test_acc"],
                                                             "val_acc": ticket["val_acc"]}
    history = search.read_history(out / search.HISTORY)
    assert all(0 <= row["val_acc"] <= 1 for row in history)
    assert history[-1]["val_acc"] == results["tickets"][-1]["val_acc"]


def test_files_are_written_whole_with_the_permissions_open_gives(tmp_path):
    from csext.experiments.files import write_atomic

    target = tmp_path / "results.json"
    write_atomic(target, b"old")
    old_umask = os.umask(0o022)
    try:
        write_atomic(target, b"new")
        assert target.stat().st_mode & 0o777 == 0o644  # readable by others, as open() makes it under this umask
    finally:
        os.umask(old_umask)

    def fails_midway(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, fails_midway)
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_resume_refuses_other_settings_and_bad_checkpoints(tmp_path, capsys):
    data = _write_npz(tmp_path / "small.npz")
    out = tmp_path / "run"
    assert cli.main(["search", "--data", str(data), "--out", str(out), *SMALL]) == 0
    cases = []
    cases.append((["--epochs", "4"], "other settings (epochs)"))
    checkpoint = out / "checkpoint.pt"
    good = checkpoint.read_bytes()

    def expect(extra, message):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["search", "--data", str(data), "--out", str(out), *SMALL, *extra, "--resume"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1

    expect(["--epochs", "4"], "other settings (epochs)")
    checkpoint.write_bytes(good[: len(good) // 2])  # truncated
    expect([], "is damaged or not a file torch.save wrote")

    class Payload:  # a pickle that would run code: weights_only must refuse it
        def __reduce__(self):
            return (print, ("pickled code ran",))

    torch.save({"config": {}, "phase": 0, "payload": Payload()}, checkpoint)
    expect([], "holds Python objects other than tensors and plain values")
    assert "pickled code ran" not in capsys.readouterr().out
    checkpoint.unlink()
    expect([], "does not exist")


@pytest.mark.parametrize(
    "case",
    ["missing file", "not an npz archive", "missing keys", "labels out of range", "lengths differ", "pickled arrays",
     "non-finite features", "channels-last images", "unknown model", "unknown data", "negative epochs",
     "model does not fit data", "validation fraction of 1", "validation set too small"],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, case):
    data = tmp_path / "data.npz"
    extra = []
    if case == "missing file":
        data = tmp_path / "absent.npz"
    elif case == "not an npz archive":  # numpy's own error spoke of pickled data
        data.write_bytes(b"x_train,y_train\n0.5,1\n")
    elif case == "missing keys":
        _write_npz(data, y_test=None)
    elif case == "labels out of range":
        _write_npz(data, y_test=np.full(40, 7))
    elif case == "lengths differ":
        _write_npz(data, y_train=np.zeros(95, dtype=np.int64))
    elif case == "pickled arrays":
        _write_npz(data, y_train=np.array([object()] * 96, dtype=object))
    elif case == "channels-last images":
        _write_npz(data, x_train=np.zeros((96, 8, 8, 3), np.uint8), x_test=np.zeros((40, 8, 8, 3), np.uint8))
    elif case == "non-finite features":  # 1e39 overflows float32
        _write_npz(data, x_test=np.where(np.eye(40, 12) > 0, 1e39, np.ones((40, 12))))
    else:
        _write_npz(data)
        extra = {"unknown model": ["--model", "transformer"], "unknown data": [],
                 "negative epochs": ["--epochs", "-3"], "model does not fit data": ["--model", "conv4"],
                 "validation fraction of 1": ["--val-fraction", "1"],
                 "validation set too small": ["--val-fraction", "0.001"]}[case]
        if case == "unknown data":
            data = "imagenet"
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["search", "--data", str(data), "--out", str(out), "--quiet", "--epochs", "2", *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "error:" in err and "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    if case == "not an npz archive":
        assert "not an .npz file (np.savez writes a zip archive of arrays" in err
    if case.startswith("validation"):
        assert "--val-fraction" in err
    assert not out.exists() or not any(out.iterdir())  # nothing half-written


def test_a_diverging_run_stops_with_exit_code_1_and_writes_no_results(tmp_path, capsys):
    """A NaN training loss (here from a learning rate far too large) stops the run with one line
    that says what to try; no results.json claims a ticket."""
    data, out = _write_npz(tmp_path / "data.npz"), tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["search", "--data", str(data), "--out", str(out), *SMALL, "--lr", "1e30"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m csext search: error: the training loss is ") and "lower --lr" in err, err
    assert len(err.splitlines()) == 1, err
    assert not (out / "results.json").exists()


def test_the_real_command_line_reports_bad_input_without_traceback(tmp_path):
    # from tmp_path, with the csext these tests import first on the path (not the source tree)
    env = {**os.environ, "PYTHONPATH": str(Path(csext.__file__).parents[1])}
    done = subprocess.run([sys.executable, "-m", "csext", "search", "--data", str(tmp_path / "none.npz"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=env)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"python -m csext search: error: --data {tmp_path / 'none.npz'}: no such file"]


def test_target_remaining_lands_within_ten_percent(tmp_path):
    data = _write_npz(tmp_path / "small.npz", n_train=256)
    config = search.SearchConfig(data=str(data), rounds=1, epochs=6, batch_size=32, penalty=1e-4, target_remaining=0.2)
    results = search.Search(config, tmp_path / "run", progress=False).run()
    assert abs(results["tickets"][0]["remaining"] - 0.2) <= 0.02


def test_npz_images_and_uint8(tmp_path):
    rng = np.random.default_rng(1)
    path = _write_npz(tmp_path / "img.npz", x_train=rng.integers(0, 256, (96, 28, 28), dtype=np.uint8),
                      x_test=rng.integers(0, 256, (40, 28, 28), dtype=np.uint8))
    data = load(str(path))
    assert data.input_shape == (1, 28, 28) and data.x_train.dtype == torch.float32
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0
    assert sum(p.numel() for p in nets.build("lenet300", data.input_shape, 10).parameters()) == 266610  # LeNet-300-100
    with pytest.raises(ValueError, match="28 x 28"):
        nets.build("lenet300", (1, 32, 32), 10)
    binary = load(str(_write_npz(tmp_path / "bool.npz", x_train=rng.random((96, 12)) > 0.5,
                                 x_test=rng.random((40, 12)) > 0.5)))  # binary features: 0.0 and 1.0
    assert binary.x_train.dtype == torch.float32 and set(binary.x_train.unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("name, min_side", [("conv4", 4), ("vgg16", 16)])
def test_image_models_name_the_smallest_image_their_poolings_allow(name, min_side):
    expected = f"model {name} needs images of at least {min_side} x {min_side}, got 12 x {min_side - 1}"
    with pytest.raises(ValueError, match=expected):
        nets.build(name, (3, 12, min_side - 1), 10)
    model = nets.build(name, (3, min_side, min_side + 3), 10).eval()
    assert model(torch.rand(2, 3, min_side, min_side + 3)).shape == (2, 10)


def test_mnist1d_is_generated_locally_and_leaves_global_rngs_alone():
    state = np.random.get_state()[1].copy()
    data = load("mnist1d")
    assert data.input_shape == (40,) and data.num_classes == 10
    assert len(data.y_train) == 4000 and len(data.y_test) == 1000
    assert np.array_equal(np.random.get_state()[1], state)


def test_cifar10_and_mnist_readers(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        records = np.concatenate([rng.integers(0, 10, (4, 1)), rng.integers(0, 256, (4, 3072))], axis=1)
        records.astype(np.uint8).tofile(folder / name)
    cifar = load("cifar10", str(tmp_path))
    assert cifar.x_train.shape == (20, 3, 32, 32) and cifar.num_classes == 10 and cifar.augment
    crop = csext_data.augment_batch(cifar.x_train[:3], torch.Generator().manual_seed(0))
    assert crop.shape == (3, 3, 32, 32)

    def idx(path, array, magic):
        header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
        path.write_bytes(header + array.astype(np.uint8).tobytes())

    idx(tmp_path / "train-images-idx3-ubyte", rng.integers(0, 256, (12, 28, 28)), 0x803)
    idx(tmp_path / "train-labels-idx1-ubyte", np.arange(12) % 10, 0x801)
    idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 256, (5, 28, 28)), 0x803)
    idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(5), 0x801)
    mnist = load("mnist", str(tmp_path))
    assert mnist.x_train.shape == (12, 1, 28, 28) and mnist.y_test.tolist() == [0, 1, 2, 3, 4]
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x00")
    with pytest.raises(DataError, match="truncated"):
        load("mnist", str(tmp_path))
    with pytest.raises(DataError, match="data-dir"):
        load("cifar10", None)


@pytest.mark.parametrize("name,shape", [("mlp", (40,)), ("cnn1d", (40,)), ("cnn1d", (2, 9)), ("conv4", (3, 32, 32)),
                                        ("resnet20", (3, 32, 32)), ("vgg16", (3, 32, 32))])
def test_models_build_and_gate_the_papers_layers(name, shape):
    model = nets.build(name, shape, 10)
    gated = csext.sparsify(model, exclude=nets.DEFAULT_EXCLUDE[name])
    assert model(torch.randn(2, *shape)).shape == (2, 10)
    names = [n for n, _ in csext.gated_modules(model)]
    assert len(gated) == len(names) > 0
    if name == "resnet20":
        assert "conv" not in names and "fc" not in names and len(names) == 18 + 2  # 18 block convs, 2 shortcuts
        # 16-ch: 6 x 2304; 32-ch: 4608 + 5 x 9216; 64-ch: 18432 + 5 x 36864; shortcuts 512 + 2048
        assert sum(m.weight.numel() for m in gated) == 269824
    if name == "cnn1d":
        assert [type(m) for m in gated] == [csext.GatedConv1d] * 3 + [csext.GatedLinear]
        if shape == (40,):  # mnist1d's CNN: 40 -> 19 -> 10 -> 5 samples, 25 channels
            assert sum(m.weight.numel() for m in gated) == 125 + 1875 * 2 + 1250
        with pytest.raises(ValueError, match=r"model cnn1d needs signals \(L,\) or \(C, L\)"):
            nets.build("cnn1d", (1, 2, 3), 10)


def test_presets_and_explicit_options(tmp_path, capsys):
    _, config = cli.parse(["search", "--preset", "resnet20-cifar10", "--epochs", "5", "--out", "x"])
    assert (config.data, config.model, config.epochs, config.lr_milestones) == ("cifar10", "resnet20", 5, [56, 71])
    assert (config.penalty, config.beta_final, config.batch_size, config.rounds) == (1e-8, 200.0, 128, 3)
    assert config.rewind_iter == 2 * 391  # two epochs of CIFAR-10 at batch 128
    _, config = cli.parse(["search", "--out", "x", "--exclude", "fc,conv", "--lr-milestones", "3,4"])
    assert config.exclude == ["fc", "conv"] and config.lr_milestones == [3, 4]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["search", "--preset", "vgg16-cifar10", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "--data-dir, which was not given" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["search", "compare"])
def test_help_explains_every_option_with_its_default(command, capsys):
    subcommands = next(a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction))
    options = [a for a in subcommands.choices[command]._actions if a.option_strings != ["-h", "--help"]]
    assert [a.option_strings[0] for a in options if not a.help] == []
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: None)" not in text and "(default: False)" not in text
    for shown in ["--seed SEED seeds the initialisation and every epoch's data order (default: 0)",
                  "--mask-init MASK_INIT s0; negative values give sparser tickets (default: 0.0)",
                  "--lr LR SGD learning rate (default: 0.1)"]:
        assert shown in text


def test_version_names_csext_torch_and_the_backends(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == (f"csext {csext.__version__} (torch {torch.__version__}; "
                                       f"backends: {', '.join(csext.backends.available())})\n")


def test_rescale_sets_the_papers_mask_scale(tmp_path):
    data = _write_npz(tmp_path / "small.npz")
    run = search.Search(search.SearchConfig(data=str(data), rescale=True, mask_init=-0.1), tmp_path / "run", progress=False)
    gated = csext.gated_modules(run._gated())
    assert gated and all(m.mask_scale == pytest.approx(1 / torch.sigmoid(torch.tensor(-0.1)).item()) for _, m in gated)
    assert all(m.mask_scale == 1.0 for _, m in csext.gated_modules(
        search.Search(search.SearchConfig(data=str(data)), tmp_path / "run2", progress=False)._gated()))


def test_download_checks_md5_and_takes_only_the_expected_files(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name in csext_data.CIFAR10_FILES + ("../outside.bin",):
            records = np.concatenate([rng.integers(0, 10, (2, 1)), rng.integers(0, 256, (2, 3072))], axis=1)
            payload = records.astype(np.uint8).tobytes()
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    payload = buffer.getvalue()
    fetched = []

    def fake_urlopen(url, timeout):
        fetched.append(url)
        return io.BytesIO(payload)

    monkeypatch.setattr(csext_data, "urlopen", fake_urlopen)
    with pytest.raises(DataError, match="is not the published"):
        load("cifar10", str(tmp_path / "data"), download=True)
    assert not (tmp_path / "data" / "cifar-10-batches-bin").exists()  # nothing written
    monkeypatch.setattr(csext_data, "CIFAR10_MD5", hashlib.md5(payload).hexdigest())
    cifar = load("cifar10", str(tmp_path / "data"), download=True)
    assert cifar.x_train.shape == (10, 3, 32, 32) and len(fetched) == 2
    unpacked = sorted(p.name for p in (tmp_path / "data" / "cifar-10-batches-bin").iterdir())
    assert unpacked == sorted(csext_data.CIFAR10_FILES)
    load("cifar10", str(tmp_path / "data"), download=True)  # already there: not fetched again
    assert len(fetched) == 2


def test_beta_per_step_follows_the_schedule_over_steps(tmp_path, monkeypatch):
    data = _write_npz(tmp_path / "small.npz")  # 96 samples, batch 32: 3 steps an epoch
    config = search.SearchConfig(data=str(data), rounds=1, epochs=2, batch_size=32, beta_per_step=True)
    seen = []
    real_set_beta = search.set_beta
    monkeypatch.setattr(search, "set_beta", lambda model, beta: (seen.append(beta), real_set_beta(model, beta)))
    search.Search(config, tmp_path / "run", progress=False).run()
    assert seen == pytest.approx([schedule.beta_at(i, 6) for i in range(6)])  # 1 ... 200 over the 6 steps


@pytest.mark.parametrize("amp, dtype", [("off", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_amp_runs_every_forward_in_its_dtype_and_keeps_float32_parameters(tmp_path, amp, dtype):
    data = _write_npz(tmp_path / "small.npz")
    config = search.SearchConfig(data=str(data), rounds=1, epochs=2, batch_size=32, amp=amp)
    seen = set()

    def record(module, args, output):
        if isinstance(module, (nn.Linear, csext.GatedLinear)):
            seen.add((type(module).__name__, module.training, output.dtype))

    handle = nn.modules.module.register_module_forward_hook(record)
    try:
        results = search.Search(config, tmp_path / "run", progress=False).run()
    finally:
        handle.remove()
    # dense training and evaluation, the search, and the ticket's retraining and evaluation
    assert seen == {(name, training, dtype) for name in ("Linear", "GatedLinear") for training in (True, False)}
    assert results["config"]["amp"] == amp and 0.0 <= results["tickets"][0]["test_acc"] <= 1.0
    state = torch.load(tmp_path / "run" / search.CHECKPOINT, weights_only=True)
    assert {t.dtype for t in state["search_model"].values() if t.is_floating_point()} <= {torch.float32, torch.float64}


def test_fp16_gives_the_mask_logits_the_gradient_of_the_fused_penalty(tmp_path):
    """--amp fp16 scales the loss, which the fused penalty would not follow (unscaled, lam would
    shrink 65536-fold): its lam is in the loss instead, and the mask logits' gradient after the
    scaler's unscaling is that of --amp off, whose lam is fused. lam is large enough that its part
    of the gradient (lam * m * (1 - m), 0.0125) dwarfs the tolerance."""
    path = _write_npz(tmp_path / "small.npz")
    grads = {}
    for amp in ("off", "fp16"):
        config = search.SearchConfig(data=str(path), model="mlp", batch_size=96, amp=amp)  # one step
        data = search.load_data(config)
        torch.manual_seed(0)
        model = search.build_gated(config, data, exclude=[])
        extra_loss = search.apply_penalty(model, 0.05, config)
        assert (extra_loss is None) == (amp == "off")
        assert {m.penalty for _, m in csext.gated_modules(model)} == {0.05 if amp == "off" else 0.0}
        seen = {}

        def keep_grads(model=model, seen=seen):  # after the step: unscaled by then
            seen.update({name: p.grad.clone() for name, p in model.named_parameters() if name.endswith("mask_logits")})

        search.train_epoch(model, data, search.make_optimizer(model, config), config, torch.Generator().manual_seed(0),
                           extra_loss=extra_loss, after_step=keep_grads)
        grads[amp] = seen
    assert grads["off"].keys() == grads["fp16"].keys() and grads["off"]
    for name, want in grads["off"].items():
        torch.testing.assert_close(grads["fp16"][name], want, rtol=0.02, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_fp16_resumes_with_the_loss_scale_it_had(tmp_path, monkeypatch):
    """A run killed mid-search resumes with its loss scaler's state. A scaler that doubles its
    scale every step overflows and skips steps every few, in a pattern that a fresh scaler, after
    the resumption, would not repeat."""
    def growing_scaler(config, state=None):
        scaler = torch.amp.GradScaler("cpu", growth_interval=1, enabled=config.amp == "fp16")
        if state is not None:
            scaler.load_state_dict(state)
        return scaler

    monkeypatch.setattr(search, "grad_scaler", growing_scaler)
    data = _write_npz(tmp_path / "small.npz")
    args = ["search", "--data", str(data), *SMALL, "--amp", "fp16"]
    assert cli.main([*args, "--out", str(tmp_path / "whole")]) == 0
    real_train_epoch, calls = search.train_epoch, {"n": 0}

    def killed_in_the_second_round(*a, **k):
        calls["n"] += 1
        if calls["n"] == 11:  # the second epoch of round 2's search (3 dense, 3 + 3 in round 1)
            raise KeyboardInterrupt
        return real_train_epoch(*a, **k)

    monkeypatch.setattr(search, "train_epoch", killed_in_the_second_round)
    with pytest.raises(SystemExit):
        cli.main([*args, "--out", str(tmp_path / "killed")])
    state = torch.load(tmp_path / "killed" / search.CHECKPOINT, weights_only=True)
    assert state["epoch"] == 1 and state["scaler"]["scale"] not in (None, 65536.0)  # grown or backed off
    monkeypatch.setattr(search, "train_epoch", real_train_epoch)
    assert cli.main([*args, "--out", str(tmp_path / "killed"), "--resume"]) == 0
    assert _history_without_seconds(tmp_path / "killed") == _history_without_seconds(tmp_path / "whole")


def test_a_checkpoint_older_than_a_setting_resumes_with_its_default(tmp_path, capsys):
    data = _write_npz(tmp_path / "small.npz")
    out = tmp_path / "run"
    args = ["search", "--data", str(data), "--out", str(out), *SMALL]
    assert cli.main(args) == 0
    whole = json.loads((out / "results.json").read_text())
    state = files.load_checked(out / search.CHECKPOINT)
    del state["config"]["amp"]  # made before --amp existed
    del state["history"]  # and before history.csv
    files.save_checked(out / search.CHECKPOINT, state)
    (out / "results.json").unlink()
    assert cli.main([*args, "--resume"]) == 0
    assert _without_seconds(json.loads((out / "results.json").read_text())) == _without_seconds(whole)
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*args, "--resume", "--amp", "bf16"])
    assert exit_info.value.code == 2 and "other settings (amp)" in capsys.readouterr().err

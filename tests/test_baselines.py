"""The baselines of `python -m csext compare`: fractions, masks, hard-concrete gates, the command."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import csext
from csext.experiments import baselines, cli, search
from csext.experiments.data import load
from csext.experiments.search import SearchConfig


def _tiny_npz(path, n_train=128, n_test=48, features=10, classes=3):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(classes, features)) * 2
    y_train, y_test = rng.integers(0, classes, n_train), rng.integers(0, classes, n_test)
    np.savez(path, x_train=(centers[y_train] + rng.normal(size=(n_train, features))).astype(np.float32), y_train=y_train,
             x_test=(centers[y_test] + rng.normal(size=(n_test, features))).astype(np.float32), y_test=y_test)
    return path


def _gated_mlp(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10), nn.ReLU(), nn.Linear(10, 4))
    csext.sparsify(model)
    return model


def _kept(mask):
    return sum(int(v.sum()) for v in mask.values())


def test_top_mask_keeps_exactly_the_count_even_with_ties():
    scores = {"a": torch.ones(3, 4), "b": torch.tensor([2.0, 1.0, 1.0])}
    mask = baselines.top_mask(scores, 5)
    assert _kept(mask) == 5 and bool(mask["b"][0])
    with pytest.raises(ValueError, match="keep must lie"):
        baselines.top_mask(scores, 16)


@pytest.mark.parametrize("fraction", [0.5, 0.1, 0.013])
def test_magnitude_random_and_snip_reach_the_fraction_exactly(fraction):
    model = _gated_mlp()
    total = sum(m.weight.numel() for _, m in csext.gated_modules(model))
    keep = max(1, round(fraction * total))
    magnitude = baselines.magnitude_mask(model, fraction)
    random = baselines.random_mask(model, fraction, torch.Generator().manual_seed(0))
    snip = baselines.snip_mask(model, torch.randn(16, 20), torch.randint(0, 4, (16,)), fraction)
    assert _kept(magnitude) == _kept(random) == _kept(snip) == keep
    # magnitude keeps the largest |w| over all layers; random does not
    weights = {n: m.weight.detach().abs() for n, m in csext.gated_modules(model)}
    smallest_kept = min(weights[n][magnitude[n]].min() for n in weights if magnitude[n].any())
    largest_pruned = max(weights[n][~magnitude[n]].max() for n in weights)
    assert smallest_kept >= largest_pruned
    mean_kept = {name: torch.cat([weights[n][mask[n]] for n in weights]).mean() for name, mask in
                 (("magnitude", magnitude), ("random", random))}
    assert mean_kept["magnitude"] > mean_kept["random"]
    assert any(not torch.equal(magnitude[n], random[n]) for n in weights)
    assert any(not torch.equal(snip[n], random[n]) for n in weights)


@pytest.mark.parametrize("fraction", [0.5, 0.25, 0.1])
def test_l1_filter_mask_prunes_the_lowest_l1_units_of_each_layer_to_the_fraction(fraction):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10), nn.ReLU(), nn.Linear(10, 4))
    layers = csext.sparsify(model, granularity="channel", exclude=["4"])
    with torch.no_grad():  # the largest |w| of the layer in a unit of small L1 norm: ranked by the sum, it goes
        model[0].weight[5] = 0.0
        model[0].weight[5, 0] = 0.5
    mask = baselines.l1_filter_mask(model, fraction)
    per_unit = {n: m.weights_per_logit() for n, m in csext.gated_modules(model)}
    total = sum(m.weight.numel() for m in layers)
    remaining = sum(int(mask[n].sum()) * per_unit[n] for n in mask) / total
    assert abs(remaining - fraction) <= max(per_unit.values()) / total + 1e-9  # the nearest a unit allows
    shares = [int(mask[n].sum()) / mask[n].numel() for n in mask]
    assert max(shares) - min(shares) <= 0.1  # the same share of units in every layer, to rounding
    for name, m in csext.gated_modules(model):
        norms = m.weight.detach().abs().sum(1)
        kept = mask[name].view(-1)
        assert mask[name].shape == m.mask_logits.shape
        assert norms[kept].min() >= norms[~kept].max()
    assert not mask["0"].view(-1)[5]
    with pytest.raises(ValueError, match="granularity='channel'"):
        baselines.l1_filter_mask(_gated_mlp(), 0.5)
    with pytest.raises(ValueError, match="fraction must lie"):
        baselines.l1_filter_mask(model, 0.0)


def test_l1_ticket_shrinks_to_its_units_and_computes_the_same(tmp_path):
    data_path = _tiny_npz(tmp_path / "tiny.npz")
    config = SearchConfig(data=str(data_path), epochs=2, batch_size=32)
    data = load(str(data_path))
    run = baselines.MethodRun("l1", config, data, fractions=[0.3], out=tmp_path / "l1")
    (ticket,) = run.run()["tickets"]
    assert ticket["remaining"] == pytest.approx(0.3, abs=0.02)
    finalized = search.load_network(tmp_path / "l1" / "ticket-1.pt")
    shrunk = csext.export.shrink(search.load_network(tmp_path / "l1" / "ticket-1.pt"))
    hidden = [m.out_features for m in shrunk if isinstance(m, nn.Linear)][:-1]
    assert hidden == [round(ticket["per_layer"]["1"] * 300), round(ticket["per_layer"]["3"] * 100)] and hidden[0] < 300
    assert shrunk[-1].out_features == 3  # the classifier is left whole
    x = data.x_test[:16]
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), finalized(x), rtol=1e-5, atol=1e-5)


def test_imp_removes_twenty_percent_per_round_and_ten_in_the_output_layer():
    model = _gated_mlp()
    layers = dict(csext.gated_modules(model))
    mask = {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in layers.items()}
    inner, output = [n for n in layers if n != "4"], "4"
    kept_inner, kept_output = sum(layers[n].weight.numel() for n in inner), layers[output].weight.numel()
    for _ in range(3):
        previous = mask
        mask = baselines.imp_step(model, mask, output_layer=output)
        kept_inner -= round(0.2 * kept_inner)
        kept_output -= round(0.1 * kept_output)
        assert sum(int(mask[n].sum()) for n in inner) == kept_inner
        assert int(mask[output].sum()) == kept_output
        assert all(not (mask[n] & ~previous[n]).any() for n in mask)  # pruned weights stay pruned


def test_hard_concrete_gate_and_penalty_equal_hand_computed_values(monkeypatch):
    gate = baselines.HardConcreteGate((3,))
    gate.log_alpha.data = torch.tensor([0.0, 2.0, -3.0])
    monkeypatch.setattr(torch, "rand_like", lambda t: torch.full_like(t, 0.5))  # logit(u) = 0
    gate.train()
    # s = sigmoid(log_alpha / (2/3)); z = clamp(s * 1.2 - 0.1, 0, 1)
    expected_train = [0.5, min(1.0, 1.2 / (1 + math.exp(-3.0)) - 0.1), 0.0]  # 1.043 clamps to 1
    torch.testing.assert_close(gate.gate(), torch.tensor(expected_train), rtol=1e-6, atol=1e-6)
    gate.eval()
    expected_eval = [0.5, min(1.0, 1.2 / (1 + math.exp(-2.0)) - 0.1), max(0.0, 1.2 / (1 + math.exp(3.0)) - 0.1)]
    torch.testing.assert_close(gate.gate(), torch.tensor(expected_eval), rtol=1e-6, atol=1e-6)
    shift = -(2.0 / 3.0) * math.log(0.1 / 1.1)  # -beta * log(-gamma / zeta) = 1.5986...
    expected_l0 = sum(1 / (1 + math.exp(-(a + shift))) for a in (0.0, 2.0, -3.0))
    assert gate.expected_l0().item() == pytest.approx(expected_l0, rel=1e-6)
    gate.log_alpha.data = torch.tensor([-9.0, 0.0, 9.0])
    gate.clamp_()
    torch.testing.assert_close(gate.log_alpha.data, torch.tensor([math.log(1e-2), 0.0, math.log(1e2)]))
    layer = nn.Linear(3, 2)
    baselines.add_l0_gates(nn.Sequential(layer), ["0"])
    assert layer.parametrizations.weight.original.shape == (2, 3) and layer.weight.shape == (2, 3)


@pytest.mark.parametrize("method", ["imp", "magnitude", "snip", "l0", "random"])
def test_every_method_keeps_pruned_weights_exactly_zero(tmp_path, monkeypatch, method):
    data = load(str(_tiny_npz(tmp_path / "tiny.npz")))
    config = SearchConfig(data=str(tmp_path / "tiny.npz"), epochs=2, batch_size=32, weight_decay=1e-2)
    evaluated = []
    real_accuracies = baselines.accuracies

    def checking_accuracies(model, data, config):
        for name, m in csext.gated_modules(model):
            pruned = m.mask_logits <= 0
            assert m.hard and torch.all(m.weight[pruned] == 0), name
        evaluated.append(model)
        return real_accuracies(model, data, config)

    monkeypatch.setattr(baselines, "accuracies", checking_accuracies)
    run = baselines.MethodRun(method, config, data, fractions=[0.3, 0.1], imp_rounds=2, l0_penalty=5.0)
    tickets = run.run()["tickets"]
    assert len(tickets) == (1 if method == "l0" else 2)
    assert len(evaluated) == len(run.history) + len(tickets)  # after every epoch, and each ticket at its end
    if method in ("magnitude", "snip", "random"):
        total = sum(v.numel() for v in [m.weight for _, m in csext.gated_modules(evaluated[0])])
        assert [round(t["remaining"] * total) for t in tickets] == [round(0.3 * total), round(0.1 * total)]
    assert all(t["epochs_spent"] > 0 for t in tickets)


def test_compare_command_end_to_end(tmp_path, capsys):
    data = _tiny_npz(tmp_path / "tiny.npz")
    out = tmp_path / "cmp"
    assert cli.main(["compare", "--data", str(data), "--out", str(out), "--epochs", "2", "--rounds", "2",
                     "--batch-size", "32", "--imp-rounds", "2", "--timing-repeats", "2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    for method in baselines.METHODS:  # a line each: the ticket, or that none is close
        assert f"{method}: sparsest ticket within 1 point of dense: " in printed or (
            f"{method}: no ticket within 1 point of dense\n" in printed)
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["methods"]) == list(baselines.METHODS)
    cs_fractions = [t["remaining"] for t in summary["methods"]["cs"]["tickets"]]
    for method in baselines.METHODS:
        results = json.loads((out / method / "results.json").read_text())
        assert results["method"] == method and results["dense"] == summary["dense"]
        assert "sparsest_within_1_point_on_validation" not in summary["methods"][method]  # no --val-fraction
        assert set(results) == {"method", "data", "model", "seed", "config", "dense", "tickets", "environment",
                                *(["scaling"] if method == "cs" else [])}
        if method in ("magnitude", "snip", "random", "l1"):  # matched to CS's tickets (l1: to a unit's weights)
            assert [t["remaining"] for t in results["tickets"]] == pytest.approx(
                cs_fractions, abs=1e-3 if method != "l1" else 0.01)
        # every retrained ticket saved as its plain network, which evaluates to its reported accuracy
        assert sorted(p.name for p in (out / method).glob("ticket-*.pt")) == sorted(
            f"ticket-{t['round']}.pt" for t in results["tickets"])
        last = results["tickets"][-1]
        network = search.load_network(out / method / f"ticket-{last['round']}.pt")
        assert search.evaluate(network, load(str(data)), search.SearchConfig(data=str(data))) == last["test_acc"]
        # a history row per epoch the method trained, as the search writes: each ticket's retraining
        # ends at its reported accuracy and fraction kept
        history = search.read_history(out / method / "history.csv")
        reference = results["dense"]["epochs"] if method == "cs" else 0  # the search trains its dense reference too
        assert len(history) == last["epochs_spent"] + reference
        assert {row["phase"] for row in history} <= {"dense", "search", "retrain"}
        for ticket in results["tickets"] if method != "cs" else []:
            rows = [row for row in history if (row["phase"], row["round"]) == ("retrain", ticket["round"])]
            assert [row["epoch"] for row in rows] == list(range(1, len(rows) + 1)) and rows
            assert rows[-1]["test_acc"] == pytest.approx(ticket["test_acc"], abs=1e-6)
            assert [row["remaining"] for row in rows] == pytest.approx([ticket["remaining"]] * len(rows), abs=1e-6)
        if method == "l0":  # the gates' support after their last epoch is the ticket
            searched = [row for row in history if row["phase"] == "search"]
            assert searched[-1]["remaining"] == pytest.approx(last["remaining"], abs=1e-6)
        assert (out / method / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # each ticket timed against dense at batch 1 and 256; l1's shrunk (fewer FLOPs), the unstructured as saved
        for ticket in results["tickets"]:
            speed = ticket["speed"]
            assert set(speed["speedup"]) == set(speed["latency_ms"]) == {"1", "256"}
            assert all(v > 0 for v in speed["speedup"].values()) and speed["shrunk"] == (method == "l1")
            assert (speed["flops"] < speed["flops_dense"]) if method == "l1" else speed["flops"] == speed["flops_dense"]
        assert [t["speedup"] for t in summary["methods"][method]["tickets"]] == [
            t["speed"]["speedup"] for t in results["tickets"]]
    for plot in ("accuracy_vs_remaining.png", "accuracy_vs_epochs.png", "accuracy_vs_speedup.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["compare", "--data", str(data), "--out", str(tmp_path / "x"), "--methods", "cs,obd", "--quiet"])
    assert exit_info.value.code == 2 and "--methods must be" in capsys.readouterr().err


def test_compare_shows_a_progress_bar_per_training_phase(tmp_path, capsys):
    data = _tiny_npz(tmp_path / "tiny.npz")
    assert cli.main(["compare", "--data", str(data), "--out", str(tmp_path / "cmp"), "--epochs", "2",
                     "--batch-size", "32", "--imp-rounds", "2", "--methods", "imp,l0"]) == 0
    bars = capsys.readouterr().err
    # without cs the dense baseline is trained first; then each method's phases, ticket by ticket
    for name in ("dense: 100%", "imp: dense: 100%", "imp: ticket 1 of 2: 100%", "imp: ticket 2 of 2: 100%",
                 "l0: gates: 100%", "l0: ticket 1 of 1: 100%"):
        assert f"{name}|" in bars, name
    assert bars.index("imp: ticket 2 of 2") < bars.index("l0: gates")


def test_compare_reports_validation_accuracy_for_every_method(tmp_path):
    data = _tiny_npz(tmp_path / "tiny.npz")
    out = tmp_path / "cmp"
    assert cli.main(["compare", "--data", str(data), "--out", str(out), "--epochs", "2", "--rounds", "1",
                     "--batch-size", "32", "--methods", "cs,magnitude,l0", "--val-fraction", "0.25", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["dense"]["val_acc"] <= 1
    for method in ("cs", "magnitude", "l0"):
        results = json.loads((out / method / "results.json").read_text())
        assert results["config"]["val_fraction"] == 0.25
        assert all(0 <= t["val_acc"] <= 1 for t in results["tickets"])
        assert [t["val_acc"] for t in summary["methods"][method]["tickets"]] == [
            t["val_acc"] for t in results["tickets"]]
        close = [t for t in summary["methods"][method]["tickets"] if t["val_acc"] >= summary["dense"]["val_acc"] - 0.01]
        chosen = summary["methods"][method]["sparsest_within_1_point_on_validation"]
        assert chosen == (min(close, key=lambda t: t["remaining"]) if close else None)


class Killed(Exception):
    pass


def test_compare_resume_finishes_an_interrupted_comparison(tmp_path, monkeypatch, capsys):
    """A comparison killed during one baseline continues with --resume: cs from its checkpoint,
    the baselines that finished kept (not run again), the rest run; the summary is an
    uninterrupted run's. Without --resume the folder is refused, and other settings too."""
    data = _tiny_npz(tmp_path / "tiny.npz")
    argv = ["compare", "--data", str(data), "--epochs", "2", "--rounds", "2", "--batch-size", "32",
            "--imp-rounds", "2", "--methods", "cs,imp,magnitude,random", "--quiet"]
    assert cli.main(argv + ["--out", str(tmp_path / "whole")]) == 0
    ran, real_run = [], baselines.MethodRun.run

    def run(self):
        ran.append(self.method)
        if self.method == "magnitude" and len(ran) == 2:  # the first comparison's second baseline
            raise Killed  # while pruning by magnitude
        return real_run(self)

    monkeypatch.setattr(baselines.MethodRun, "run", run)
    out = tmp_path / "cut"
    with pytest.raises(Killed):
        cli.main(argv + ["--out", str(out)])
    assert not (out / "summary.json").exists() and (out / "imp" / "results.json").exists()
    with pytest.raises(SystemExit):
        cli.main(argv + ["--out", str(out)])
    assert "already holds a comparison: pass --resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(argv[:-3] + ["--imp-rounds", "3", "--methods", "cs,imp,magnitude,random", "--quiet",
                              "--out", str(out), "--resume"])
    assert "imp/results.json was made with other settings (imp_rounds)" in capsys.readouterr().err
    kept = json.loads((out / "imp" / "results.json").read_text())
    del kept["config"]["amp"]  # written before --amp existed: read as its default
    (out / "imp" / "results.json").write_text(json.dumps(kept))
    ran.clear()
    assert cli.main(argv + ["--out", str(out), "--resume"]) == 0
    assert ran == ["magnitude", "random"]
    whole, cut = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("whole", "cut"))
    for summary in (whole, cut):
        summary["dense"].pop("seconds")  # the clock's, not the run's
        for entry in summary["methods"].values():  # measured latencies: the clock's too
            for ticket in entry["tickets"] + [entry["sparsest_within_1_point"] or {}]:
                assert ticket.pop("speedup", None) is not None or not ticket
    assert cut == whole

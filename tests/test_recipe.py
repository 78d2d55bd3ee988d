"""Issue 30: the authors' recipe (github lolemacs/continuous-sparsification), --rescale's penalty,
the fixes to export and mask_penalty, and --target-remaining. One test per item of the issue,
then the recipe against the authors' formulas, written out here from their definitions."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils import prune

import csext
from csext import export, schedule
from csext.experiments import cli, nets, search


def _images(path: Path, n_train=48, n_test=16, shape=(3, 8, 8), classes=2, seed=0) -> Path:
    """A tiny generated image set: each class a random pattern plus noise."""
    rng = np.random.default_rng(seed)
    patterns = rng.normal(size=(classes, *shape))
    y_train, y_test = rng.integers(0, classes, n_train), rng.integers(0, classes, n_test)
    np.savez(path, x_train=(patterns[y_train] + rng.normal(size=(n_train, *shape))).astype(np.float32),
             y_train=y_train, x_test=(patterns[y_test] + rng.normal(size=(n_test, *shape))).astype(np.float32),
             y_test=y_test)
    return path


def _vectors(path: Path, n_train=96, n_test=40, features=12, classes=3, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, features)) * 2
    y_train, y_test = rng.integers(0, classes, n_train), rng.integers(0, classes, n_test)
    np.savez(path, x_train=(centers[y_train] + rng.normal(size=(n_train, features))).astype(np.float32),
             y_train=y_train, x_test=(centers[y_test] + rng.normal(size=(n_test, features))).astype(np.float32),
             y_test=y_test)
    return path


# --- 1. the penalty under --rescale ------------------------------------------------------------


@pytest.mark.parametrize("amp", ["off", "fp16"])
def test_rescale_gives_the_authors_penalty_gradient(amp):
    """One weight, s = s0 = 0, no task gradient: the authors' loss lam * c * sigmoid(beta * s)
    gives ds = lam * c * beta * m * (1 - m) = 1 * 2 * 0.25 = 0.5 (csext's unscaled: 0.25)."""
    config = search.SearchConfig(rescale=True, mask_init=0.0, amp=amp)
    layer = csext.GatedLinear(1, 1, bias=False)
    layer.mask_scale = 2.0  # c = 1 / sigmoid(0), as build_gated sets it with --rescale
    model = nn.Sequential(layer)
    extra = search.apply_penalty(model, 1.0, config)
    objective = model(torch.zeros(1, 1)).sum()
    (objective if extra is None else objective + extra()).backward()
    assert layer.mask_logits.grad.item() == pytest.approx(0.5)
    assert config.scale == 2.0
    assert search.SearchConfig().scale == 1.0 and search.SearchConfig(rescale=True, mask_init=-1.0).scale == \
        pytest.approx(1 / torch.sigmoid(torch.tensor(-1.0)).item())


def test_results_record_the_scaling_and_old_rescaled_checkpoints_are_refused(tmp_path, capsys):
    data = _vectors(tmp_path / "small.npz")
    args = ["search", "--data", str(data), "--model", "mlp", "--rounds", "1", "--epochs", "2", "--rescale",
            "--mask-init", "-0.5", "--quiet"]
    assert cli.main([*args, "--out", str(tmp_path / "run")]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    c = 1 + math.exp(0.5)
    assert results["scaling"] == {"mask": pytest.approx(c), "penalty": pytest.approx(c)}
    assert results["config"]["rescale"] is True
    assert _run(tmp_path / "plain", data)["scaling"] == {"mask": 1.0, "penalty": 1.0}
    # a checkpoint made before --rescale scaled lam: refused in one line
    state = search.load_checked(tmp_path / "run" / search.CHECKPOINT)
    del state["penalty_scale"]
    search.save_checked(tmp_path / "run" / search.CHECKPOINT, state)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*args, "--out", str(tmp_path / "run"), "--resume"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "made before --rescale scaled lam" in err


def _run(out: Path, data: Path, **settings) -> dict:
    config = search.SearchConfig(data=str(data), rounds=1, epochs=2, **settings)
    return search.Search(config, out, progress=False).run()


# --- 2. the optimizer across search rounds -----------------------------------------------------


@pytest.mark.parametrize("recipe, kept", [("csext", False), ("authors", True)])
def test_the_authors_recipe_keeps_the_optimizer_across_search_rounds(tmp_path, monkeypatch, recipe, kept):
    data = _vectors(tmp_path / "small.npz")
    states, real = [], search.train_epoch

    def recording(model, data, optimizer, *a, **k):
        states.append(sum(len(v) for v in optimizer.state.values()))  # momentum buffers held before the epoch
        return real(model, data, optimizer, *a, **k)

    monkeypatch.setattr(search, "train_epoch", recording)
    config = search.SearchConfig(data=str(data), recipe=recipe, rounds=2, epochs=2, dense_epochs=1, retrain_epochs=1)
    search.Search(config, tmp_path / "run", progress=False).run()
    # dense 1, search 1 (2 epochs), retrain 1, then search round 2's first epoch
    assert len(states) == 1 + 2 + 1 + 2 + 1
    assert states[1] == 0 and states[2] > 0  # round 1 starts fresh
    assert (states[4] > 0) is kept  # round 2 starts with round 1's momentum, with recipe authors alone
    assert states[3] == 0  # a ticket's retraining always starts a new optimizer


def test_the_authors_recipe_resumes_bit_identically(tmp_path, monkeypatch):
    """Killed as round 2 starts (its optimizer, round 1's, only in the checkpoint), then resumed."""
    data = _vectors(tmp_path / "small.npz")
    args = ["search", "--data", str(data), "--model", "mlp", "--recipe", "authors", "--rounds", "2", "--epochs", "2",
            "--dense-epochs", "1", "--retrain-epochs", "1", "--penalty", "1e-3", "--quiet"]
    assert cli.main([*args, "--out", str(tmp_path / "whole")]) == 0
    real, calls = search.train_epoch, {"n": 0}

    def killed(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # round 2's first search epoch
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(search, "train_epoch", killed)
    with pytest.raises(SystemExit):
        cli.main([*args, "--out", str(tmp_path / "killed")])
    monkeypatch.setattr(search, "train_epoch", real)
    assert cli.main([*args, "--out", str(tmp_path / "killed"), "--resume"]) == 0
    whole, resumed = (search.load_checked(tmp_path / d / search.CHECKPOINT) for d in ("whole", "killed"))
    for key in ("search_model", "search_optimizer"):
        flat_whole, flat_resumed = _flatten(whole[key]), _flatten(resumed[key])
        assert flat_whole.keys() == flat_resumed.keys()
        for k in flat_whole:
            assert torch.equal(flat_whole[k], flat_resumed[k]) if torch.is_tensor(flat_whole[k]) else \
                flat_whole[k] == flat_resumed[k], k
    tickets = [(t["remaining"], t["test_acc"]) for t in whole["results"]["tickets"]]
    assert tickets == [(t["remaining"], t["test_acc"]) for t in resumed["results"]["tickets"]]


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        return {k2: v2 for k, v in tree.items() for k2, v2 in _flatten(v, f"{prefix}{k}/").items()}
    if isinstance(tree, (list, tuple)):
        return {k2: v2 for i, v in enumerate(tree) for k2, v2 in _flatten(v, f"{prefix}{i}/").items()}
    return {prefix: tree}


# --- 3. weight decay ---------------------------------------------------------------------------


def test_the_authors_recipe_decays_every_parameter_but_the_mask_logits():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 2))
    csext.sparsify(model, exclude=["3"])
    logits = {id(m.mask_logits) for _, m in csext.gated_modules(model)}
    optimizer = search.make_optimizer(model, search.SearchConfig(recipe="authors", weight_decay=1e-4))
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay.keys() == {id(p) for p in model.parameters()}
    for name, p in model.named_parameters():
        assert decay[id(p)] == (0.0 if id(p) in logits else 1e-4), name  # BatchNorm and biases decayed
    csext_groups = {g["name"]: g for g in schedule.param_groups(model, 1e-4)}
    assert csext_groups["biases_and_norms"]["weight_decay"] == 0.0  # csext's default is unchanged


# --- 4. which layers, their initialisation, the shortcut ---------------------------------------


def test_the_authors_resnet20_gates_conv0_leaves_shortcuts_and_classifier_dense_xavier_no_shortcut_norm():
    torch.manual_seed(0)
    model = nets.build("resnet20", (3, 32, 32), 10, recipe="authors")
    shortcuts = [m.shortcut for m in model.blocks if not (isinstance(m.shortcut, nn.Sequential) and not len(m.shortcut))]
    assert len(shortcuts) == 2 and all(type(s) is nn.Conv2d and s.kernel_size == (1, 1) for s in shortcuts)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 1 + 18  # none on a shortcut
    gated = csext.sparsify(model, exclude=nets.exclude_of("resnet20", "authors"))
    names = [n for n, _ in csext.gated_modules(model)]
    assert "conv" in names and "fc" not in names and not any("shortcut" in n for n in names)
    assert len(gated) == 19 and sum(m.weight.numel() for m in gated) == 432 + 269824 - 512 - 2048
    big = model.blocks[8].conv2.weight  # 64 x 64 x 3 x 3: Xavier std sqrt(2 / (576 + 576)), He's would be sqrt(2 / 576)
    assert big.std().item() == pytest.approx(math.sqrt(2 / 1152), rel=0.03)
    assert torch.equal(model.fc.bias, torch.zeros(10))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # csext's default network is unchanged: BatchNorm on the shortcut, conv0 dense
    plain = nets.build("resnet20", (3, 32, 32), 10)
    assert isinstance(plain.blocks[3].shortcut, nn.Sequential) and nets.exclude_of("resnet20") == ("conv", "fc")


def test_presets_use_the_authors_recipe_and_an_authors_ticket_reloads(tmp_path):
    _, config = cli.parse(["search", "--preset", "resnet20-cifar10", "--out", "x"])
    assert (config.recipe, config.reset, config.rescale, config.mask_init) == ("authors", "official", True, 0.0)
    _, config = cli.parse(["search", "--preset", "vgg16-cifar10", "--no-rescale", "--reset", "paper", "--out", "x"])
    assert (config.recipe, config.reset, config.rescale) == ("authors", "paper", False)
    _, config = cli.parse(["search", "--out", "x"])
    assert (config.recipe, config.reset, config.rescale) == ("csext", "paper", False)
    data = _images(tmp_path / "img.npz")
    config = search.SearchConfig(data=str(data), model="resnet20", recipe="authors", rounds=1, epochs=2,
                                 dense_epochs=1, retrain_epochs=1, batch_size=16)
    results = search.Search(config, tmp_path / "run", progress=False).run()
    model = search.load_network(tmp_path / "run" / "ticket-1.pt")
    assert type(model.blocks[3].shortcut) is nn.Conv2d  # rebuilt as the authors' network
    assert results["config"]["exclude"] == ["fc", "blocks.*.shortcut"]


# --- 5. from_prune_form and a pruned bias ------------------------------------------------------


def test_from_prune_form_takes_a_pruned_bias():
    m = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    prune.l1_unstructured(m[0], "weight", amount=0.5)
    prune.l1_unstructured(m[0], "bias", amount=0.5)
    x = torch.randn(5, 6)
    expected, pruned_bias = m(x), m[0].bias.detach().clone()
    export.from_prune_form(m)
    assert isinstance(m[0], csext.GatedLinear) and m[0].hard
    assert isinstance(m[0].bias, nn.Parameter) and torch.equal(m[0].bias, pruned_bias)
    assert (m[0].bias == 0).sum() == 2
    torch.testing.assert_close(m(x), expected)


# --- 6. requires_grad after to_prune_form; mask_penalty in hard mode ----------------------------


def test_to_prune_form_leaves_requires_grad_as_custom_from_mask_does():
    model = nn.Sequential(nn.Linear(4, 3))
    csext.sparsify(model)
    export.to_prune_form(model)
    torch_own = nn.Linear(4, 3)
    prune.custom_from_mask(torch_own, "weight", torch.ones(3, 4))
    for name in ("weight_orig", "weight"):
        assert getattr(model[0], name).requires_grad is getattr(torch_own, name).requires_grad is True, name


def test_mask_penalty_passes_no_gradient_in_hard_mode():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    csext.sparsify(model, mask_init=0.3)
    csext.set_hard(model)
    value = csext.mask_penalty(model)
    assert value.item() == pytest.approx(18 * torch.sigmoid(torch.tensor(0.3)).item())
    if value.requires_grad:
        value.backward()
    for _, m in csext.gated_modules(model):
        assert m.mask_logits.grad is None or not m.mask_logits.grad.any()
    csext.set_hard(model, False)  # the soft mask's penalty still has its gradient
    csext.mask_penalty(model).backward()
    assert all(m.mask_logits.grad is not None and m.mask_logits.grad.all() for _, m in csext.gated_modules(model))


# --- --target-remaining ------------------------------------------------------------------------


def test_target_never_holds_an_earlier_round_denser_and_shifts_the_last_round_only(tmp_path):
    """The old aims F ** (r / R) held round 1 denser than the search went and shifted every round.
    Now a round going sparser than its path keeps its lam, and the threshold shift, the last
    resort, fires at the last round alone and is reported."""
    data = _vectors(tmp_path / "small.npz", n_train=256)
    common = dict(data=str(data), rounds=2, epochs=6, batch_size=32, penalty=1e-3)
    free = search.Search(search.SearchConfig(**common), tmp_path / "free", progress=False).run()
    target = free["tickets"][1]["remaining"] * 1.02  # where the search goes by itself
    aimed = search.Search(search.SearchConfig(**common, target_remaining=target), tmp_path / "aimed",
                          progress=False).run()
    assert aimed["tickets"][0]["remaining"] == free["tickets"][0]["remaining"]  # round 1 as untargeted
    assert aimed["target"] == {"remaining": target, "threshold_shift": None}
    assert abs(aimed["tickets"][1]["remaining"] - target) <= 0.1 * target
    far = search.Search(search.SearchConfig(**{**common, "epochs": 3}, target_remaining=0.5), tmp_path / "far",
                        progress=False)
    with pytest.warns(search.SearchWarning, match="threshold was shifted"):
        results = far.run()
    shift = results["target"]["threshold_shift"]
    assert shift["round"] == 2 and shift["to"] == pytest.approx(0.5, abs=0.01)
    assert results["tickets"][1]["remaining"] == pytest.approx(0.5, abs=0.01)


# --- the authors' recipe against their formulas ------------------------------------------------


def test_the_authors_recipe_follows_their_formulas(tmp_path):
    """Two search rounds of ResNet-20 on tiny images with recipe authors, against the authors'
    method written out here: mask m = c * sigmoid(T * s), c = 1 / sigmoid(s0); loss
    CE + lam * sum(m) over the gated layers (conv0 and the 3x3 convolutions); T = T_f ** (e /
    (E - 1)) at epoch e; SGD (Nesterov, momentum 0.9), weight decay on every parameter but s, one
    optimizer for both rounds; between rounds s <- min(s, s0); the ticket is s > 0."""
    lam, s0, beta_final, seed = 3e-5, 0.0, 200.0, 3
    data_path = _images(tmp_path / "img.npz")
    config = search.SearchConfig(data=str(data_path), model="resnet20", recipe="authors", rounds=2, epochs=3,
                                 dense_epochs=1, retrain_epochs=1, batch_size=16, penalty=lam, mask_init=s0,
                                 beta_final=beta_final, lr=0.02, lr_milestones=[2], weight_decay=5e-4, seed=seed)
    results = search.Search(config, tmp_path / "run", progress=False).run()
    history = [row for row in search.read_history(tmp_path / "run" / search.HISTORY) if row["phase"] == "search"]

    data = search.load_data(config)
    torch.manual_seed(seed)
    net = nets.build("resnet20", data.input_shape, data.num_classes, recipe="authors")
    gated = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and "shortcut" not in n]
    s = {n: torch.full_like(net.get_submodule(n).weight, s0, requires_grad=True) for n in gated}
    c = 1 / (1 / (1 + math.exp(-s0)))
    optimizer = torch.optim.SGD([{"params": list(net.parameters()), "weight_decay": 5e-4},
                                 {"params": list(s.values()), "weight_decay": 0.0}], lr=0.02, momentum=0.9, nesterov=True)
    expected = []
    for round_, phase in ((1, 1), (2, 3)):  # phases: dense 0, search 1, retrain 2, search 2, ...
        for epoch in range(config.epochs):
            temperature = beta_final ** (epoch / (config.epochs - 1))
            for group in optimizer.param_groups:
                group["lr"] = 0.02 * (0.1 if epoch >= 2 else 1.0)
            net.train()
            order = torch.randperm(len(data.y_train), generator=search.epoch_generator(seed, phase, epoch))
            total = 0.0
            for batch in order.split(config.batch_size):
                x, y = data.x_train[batch], data.y_train[batch]
                masks = {n: c * torch.sigmoid(temperature * s[n]) for n in gated}
                weights = {f"{n}.weight": net.get_submodule(n).weight * masks[n] for n in gated}
                ce = nn.functional.cross_entropy(functional_call(net, weights, (x,)), y)
                penalty = sum(m.sum() for m in masks.values())
                optimizer.zero_grad()
                (ce + lam * penalty).backward()
                optimizer.step()
                total += ce.item() * len(y)
            kept = sum(int((s[n] > 0).sum()) for n in gated)
            expected.append((total / len(data.y_train), kept / sum(v.numel() for v in s.values())))
        with torch.no_grad():
            for v in s.values():
                v.clamp_(max=s0)

    total_weights = sum(v.numel() for v in s.values())
    assert [(row["round"], row["epoch"]) for row in history] == [(r, e) for r in (1, 2) for e in (1, 2, 3)]
    for row, (loss, remaining) in zip(history, expected):
        assert row["loss"] == pytest.approx(loss, rel=1e-4)
        assert abs(row["remaining"] - remaining) * total_weights <= 5  # a logit a few ulps from 0 may differ
    for ticket, r in zip(results["tickets"], (2, 5)):
        assert abs(ticket["remaining"] - expected[r][1]) * total_weights <= 5
    assert 0.0 < expected[-1][1] < expected[2][1] < 1.0  # the penalty pruned some weights and kept others
    # the mask logits after round 2 and its reset: the penalty's gradient lam * c * T * m (1 - m) at every step
    logits = search.load_checked(tmp_path / "run" / search.CHECKPOINT)["search_model"]
    for n in gated:
        torch.testing.assert_close(logits[f"{n}.mask_logits"], s[n].detach(), rtol=1e-4, atol=1e-6)

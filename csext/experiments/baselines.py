"""The methods CS is compared with (`python -m csext compare`), on the search's models, data,
optimizer and budget accounting (csext.experiments.search), each writing a results.json of docs/contract.md section 3.

    imp        iterative magnitude pruning with rewinding (Frankle and Carbin 2019; Frankle et
               al. 2020): train, remove 20% of the remaining weights by global magnitude (the
               output layer 10%), rewind to iteration k, repeat; each round's ticket is retrained
    magnitude  one-shot global magnitude pruning of the trained dense network, then fine-tuning
    snip       SNIP (Lee et al. 2019): keep the top |g * w| at initialisation (one minibatch), train
    l0         L0 regularisation with hard-concrete gates (Louizos, Welling and Kingma 2018);
               the ticket is the deterministic gate's support, retrained from the rewind point
    random     random pruning at the same fractions, retrained from the rewind point
    l1         L1-norm filter pruning (Li et al. 2017): of the trained dense network, remove in
               every gated layer the same share of output units (filters, rows), those whose
               weights have the smallest L1 norm, then fine-tune; whole units go, so that the
               ticket shrinks (csext.export.shrink) into a smaller dense network

A mask is {gated layer name: bool tensor of its mask logits' shape} (l1's: one entry per output unit). Every ticket is trained through csext's hard-masked
layers with its pruned weights set to zero (csext.experiments.search.prepare_ticket), so they stay exactly
zero under momentum and weight decay.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..model import gated_modules, gated_weight_name
from ..schedule import capture
from .files import write_atomic
from .search import (HISTORY, HISTORY_COLUMNS, TICKET_NETWORK, TRAINING_PLOT, SearchConfig, accuracies, build_gated,
                     build_plain, default_exclude, epoch_bar, epoch_generator, history_csv, make_optimizer,
                     plot_history, prepare_ticket, save_network, train_epochs, training_module)

METHODS = ("cs", "imp", "magnitude", "snip", "l0", "random", "l1")
STRUCTURED = ("l1",)  # baselines whose tickets remove whole units

# Louizos et al. 2018: the stretch interval (gamma, zeta) and the temperature of the gates
L0_GAMMA, L0_ZETA, L0_BETA = -0.1, 1.1, 2.0 / 3.0
L0_GATE_LR = 1e-2  # Adam's learning rate for log_alpha


# --- masks ------------------------------------------------------------------------------------


def top_mask(scores: dict[str, torch.Tensor], keep: int) -> dict[str, torch.Tensor]:
    """Exactly `keep` entries True over all layers: those of the largest scores (ties by index)."""
    total = sum(s.numel() for s in scores.values())
    if not 0 <= keep <= total:
        raise ValueError(f"keep must lie in 0..{total}, got {keep}")
    flat = torch.cat([s.detach().flatten().float().cpu() for s in scores.values()])
    chosen = torch.zeros(total, dtype=torch.bool)
    chosen[torch.topk(flat, keep, sorted=False).indices] = True
    masks, start = {}, 0
    for name, s in scores.items():
        masks[name] = chosen[start:start + s.numel()].view(s.shape)
        start += s.numel()
    return masks


def _keep_count(fraction: float, total: int) -> int:
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    return max(1, round(fraction * total))


def magnitude_mask(model: nn.Module, fraction: float) -> dict[str, torch.Tensor]:
    """Keep the `fraction` of gated weights with the largest |w|, ranked over all layers."""
    scores = {name: m.weight.abs() for name, m in gated_modules(model)}
    return top_mask(scores, _keep_count(fraction, sum(s.numel() for s in scores.values())))


def random_mask(model: nn.Module, fraction: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Keep exactly the `fraction` of gated weights, chosen uniformly over all layers."""
    scores = {name: torch.rand(m.weight.shape, generator=generator) for name, m in gated_modules(model)}
    return top_mask(scores, _keep_count(fraction, sum(s.numel() for s in scores.values())))


def snip_mask(model: nn.Module, x: torch.Tensor, y: torch.Tensor, fraction: float) -> dict[str, torch.Tensor]:
    """SNIP: keep the `fraction` of gated weights with the largest |dL/dw * w| on one minibatch,
    at the model's current (initial) weights."""
    layers = gated_modules(model)
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    scores = {name: (m.weight.grad * m.weight).abs() for name, m in layers}
    model.zero_grad(set_to_none=True)
    return top_mask(scores, _keep_count(fraction, sum(s.numel() for s in scores.values())))


def l1_filter_mask(model: nn.Module, fraction: float) -> dict[str, torch.Tensor]:
    """Li et al. 2017 on a model gated by channel: in every gated layer keep the same share of
    output units, those whose weights have the largest L1 norm (ties by index), the share chosen
    so that the fraction of gated weights kept is the nearest to `fraction`."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    layers = gated_modules(model)
    if any(m.weights_per_logit() == 1 and m.weight.dim() > 1 for _, m in layers):
        raise ValueError("l1_filter_mask needs a model gated with granularity='channel'")
    units = [m.mask_logits.numel() for _, m in layers]
    per_unit = [m.weights_per_logit() for _, m in layers]
    total = sum(u * w for u, w in zip(units, per_unit))

    def kept_units(share):
        return [max(1, round(share * u)) for u in units]

    # every share at which some layer's count of units changes: the nearest of those is the nearest of all
    shares = sorted({k / u for u in units for k in range(1, u + 1)})
    best = min(shares, key=lambda share: abs(sum(k * w for k, w in zip(kept_units(share), per_unit)) / total - fraction))
    masks = {}
    for (name, m), keep in zip(layers, kept_units(best)):
        norms = m.weight.detach().abs().flatten(1).sum(1).float().cpu()
        order = torch.sort(-norms, stable=True).indices  # largest first, ties by index
        kept = torch.zeros(norms.numel(), dtype=torch.bool)
        kept[order[:keep]] = True
        masks[name] = kept.view(m.mask_logits.shape)
    return masks


def imp_step(model: nn.Module, mask: dict[str, torch.Tensor], rate: float = 0.2, output_rate: float = 0.1,
             output_layer: str | None = None) -> dict[str, torch.Tensor]:
    """One IMP round: of the weights `mask` keeps, remove the `rate` with the smallest |w| ranked
    over all layers but `output_layer`, and the `output_rate` smallest within it."""
    layers = dict(gated_modules(model))
    groups = [[n for n in layers if n != output_layer], [output_layer] if output_layer in layers else []]
    new = {}
    for names, prune_rate in zip(groups, (rate, output_rate)):
        if not names:
            continue
        # pruned weights score -inf: they are never chosen again
        scores = {n: torch.where(mask[n].to(layers[n].weight.device), layers[n].weight.abs(),
                                 torch.full_like(layers[n].weight, -math.inf)) for n in names}
        kept = sum(int(mask[n].sum()) for n in names)
        new.update(top_mask(scores, kept - round(prune_rate * kept)))
    return new


# --- L0 (hard-concrete gates) --------------------------------------------------------------------


class HardConcreteGate(nn.Module):
    """A parametrization w -> w * z with z in [0, 1] a hard-concrete gate per weight: sampled
    in training, the deterministic min(1, max(0, sigmoid(log_alpha) * (zeta - gamma) + gamma))
    in eval mode. log_alpha starts at N(log(1 - p) - log(p), 0.01) for a drop rate p."""

    def __init__(self, shape, drop_rate: float = 0.5, generator: torch.Generator | None = None):
        super().__init__()
        mean = math.log(1 - drop_rate) - math.log(drop_rate)
        self.log_alpha = nn.Parameter(mean + 0.01 * torch.randn(shape, generator=generator))

    def gate(self) -> torch.Tensor:
        if self.training:
            u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / L0_BETA)
        else:
            s = torch.sigmoid(self.log_alpha)
        return torch.clamp(s * (L0_ZETA - L0_GAMMA) + L0_GAMMA, 0.0, 1.0)

    @torch.no_grad()
    def support(self) -> torch.Tensor:
        """Where the deterministic (eval-mode) gate is above zero: the weights L0 keeps."""
        return torch.sigmoid(self.log_alpha) * (L0_ZETA - L0_GAMMA) + L0_GAMMA > 0

    def expected_l0(self) -> torch.Tensor:
        """sum P(z != 0) = sum sigmoid(log_alpha - beta * log(-gamma / zeta))."""
        return torch.sigmoid(self.log_alpha - L0_BETA * math.log(-L0_GAMMA / L0_ZETA)).sum()

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep log_alpha in [log 1e-2, log 1e2], as the paper's code does after each step."""
        self.log_alpha.clamp_(math.log(1e-2), math.log(1e2))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.gate()


def add_l0_gates(model: nn.Module, names, generator: torch.Generator | None = None) -> dict[str, HardConcreteGate]:
    """Register a HardConcreteGate on the weight of each named layer of `model` (an attention's
    in_proj_weight, the weight its mask logits gate when csext gates it)."""
    modules = dict(model.named_modules())
    gates = {}
    for name in names:
        weight = gated_weight_name(modules[name])
        shape = getattr(modules[name], weight).shape
        parametrize.register_parametrization(modules[name], weight, HardConcreteGate(shape, generator=generator))
        gates[name] = getattr(modules[name].parametrizations, weight)[0]
    return gates


# --- runs --------------------------------------------------------------------------------------


class MethodRun:
    """One baseline on the search's setup; `run()` returns its results (docs/contract.md section 3). With
    `progress`, a tqdm bar per training phase; with `out`, each retrained ticket saved there as
    ticket-R.pt (search.load_network reads it), and at the end the run's history.csv and
    training.png, as a search writes its own: one row per epoch, phase "dense" (the dense
    training of imp and magnitude), "search" (l0's gates) or "retrain" (ticket R, round R)."""

    def __init__(self, method: str, config: SearchConfig, data, fractions=(0.2, 0.1, 0.05), imp_rounds: int = 10,
                 l0_penalty: float = 0.1, progress: bool = False, out: str | os.PathLike | None = None):
        if method not in METHODS or method == "cs":
            raise ValueError(f"method must be one of {METHODS[1:]}, got {method!r}")
        # l1 prunes whole units (a mask logit per unit); the others single weights
        config = dataclasses.replace(config, granularity="channel" if method in STRUCTURED else "weight")
        self.method, self.config, self.data, self.progress = method, config, data, progress
        self.out = None if out is None else Path(out)
        self.fractions, self.imp_rounds, self.l0_penalty = list(fractions), imp_rounds, l0_penalty
        self.ticket_count = {"imp": imp_rounds, "l0": 1}.get(method, len(self.fractions))  # for the bars
        self.exclude = default_exclude(config)
        self.phase = 1000  # generator streams apart from the search's phases
        self.epochs_spent = 0
        self.history: list[dict] = []  # a dict of HISTORY_COLUMNS per epoch

    def _train(self, model, epochs: int, desc: str, phase: str, round_: int, remaining, rewind: dict | None = None,
               optimizer=None, **hooks) -> None:
        """Train `model` for `epochs` (`desc` names the phase on its progress bar), a history row
        per epoch (`phase`, `round_`, and remaining(), the fraction of weights kept); with `rewind`,
        keep the rewind point (after k iterations, or the end if training is shorter) in rewind["state"]."""
        def on_step(step):
            if rewind is not None and "state" not in rewind and step == self.config.rewind_iter:
                rewind["state"] = capture(model)

        def on_epoch(epoch, lr, stats, seconds):
            row = {"phase": phase, "round": round_, "epoch": epoch + 1, "lr": lr, **stats,
                   **accuracies(model, self.data, self.config), "remaining": remaining(), "seconds": round(seconds, 3)}
            self.history.append({column: row.get(column) for column in HISTORY_COLUMNS})

        self.phase += 1
        train_epochs(training_module(model, self.config), self.data, optimizer or make_optimizer(model, self.config),
                     self.config, epochs, self.phase, on_step=on_step, on_epoch=on_epoch,
                     bar=epoch_bar(f"{self.method}: {desc}", epochs, self.progress), **hooks)
        self.epochs_spent += epochs
        if rewind is not None:
            rewind.setdefault("state", capture(model))

    def _open_gated(self) -> nn.Module:
        """The gated model with every gate open and fixed: the plain network, masks at hand."""
        model = build_gated(self.config, self.data, self.exclude)
        for _, m in gated_modules(model):
            m.hard = True
            m.mask_logits.data.fill_(1.0)
            m.mask_logits.requires_grad_(False)
        return model

    def _ticket(self, mask, rewind, round_: int, started: float) -> tuple[dict, nn.Module]:
        """Train the ticket `mask` from the weights `rewind`; its results entry and the model."""
        model = build_gated(self.config, self.data, self.exclude)
        prepare_ticket(model, mask, rewind)
        layers = dict(gated_modules(model))  # a unit's entry counts once per weight it keeps
        kept = sum(int(v.sum()) * layers[n].weights_per_logit() for n, v in mask.items())
        total = sum(layers[n].weight.numel() for n in mask)
        self._train(model, self.config.retrain_budget, f"ticket {round_} of {self.ticket_count}", "retrain", round_,
                    lambda: kept / total)
        scores = accuracies(model, self.data, self.config)
        entry = {"round": round_, "remaining": kept / total, **scores,
                 "epochs_spent": self.epochs_spent, "seconds": round(time.perf_counter() - started, 3),
                 "per_layer": {n: int(v.sum()) / v.numel() for n, v in mask.items()}}  # of units, for l1
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            save_network(model, self.out / TICKET_NETWORK.format(round=round_), self.config, self.data, round_,
                         kept / total, scores)
        return entry, model

    def run(self) -> dict:
        started = time.perf_counter()
        tickets = getattr(self, f"_run_{self.method}")(started)
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            write_atomic(self.out / HISTORY, history_csv(self.history).encode())
            plot_history(self.history, self.out / TRAINING_PLOT,
                         f"{self.method}: {self.config.model} on {self.config.data}")
        return {"method": self.method, "tickets": tickets}

    def _run_imp(self, started) -> list[dict]:
        rewind = {}
        model = self._open_gated()
        self._train(model, self.config.dense_budget, "dense", "dense", 0, lambda: 1.0, rewind)
        output_layer = gated_modules(model)[-1][0]
        mask = {n: torch.ones_like(m.weight, dtype=torch.bool).cpu() for n, m in gated_modules(model)}
        tickets = []
        for r in range(1, self.imp_rounds + 1):
            mask = imp_step(model, mask, output_layer=output_layer)
            # retraining ticket r is IMP's next round of training: its weights rank the next prune
            entry, model = self._ticket(mask, rewind["state"], r, started)
            tickets.append(entry)
        return tickets

    def _run_magnitude(self, started) -> list[dict]:
        dense = self._open_gated()
        self._train(dense, self.config.dense_budget, "dense", "dense", 0, lambda: 1.0)
        trained = capture(dense)
        tickets = []
        for i, fraction in enumerate(self.fractions, start=1):
            # fine-tuning from the trained weights (not a rewind): one-shot pruning, then training
            tickets.append(self._ticket(magnitude_mask(dense, fraction), trained, i, started)[0])
        return tickets

    def _run_l1(self, started) -> list[dict]:
        dense = self._open_gated()
        self._train(dense, self.config.dense_budget, "dense", "dense", 0, lambda: 1.0)
        trained = capture(dense)
        # fine-tuning from the trained weights, the budget of magnitude's
        return [self._ticket(l1_filter_mask(dense, f), trained, i, started)[0] for i, f in enumerate(self.fractions, start=1)]

    def _run_snip(self, started) -> list[dict]:
        model = self._open_gated()
        initial = capture(model)
        generator = epoch_generator(self.config.seed, 999, 0)
        batch = torch.randperm(len(self.data.y_train), generator=generator)[: self.config.batch_size]
        device = torch.device(self.config.device)
        x, y = self.data.x_train[batch].to(device), self.data.y_train[batch].to(device)
        return [self._ticket(snip_mask(model, x, y, f), initial, i, started)[0] for i, f in enumerate(self.fractions, start=1)]

    def _run_random(self, started) -> list[dict]:
        model = build_gated(self.config, self.data, self.exclude)
        initial = capture(model)
        generator = epoch_generator(self.config.seed, 998, 0)
        return [self._ticket(random_mask(model, f, generator), initial, i, started)[0]
                for i, f in enumerate(self.fractions, start=1)]

    def _run_l0(self, started) -> list[dict]:
        plain = build_plain(self.config, self.data)
        names = [n for n, _ in gated_modules(build_gated(self.config, self.data, self.exclude))]
        initial = {k: v.detach().clone() for k, v in plain.state_dict().items()}
        gates = add_l0_gates(plain, names, generator=epoch_generator(self.config.seed, 997, 0))
        n_train = len(self.data.y_train)
        weights = torch.optim.SGD([p for n, p in plain.named_parameters() if "log_alpha" not in n],
                                  lr=self.config.lr, momentum=self.config.momentum,
                                  nesterov=self.config.momentum > 0, weight_decay=self.config.weight_decay)
        # the gates learn with Adam, as in the paper: their gradients are far smaller than the weights'
        gate_optimizer = torch.optim.Adam([g.log_alpha for g in gates.values()], lr=L0_GATE_LR)
        penalty = self.l0_penalty

        def l0_loss():  # lam / N * expected L0, the paper's scaling by the training-set size
            return penalty / n_train * sum(g.expected_l0() for g in gates.values())

        def after_step():
            for g in gates.values():
                g.clamp_()

        total = sum(g.log_alpha.numel() for g in gates.values())

        def remaining():
            return sum(int(g.support().sum()) for g in gates.values()) / total

        # the schedule sets the weights' learning rate; Adam keeps its own
        self._train(plain, self.config.epochs, "gates", "search", 1, remaining, optimizer=[weights, gate_optimizer],
                    extra_loss=l0_loss, after_step=after_step)
        mask = {n: gates[n].support().cpu() for n in names}
        return [self._ticket(mask, initial, 1, started)[0]]

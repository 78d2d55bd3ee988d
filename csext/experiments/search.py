"""The CS ticket search of docs/contract.md section 1 (Algorithm 1 of the paper), resumable epoch by epoch.

A run is a list of phases, trained in order:
    dense          the plain network from the seed's initialisation (the baseline accuracy)
    search r       round r: weights and mask logits together, beta from 1 to beta_final; the
                   round's ticket is H(s); then s <- min(beta_final * s, s0)
    retrain r      the ticket of round r from the rewind point w_k, hard mask fixed, weights only
After every epoch the whole state (models, optimizers, rewind point, results so far) is written
to DIR/checkpoint.pt atomically; `resume` continues from it and, every random draw being seeded
by (seed, phase, epoch), ends with the results an uninterrupted run gives. Each epoch also adds a
row to DIR/history.csv (HISTORY_COLUMNS), rewritten whole from the checkpoint's copy, and the end
draws it (DIR/training.png). The trained dense network and each retrained ticket are saved as
plain networks, DIR/dense.pt and DIR/ticket-R.pt, which `load_network` rebuilds.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import __version__, backends
from ..model import finalize, gated_modules, mask_penalty, set_beta, set_hard, set_penalty, sparsify, sparsity_report
from ..schedule import RESETS, beta_at, capture, param_groups, reset_mask_logits, restore
from . import data as datasets
from . import distributed, nets
from .files import FileError, check_output_folder, load_checked, save_checked, write_atomic
from .plots import log_percent_scale, pyplot, remaining_axis, save_png

# Mixed precision of training and evaluation: forward and loss under torch.autocast in bfloat16
# ("bf16") or float16 ("fp16"); weights and mask logits stay float32. fp16 scales the loss
# (torch.amp.GradScaler), which the layers' fused penalty would not follow (README, "Use"): there
# the layers' penalty is 0 and lam * mask_penalty is added to the loss instead.
AMP = ("off", "bf16", "fp16")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CHECKPOINT = "checkpoint.pt"
RESULTS = "results.json"
PLOT = "accuracy_vs_remaining.png"
HISTORY = "history.csv"
DENSE_NETWORK = "dense.pt"
TICKET_NETWORK = "ticket-{round}.pt"
TRAINING_PLOT = "training.png"
# One row per epoch of every phase. lr, loss, train_acc: of the epoch's training; test_acc,
# val_acc (with --val-fraction) and remaining (fraction of gated weights with s > 0; 1 for the
# dense network): after it; beta and penalty (lam): at its end, search rounds only; seconds: its
# training, evaluation not counted.
HISTORY_COLUMNS = ("phase", "round", "epoch", "lr", "beta", "penalty", "loss", "train_acc", "test_acc",
                   "val_acc", "remaining", "seconds")


class ConfigError(ValueError):
    """A setting or a file the run cannot use; the message names it."""


class SearchWarning(UserWarning):
    """Something in a run's results that is worth a look before using them."""


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite; the run stops there rather than go on to
    results that mean nothing."""


@dataclass
class SearchConfig:
    """Settings of a run. The defaults suit the default data and model (mnist1d, mlp: tickets
    within a point of dense accuracy at under 10% of the weights, see bench/README.md); the
    paper's CIFAR setups are the presets of csext/cli.py."""

    data: str = "mnist1d"
    model: str = "mlp"
    rounds: int = 3
    epochs: int = 30  # T, per search round
    mask_init: float = 0.0  # s0
    penalty: float = 2e-5  # lam
    beta_final: float = 200.0
    rewind_iter: int = 0  # k: iterations of round 1 before the rewind point is taken
    seed: int = 0
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 32
    lr_milestones: list[int] | None = None  # epochs at which lr is divided by 10; None: 1/2 and 3/4 of each phase
    dense_epochs: int | None = None  # default: epochs
    retrain_epochs: int | None = None  # default: dense_epochs (the budget of a dense run)
    beta_per_step: bool = False
    # "authors": as github lolemacs/continuous-sparsification (docs/usage.md, "The authors' recipe"):
    # their networks' initialisation and gated layers, weight decay on every parameter but the mask
    # logits, one optimizer kept across the search rounds; reset and rescale then default to theirs
    recipe: str = "csext"
    reset: str | None = None  # None: "official" with recipe authors, else "paper"
    # mask c * sigmoid(beta * s) and penalty lam * c * sum(sigmoid(beta * s)), c = 1 / sigmoid(s0),
    # as the authors' code; None: on with recipe authors, else off
    rescale: bool | None = None
    exclude: list[str] | None = None  # layers left dense; default: the recipe's (csext.experiments.nets)
    target_remaining: float | None = None
    granularity: str = "weight"  # one mask logit per weight, or per output unit ("channel")
    data_dir: str | None = None
    download: bool = False  # fetch missing cifar10 / mnist files into data_dir
    device: str = "cpu"
    amp: str = "off"  # one of AMP
    val_fraction: float = 0.0  # of the training set, held out to report val_acc (data.with_validation)
    compile: bool = False  # train under torch.compile (training_module); evaluation stays eager

    def __post_init__(self):
        if self.reset is None:
            self.reset = "official" if self.recipe == "authors" else "paper"
        if self.rescale is None:
            self.rescale = self.recipe == "authors"

    @property
    def scale(self) -> float:
        """c = 1 / sigmoid(s0) with --rescale (the mask's and the penalty's factor), else 1."""
        return 1.0 + math.exp(-self.mask_init) if self.rescale else 1.0

    def check(self) -> None:
        for name in ("rounds", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("dense_epochs", "retrain_epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.epochs < 2:
            raise ConfigError(f"--epochs must be >= 2 (beta rises from 1 to --beta-final over the round), got {self.epochs}")
        if self.rewind_iter < 0:
            raise ConfigError(f"--rewind-iter must be >= 0, got {self.rewind_iter}")
        if not (1.0 <= self.beta_final < math.inf):
            raise ConfigError(f"--beta-final must be a finite number >= 1, got {self.beta_final}")
        if not (0.0 <= self.penalty < math.inf):
            raise ConfigError(f"--penalty must be a finite number >= 0, got {self.penalty}")
        if not math.isfinite(self.mask_init):
            raise ConfigError(f"--mask-init must be a finite number, got {self.mask_init}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"--momentum must lie in [0, 1), got {self.momentum}")
        if not 0.0 <= self.weight_decay < math.inf:
            raise ConfigError(f"--weight-decay must be a finite number >= 0, got {self.weight_decay}")
        if self.lr_milestones is not None and any(type(m) is not int or m < 1 for m in self.lr_milestones):
            raise ConfigError(f"--lr-milestones must be epochs >= 1, got {self.lr_milestones}")
        if self.recipe not in nets.RECIPES:
            raise ConfigError(f"--recipe must be one of {', '.join(nets.RECIPES)}, got {self.recipe!r}")
        if self.reset not in RESETS:
            raise ConfigError(f"--reset must be one of {RESETS}, got {self.reset!r}")
        if self.model not in nets.NAMES and not nets.is_factory_path(self.model):
            raise ConfigError(f"--model must be one of {', '.join(nets.NAMES)} or MODULE:FACTORY, got {self.model!r}")
        if nets.is_factory_path(self.model):
            try:
                nets.factory(self.model)
            except ValueError as error:
                raise ConfigError(f"--model: {error}") from None
        if self.granularity not in ("weight", "channel"):
            raise ConfigError(f"--granularity must be weight or channel, got {self.granularity!r}")
        if self.target_remaining is not None and not 0.0 < self.target_remaining < 1.0:
            raise ConfigError(f"--target-remaining must lie strictly between 0 and 1, got {self.target_remaining}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must lie in [0, 1), got {self.val_fraction}")
        if self.amp not in AMP:
            raise ConfigError(f"--amp must be one of {', '.join(AMP)}, got {self.amp!r}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is available here")

    @property
    def dense_budget(self) -> int:
        return self.dense_epochs or self.epochs

    @property
    def retrain_budget(self) -> int:
        return self.retrain_epochs or self.dense_budget

    def phases(self) -> list[tuple[str, int, int]]:
        """(kind, round, epochs) in the order they run."""
        out = [("dense", 0, self.dense_budget)]
        for r in range(1, self.rounds + 1):
            out += [("search", r, self.epochs), ("retrain", r, self.retrain_budget)]
        return out


SETTING_DEFAULTS = dataclasses.asdict(SearchConfig())  # what a checkpoint made before a setting existed ran with


def changed_settings(saved: dict, now: dict) -> list[str]:
    """The settings in which a saved run (a checkpoint's, a results.json's) differs from `now`; one
    the run predates counts as its default, and where it runs and how its files arrived, not at all."""
    saved = {**SETTING_DEFAULTS, **saved}
    return sorted(k for k in now.keys() | saved.keys()
                  if k not in ("device", "download", "compile") and saved.get(k) != now.get(k))


# --- training --------------------------------------------------------------------------------


def learning_rate(config: SearchConfig, epoch: int, epochs: int) -> float:
    """lr divided by 10 at each milestone: the given epochs, or 1/2 and 3/4 of the phase's `epochs`."""
    milestones = config.lr_milestones if config.lr_milestones is not None else (epochs // 2, (3 * epochs) // 4)
    return config.lr * 0.1 ** sum(epoch >= m for m in milestones)


def make_optimizer(model: nn.Module, config: SearchConfig) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum; mask logits (and, but with recipe authors, biases and norms)
    free of weight decay."""
    groups = param_groups(model, config.weight_decay, decay_all=config.recipe == "authors")
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0)


def autocast(config: SearchConfig):
    """The context of every forward of a run: autocast in --amp's dtype, or nothing (--amp off)."""
    return torch.autocast(torch.device(config.device).type, dtype=AMP_DTYPES.get(config.amp, torch.bfloat16),
                          enabled=config.amp in AMP_DTYPES)


def grad_scaler(config: SearchConfig, state: dict | None = None) -> torch.amp.GradScaler:
    """The loss scaler of a training phase: enabled with --amp fp16 (a pass-through otherwise),
    resumed from `state` (scaler_state of the same phase) where given."""
    scaler = torch.amp.GradScaler(torch.device(config.device).type, enabled=config.amp == "fp16")
    if state is not None:
        scaler.load_state_dict(state)
    return scaler


def scaler_state(scaler: torch.amp.GradScaler) -> dict | None:
    """What a checkpoint keeps of `scaler`: its scale and growth counter, None if it is disabled."""
    return scaler.state_dict() if scaler.is_enabled() else None


def apply_penalty(model: nn.Module, penalty: float, config: SearchConfig):
    """Apply lam = `penalty` to `model`'s gated layers for the next epoch: fused into their backward,
    or, where the loss is scaled (--amp fp16), as lam * mask_penalty(model) in the loss. With
    --rescale the layers get c * lam: the authors' penalty lam * sum(c * sigmoid(beta * s)) sums
    their mask, c times csext's. Returns what train_epoch takes as extra_loss (None when fused)."""
    penalty = penalty * config.scale
    if config.amp != "fp16":
        set_penalty(model, penalty)
        return None
    set_penalty(model, 0.0)
    return lambda: penalty * mask_penalty(model)


def training_module(model: nn.Module, config: SearchConfig) -> nn.Module:
    """What train_epoch calls to train `model`: it in DistributedDataParallel under torchrun, and
    under torch.compile with --compile. It shares the parameters, so checkpoints, masks and
    evaluation use `model` itself."""
    # compiled inside DDP: torch.compile(DDP(m)) leaves DDP's forward to compile m's submodules one
    # frame each (an nn.Sequential's forward is not compiled), and soon hits the recompile limit
    return distributed.wrap(torch.compile(model) if config.compile else model)


def epoch_generator(seed: int, phase: int, epoch: int) -> torch.Generator:
    """The stream of one epoch's shuffles and augmentations: the same on a resumed run."""
    return torch.Generator().manual_seed(((seed * 1_000_003) + phase) * 10_007 + epoch)


def train_epoch(model, data: datasets.Dataset, optimizer, config: SearchConfig, generator, on_step=None,
                extra_loss=None, after_step=None, scaler: torch.amp.GradScaler | None = None) -> dict:
    """One epoch over the training set in the generator's order. Under torchrun each rank takes
    its share of every batch (a last batch smaller than the world is dropped); `model` is then
    the DistributedDataParallel wrapper, which averages the gradients. `optimizer` may be a list
    (all step together); `extra_loss()` is added to each batch's objective (the loss reported
    is the cross-entropy alone); `after_step()` runs after each step; `scaler` (grad_scaler)
    scales the objective, and skips the steps whose gradients overflow."""
    optimizers = optimizer if isinstance(optimizer, (list, tuple)) else [optimizer]
    scaler = scaler if scaler is not None else grad_scaler(config)
    device = torch.device(config.device)
    check_ranks = distributed.active() and os.environ.get("CSEXT_CHECK_RANKS") == "1"
    model.train()
    order = torch.randperm(len(data.y_train), generator=generator)
    total_loss, correct, seen = 0.0, 0, 0
    for step, batch in enumerate(order.split(config.batch_size)):
        if on_step is not None:
            on_step(step)
        if len(batch) < distributed.world_size():
            continue
        batch = distributed.shard(batch)
        x = data.x_train[batch]
        if data.augment:
            x = datasets.augment_batch(x, generator)
        x, y = x.to(device, non_blocking=True), data.y_train[batch].to(device, non_blocking=True)
        with autocast(config):
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y)
        objective = loss if extra_loss is None else loss + extra_loss()
        for o in optimizers:
            o.zero_grad(set_to_none=True)
        scaler.scale(objective).backward()
        for o in optimizers:
            scaler.step(o)
        scaler.update()
        if after_step is not None:
            after_step()
        if check_ranks:  # CSEXT_CHECK_RANKS=1: verify after every step that the ranks agree
            distributed.assert_same_on_all_ranks(model)
        value = loss.item()
        if not math.isfinite(value):
            raise DivergedError(f"the training loss is {value} at step {step} of the epoch: lower --lr "
                                f"(it is {config.lr:g}) or check the data")
        total_loss += value * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
    return {"loss": total_loss / seen, "train_acc": correct / seen}


def train_epochs(model, data: datasets.Dataset, optimizer, config: SearchConfig, epochs: int, phase: int,
                 on_step=None, bar=None, on_epoch=None, **hooks) -> None:
    """`epochs` of train_epoch under the lr schedule (set on the first optimizer), epoch e drawn
    from (seed, phase, e); on_step gets the number of steps since the first epoch; on_epoch(e, lr,
    stats, seconds) runs after each epoch, with train_epoch's stats and its training time; `bar`
    (an epoch_bar) advances an epoch at a time."""
    first = optimizer[0] if isinstance(optimizer, (list, tuple)) else optimizer
    steps_per_epoch = math.ceil(len(data.y_train) / config.batch_size)
    scaler = grad_scaler(config)  # one loss scale across the epochs
    for epoch in range(epochs):
        lr = learning_rate(config, epoch, epochs)
        for group in first.param_groups:
            group["lr"] = lr
        step_hook = None if on_step is None else (lambda step, epoch=epoch: on_step(epoch * steps_per_epoch + step))
        started = time.perf_counter()
        stats = train_epoch(model, data, optimizer, config, epoch_generator(config.seed, phase, epoch), step_hook,
                            scaler=scaler, **hooks)
        if on_epoch is not None:
            on_epoch(epoch, lr, stats, time.perf_counter() - started)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['train_acc']:.3f}")
    if bar is not None:
        bar.close()


def epoch_bar(desc: str, epochs: int, enabled: bool = True, iterable=None, done: int = 0):
    """A tqdm progress bar over `epochs` epochs (of which `done` are done, `iterable` the ones
    left), on the first rank and when `enabled`; otherwise None."""
    if not enabled or not distributed.is_main():
        return None
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, unit="epoch", initial=done, total=epochs, leave=True)


@torch.no_grad()
def evaluate(model: nn.Module, data: datasets.Dataset, config: SearchConfig, split: str = "test") -> float:
    """Accuracy of `model` on the test set, or (split="val") on the held-out validation set."""
    x_all, y_all = (data.x_val, data.y_val) if split == "val" else (data.x_test, data.y_test)
    device = torch.device(config.device)
    model.eval()
    correct = 0
    for start in range(0, len(y_all), 1024):
        x = x_all[start:start + 1024].to(device)
        with autocast(config):
            logits = model(x)
        correct += (logits.argmax(1).cpu() == y_all[start:start + 1024]).sum().item()
    return correct / len(y_all)


def accuracies(model: nn.Module, data: datasets.Dataset, config: SearchConfig) -> dict:
    """{"test_acc"} of `model`, and "val_acc" where the data holds a validation set."""
    found = {"test_acc": evaluate(model, data, config)}
    if data.y_val is not None:
        found["val_acc"] = evaluate(model, data, config, "val")
    return found


def ticket_summary(ticket: dict) -> dict:
    """A results.json ticket as the compare and sweep summaries keep it (per_layer and seconds left out)."""
    return {k: ticket[k] for k in ("round", "remaining", "test_acc", "val_acc", "epochs_spent") if k in ticket}


def sparsest_within_a_point(tickets: list[dict], dense: dict, accuracy: str = "test_acc") -> dict | None:
    """The ticket with the fewest weights among those within 1 point of `dense` in `accuracy`
    ("test_acc", or "val_acc" for a choice that leaves the test set out), or None."""
    close = [t for t in tickets if t[accuracy] >= dense[accuracy] - 0.01]
    return min(close, key=lambda t: t["remaining"]) if close else None


def load_data(config: SearchConfig) -> datasets.Dataset:
    """The data of `config`, with its validation split where --val-fraction asks for one."""
    data = datasets.load(config.data, config.data_dir, config.download)
    return datasets.with_validation(data, config.val_fraction) if config.val_fraction else data


def build_plain(config: SearchConfig, data: datasets.Dataset) -> nn.Module:
    """The plain network of `config` for `data`, initialised from the seed (on config.device)."""
    torch.manual_seed(config.seed)
    try:
        return nets.build(config.model, data.input_shape, data.num_classes, config.recipe).to(config.device)
    except ValueError as error:
        raise ConfigError(f"--model {config.model} with --data {config.data}: {error}") from None


def build_gated(config: SearchConfig, data: datasets.Dataset, exclude) -> nn.Module:
    """build_plain, then every Linear / Conv2d not in `exclude` gated with s = s0."""
    model = build_plain(config, data)
    try:
        gated = sparsify(model, mask_init=config.mask_init, exclude=exclude, granularity=config.granularity)
    except ValueError as error:
        raise ConfigError(f"--exclude: {error}") from None
    if config.rescale:
        for m in gated:
            m.mask_scale = config.scale
    return model


def default_exclude(config: SearchConfig) -> list[str]:
    """--exclude, else the dense layers of the model and recipe; with channel granularity the
    classifier too (a gated-off output unit would remove a class)."""
    if config.exclude is not None:
        return list(config.exclude)
    exclude = list(nets.exclude_of(config.model, config.recipe))
    classifier = nets.CLASSIFIER.get(config.model)
    if config.granularity == "channel" and classifier is not None and classifier not in exclude:
        exclude.append(classifier)
    return exclude


# --- the run -----------------------------------------------------------------------------------


class Search:
    """One ticket search writing into `out`. `run()` does (or finishes) it and returns results."""

    def __init__(self, config: SearchConfig, out: str | os.PathLike, resume: bool = False, progress: bool = True):
        config.check()
        if not str(out).strip():  # Path("") is the working directory
            raise ConfigError(f"--out must name a folder, got {str(out)!r}")
        self.config, self.out, self.progress = config, Path(out), progress
        self.data = load_data(config)
        self.exclude = default_exclude(config)
        self._gated()  # a model that does not fit the data fails here, before anything is written
        checkpoint = self.out / CHECKPOINT
        if resume:
            self.state = self._load_checkpoint(checkpoint)
        else:
            if checkpoint.exists() or (self.out / RESULTS).exists():
                raise ConfigError(f"--out {self.out} already holds a run: pass --resume to continue it, or another --out")
            self.state = self._fresh_state()
        try:
            check_output_folder(self.out)
        except FileError as error:
            raise ConfigError(str(error)) from None

    # building the networks, always the same way from the seed

    def _plain(self) -> nn.Module:
        return build_plain(self.config, self.data)

    def _gated(self) -> nn.Module:
        return build_gated(self.config, self.data, self.exclude)

    def _fresh_state(self) -> dict:
        return {
            "config": dataclasses.asdict(self.config),
            "phase": 0,  # index into config.phases()
            "epoch": 0,  # epochs done in that phase
            "penalty": self.config.penalty,  # lam, steered with --target-remaining
            "penalty_scale": self.config.scale,  # c with --rescale: the layers get c * lam
            "threshold_shift": None,  # --target-remaining's last resort, where it fired: {"round", "from", "to"}
            "rewind": None,  # capture() of round 1 after rewind_iter iterations
            "tickets": [],  # per round: {"round", "mask": {layer: bool tensor}, ...}
            "search_model": None,
            "search_optimizer": None,
            "trainee": None,  # the model of the dense or retrain phase in progress
            "trainee_optimizer": None,
            "scaler": None,  # scaler_state of the phase in progress (--amp fp16)
            "results": {"dense": None, "tickets": []},
            "seconds": 0.0,  # spent in the phase in progress
            "epochs_spent": 0,
            "history": [],  # a dict of HISTORY_COLUMNS per epoch run
        }

    # checkpoints

    def _save_checkpoint(self) -> None:
        if distributed.is_main():
            save_checked(self.out / CHECKPOINT, self.state)
            write_atomic(self.out / HISTORY, history_csv(self.state["history"]).encode())

    def _load_checkpoint(self, path: Path) -> dict:
        if not path.is_file():
            raise ConfigError(f"--resume: {path} does not exist (nothing to resume)")
        try:
            state = load_checked(path)
        except FileError as error:
            raise ConfigError(f"--resume: {error}; start the run again with another --out (or without --resume "
                              f"after removing {path.parent})") from None
        if "config" not in state or "phase" not in state:
            raise ConfigError(f"--resume: {path} is not a csext search checkpoint")
        changed = changed_settings(state["config"], dataclasses.asdict(self.config))
        if changed:
            raise ConfigError(f"--resume: the checkpoint was made with other settings ({', '.join(changed)}); use them or another --out")
        if self.config.rescale and "penalty_scale" not in state:
            raise ConfigError(f"--resume: {path} was made before --rescale scaled lam by 1 / sigmoid(s0) (the authors' "
                              f"penalty); start the run again with another --out")
        state.setdefault("history", [])  # a checkpoint older than the history: rows from here on
        state.setdefault("scaler", None)
        state.setdefault("penalty_scale", 1.0)
        state.setdefault("threshold_shift", None)
        return state

    # phases

    def run(self) -> dict:
        phases = self.config.phases()
        while self.state["phase"] < len(phases):
            kind, round_, epochs = phases[self.state["phase"]]
            if kind == "dense":
                self._run_dense(epochs)
            elif kind == "search":
                self._run_search(round_, epochs)
            else:
                self._run_retrain(round_, epochs)
            self.state.update(phase=self.state["phase"] + 1, epoch=0, seconds=0.0, trainee=None, trainee_optimizer=None,
                              scaler=None)
            self._save_checkpoint()
        results = self.results()
        if distributed.is_main():
            write_atomic(self.out / RESULTS, _json(results).encode())
            plot_results(results, self.out / PLOT)
            plot_history(self.state["history"], self.out / TRAINING_PLOT, f"{results['model']} on {results['data']}, "
                         f"seed {results['seed']}")
        distributed.barrier()  # the files exist before any rank returns
        return results

    def _epochs(self, epochs: int, desc: str):
        """Epoch indices still to run in this phase (all of them unless resumed mid-phase)."""
        epochs_left = range(self.state["epoch"], epochs)
        bar = epoch_bar(desc, epochs, self.progress, epochs_left, done=self.state["epoch"])
        return (epochs_left, None) if bar is None else (bar, bar)

    def _finish_epoch(self, started: float, model: nn.Module, row: dict, spent_by_method: bool = True) -> float | None:
        """Count the epoch, add its history row (`row` and the accuracies of `model`), checkpoint;
        returns the test accuracy (None on ranks other than the first)."""
        seconds = time.perf_counter() - started
        self.state["epoch"] += 1
        self.state["epochs_spent"] += int(spent_by_method)
        self.state["seconds"] += seconds
        if distributed.is_main():  # the other ranks write nothing, so need no history
            row = {**row, **accuracies(model, self.data, self.config), "seconds": round(seconds, 3)}
            self.state["history"].append({column: row.get(column) for column in HISTORY_COLUMNS})
        self._save_checkpoint()
        return row.get("test_acc")

    def _run_dense(self, epochs: int) -> None:
        model = self._plain()
        optimizer = make_optimizer(model, self.config)
        self._load_trainee(model, optimizer)
        trainer, scaler = training_module(model, self.config), grad_scaler(self.config, self.state["scaler"])
        epochs_left, bar = self._epochs(epochs, "dense")
        for epoch in epochs_left:
            started = time.perf_counter()
            lr = learning_rate(self.config, epoch, epochs)
            _set_lr(optimizer, lr)
            stats = train_epoch(trainer, self.data, optimizer, self.config, self._generator(epoch), scaler=scaler)
            self._keep_trainee(model, optimizer, scaler)
            row = {"phase": "dense", "round": 0, "epoch": epoch + 1, "lr": lr, **stats, "remaining": 1.0}
            test_acc = self._finish_epoch(started, model, row, spent_by_method=False)  # not the method's budget
            if bar is not None:
                bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['train_acc']:.3f}", test=f"{test_acc:.3f}")
        scores = accuracies(model, self.data, self.config)
        self.state["results"]["dense"] = {**scores, "epochs": epochs, "seconds": round(self.state["seconds"], 3)}
        self._save_network(model, DENSE_NETWORK, 0, 1.0, scores)

    def _run_search(self, round_: int, epochs: int) -> None:
        config = self.config
        model = self._gated()
        optimizer = make_optimizer(model, config)
        if self.state["search_model"] is not None:
            model.load_state_dict(self.state["search_model"])
        if self.state["search_optimizer"] is not None:  # None at the start of a round: fresh momentum
            optimizer.load_state_dict(self.state["search_optimizer"])
        steps_per_epoch = math.ceil(len(self.data.y_train) / config.batch_size)
        trainer, scaler = training_module(model, self.config), grad_scaler(config, self.state["scaler"])
        epochs_left, bar = self._epochs(epochs, f"search round {round_}")
        for epoch in epochs_left:
            started = time.perf_counter()
            lr, penalty = learning_rate(config, epoch, epochs), self.state["penalty"]
            _set_lr(optimizer, lr)
            extra_loss = apply_penalty(model, penalty, config)

            def on_step(step, epoch=epoch):
                global_step = epoch * steps_per_epoch + step
                if config.beta_per_step:
                    set_beta(model, beta_at(global_step, epochs * steps_per_epoch, config.beta_final))
                if round_ == 1 and self.state["rewind"] is None and global_step == config.rewind_iter:
                    self.state["rewind"] = capture(model)

            if not config.beta_per_step:
                set_beta(model, beta_at(epoch, epochs, config.beta_final))
            stats = train_epoch(trainer, self.data, optimizer, config, self._generator(epoch), on_step, extra_loss,
                                scaler=scaler)
            distributed.assert_same_on_all_ranks(model)
            remaining = sparsity_report(model).remaining
            if config.target_remaining is not None:
                self._steer_penalty(remaining, round_, epoch, epochs)
            self.state["search_model"], self.state["search_optimizer"] = model.state_dict(), optimizer.state_dict()
            self.state["scaler"] = scaler_state(scaler)
            beta = gated_modules(model)[0][1].beta
            row = {"phase": "search", "round": round_, "epoch": epoch + 1, "lr": lr, "beta": beta, "penalty": penalty,
                   **stats, "remaining": remaining}
            test_acc = self._finish_epoch(started, model, row)
            if bar is not None:
                bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['train_acc']:.3f}", test=f"{test_acc:.3f}",
                                beta=f"{beta:.3g}", remaining=f"{remaining:.4f}")
        if self.state["rewind"] is None:  # k beyond round 1's iterations: rewind to its end
            self.state["rewind"] = capture(model)
        if config.target_remaining is not None and round_ == config.rounds:  # the last resort, last round only
            shifted = _threshold_to(model, config.target_remaining)
            if shifted is not None:
                self.state["threshold_shift"] = {"round": round_, "from": shifted, "to": sparsity_report(model).remaining}
                if distributed.is_main():
                    warnings.warn(SearchWarning(
                        f"--target-remaining: search round {round_} ended at {shifted:.2%}, more than 10% off the "
                        f"target {config.target_remaining:.2%}; the mask threshold was shifted to reach it "
                        f"(results.json: threshold_shift)"), stacklevel=2)
        report = sparsity_report(model)
        closed = [name for name, fraction in report.per_layer.items() if fraction == 0]
        if closed and distributed.is_main():
            warnings.warn(SearchWarning(
                f"search round {round_}: {', '.join(closed)} keep no weight, so in a network without skip "
                f"connections the ticket's output no longer depends on its input. Without normalization layers "
                f"the soft mask scales every layer's output by sigmoid(s0) (0.5 at --mask-init 0), which shrinks "
                f"the signal and the gradients that would keep gates open; try --rescale (the authors' code divides "
                f"the mask by sigmoid(s0)), a higher --mask-init, a lower --penalty or more --epochs"), stacklevel=2)
        mask = {name: (m.mask_logits > 0).cpu() for name, m in gated_modules(model)}
        self.state["tickets"].append({"round": round_, "mask": mask, "remaining": report.remaining,
                                      "per_layer": dict(report.per_layer), "seconds": self.state["seconds"],
                                      "penalty": self.state["penalty"]})
        reset_mask_logits(model, config.beta_final, config.mask_init, config.reset)
        self.state["search_model"] = model.state_dict()
        if config.recipe != "authors":  # csext: fresh momentum each round; the authors keep one optimizer
            self.state["search_optimizer"] = None

    def _run_retrain(self, round_: int, epochs: int) -> None:
        ticket = self.state["tickets"][round_ - 1]
        model = self._gated()
        prepare_ticket(model, ticket["mask"], self.state["rewind"])
        optimizer = make_optimizer(model, self.config)
        self._load_trainee(model, optimizer)
        trainer, scaler = training_module(model, self.config), grad_scaler(self.config, self.state["scaler"])
        epochs_left, bar = self._epochs(epochs, f"retrain ticket {round_}")
        for epoch in epochs_left:
            started = time.perf_counter()
            lr = learning_rate(self.config, epoch, epochs)
            _set_lr(optimizer, lr)
            stats = train_epoch(trainer, self.data, optimizer, self.config, self._generator(epoch), scaler=scaler)
            self._keep_trainee(model, optimizer, scaler)
            row = {"phase": "retrain", "round": round_, "epoch": epoch + 1, "lr": lr, **stats,
                   "remaining": ticket["remaining"]}
            test_acc = self._finish_epoch(started, model, row)
            if bar is not None:
                bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['train_acc']:.3f}", test=f"{test_acc:.3f}",
                                remaining=f"{ticket['remaining']:.4f}")
        scores = accuracies(model, self.data, self.config)
        self.state["results"]["tickets"].append({
            "round": round_,
            "remaining": ticket["remaining"],
            **scores,
            "epochs_spent": self.state["epochs_spent"],
            "seconds": round(ticket["seconds"] + self.state["seconds"], 3),
            "per_layer": ticket["per_layer"],
        })
        self._save_network(model, TICKET_NETWORK.format(round=round_), round_, ticket["remaining"], scores)

    # --target-remaining

    def _round_bounds(self, round_: int) -> tuple[float, float]:
        """(lowest, highest) fraction round r may keep: never below F, the target (nor than 10%
        under it); at most F ** (r / R), the geometric path to F, in an earlier round (the last:
        10% over F). Between the two the search goes where lam takes it."""
        target, rounds = self.config.target_remaining, self.config.rounds
        highest = target * 1.1 if round_ == rounds else target ** (round_ / rounds)
        return target * 0.9, highest

    def _steer_penalty(self, remaining: float, round_: int, epoch: int, epochs: int) -> None:
        """Over the last two thirds of the round, when the hard mask means something (beta has
        grown): where the round keeps more than its highest fraction, multiply lam by remaining /
        highest; where it keeps less than its lowest, by remaining / lowest; at most x2 or /2 an
        epoch. Inside the bounds lam stays: a round going sparser than the path is not held back."""
        if epoch < epochs // 3 or remaining <= 0:
            return
        lowest, highest = self._round_bounds(round_)
        ratio = remaining / highest if remaining > highest else remaining / lowest if remaining < lowest else 1.0
        factor = min(2.0, max(0.5, ratio))
        self.state["penalty"] = max(self.state["penalty"] * factor, 1e-12)

    # helpers

    def _generator(self, epoch: int) -> torch.Generator:
        return epoch_generator(self.config.seed, self.state["phase"], epoch)

    def _load_trainee(self, model, optimizer) -> None:
        if self.state["trainee"] is not None:
            model.load_state_dict(self.state["trainee"])
            optimizer.load_state_dict(self.state["trainee_optimizer"])

    def _save_network(self, model: nn.Module, name: str, round_: int, remaining: float, scores: dict) -> None:
        save_network(model, self.out / name, self.config, self.data, round_, remaining, scores)

    def _keep_trainee(self, model, optimizer, scaler) -> None:
        self.state["trainee"], self.state["trainee_optimizer"] = model.state_dict(), optimizer.state_dict()
        self.state["scaler"] = scaler_state(scaler)

    def results(self) -> dict:

        config = dataclasses.asdict(self.config)
        config["exclude"] = self.exclude
        results = {
            "method": "cs",
            "data": self.config.data,
            "model": self.config.model,
            "seed": self.config.seed,
            "config": config,
            # the factors of --rescale: mask c * sigmoid(beta * s), penalty lam * c * sum(sigmoid(beta * s))
            "scaling": {"mask": self.config.scale, "penalty": self.state["penalty_scale"]},
            "dense": self.state["results"]["dense"],
            "tickets": self.state["results"]["tickets"],
            "environment": {"torch": torch.__version__, "csext": __version__,
                            "backend": backends.resolve("auto", torch.device(self.config.device).type),
                            "device": self.config.device},
        }
        if self.config.target_remaining is not None:
            results["target"] = {"remaining": self.config.target_remaining,
                                 "threshold_shift": self.state["threshold_shift"]}
        return results


def save_network(model: nn.Module, path: Path, config: SearchConfig, data: datasets.Dataset, round_: int,
                 remaining: float, scores: dict) -> None:
    """`path`: `model` as the plain network of the run's model (a ticket finalized: pruned weights
    zero, mask_scale folded in), on the CPU, with what load_network needs to rebuild it. Written
    by the first rank alone."""
    if not distributed.is_main():
        return
    plain = finalize(copy.deepcopy(model)) if gated_modules(model) else model
    saved = {"model": config.model, "recipe": config.recipe, "input_shape": list(data.input_shape),
             "num_classes": data.num_classes,
             "round": round_, "remaining": remaining, **scores,
             "state_dict": {k: v.detach().cpu() for k, v in plain.state_dict().items()}}
    save_checked(path, saved)


def load_network(path: str | os.PathLike, device: str | torch.device = "cpu", *, factory=None) -> nn.Module:
    """A network a search saved (DIR/dense.pt, DIR/ticket-R.pt), or a baseline of `compare`
    (DIR/<method>/ticket-R.pt), as the plain network of its model, its weights loaded (a ticket's
    pruned weights are zero), in eval mode. The file is data: its checksum is verified, and it
    names its model but never supplies code. A model of csext.experiments.nets is built from
    there; a run's own MODULE:FACTORY model is built by `factory`, the same callable, passed here
    (the name in the file is not imported). The file's other entries: round (0 for dense),
    remaining, test_acc (and val_acc with --val-fraction), input_shape, num_classes."""
    try:
        saved = load_checked(path)
        name, input_shape, num_classes = saved["model"], saved["input_shape"], saved["num_classes"]
    except (FileError, KeyError) as error:
        why = f"it lacks {error}" if isinstance(error, KeyError) else str(error)
        raise ValueError(f"load_network: {path} is not a network saved by csext's search: {why}") from None
    if not (isinstance(input_shape, list) and input_shape and all(type(v) is int and v > 0 for v in input_shape)
            and type(num_classes) is int and num_classes >= 2 and isinstance(name, str)):
        raise ValueError(f"load_network: {path} is not a network saved by csext's search: its model, input_shape "
                         f"or num_classes is not a name, a list of sizes and a class count")
    recipe = saved.get("recipe", "csext")  # files written before the recipes: csext's networks
    if recipe not in nets.RECIPES:
        raise ValueError(f"load_network: {path} names the recipe {recipe!r}, not one of {', '.join(nets.RECIPES)}")
    if name in nets.NAMES:
        build = nets.builder(name, recipe)
    elif factory is not None:
        build = factory
    elif nets.is_factory_path(name):
        raise ValueError(f"load_network: {path} holds a network of the model {name}, which csext does not "
                         f"import from a file: pass factory=<that function> to build it")
    else:
        raise ValueError(f"load_network: {path} names the model {name!r}, not one of {', '.join(nets.NAMES)}")
    try:
        model = build(tuple(input_shape), num_classes)
        model.load_state_dict(saved["state_dict"])
    except Exception as error:  # weights of another shape, or a factory that builds another network
        raise ValueError(f"load_network: {path} does not fit the model {name} ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else error!r})") from None
    return model.to(device).eval()


@torch.no_grad()
def prepare_ticket(model: nn.Module, mask: dict, rewind: dict) -> nn.Module:
    """Make the gated `model` the ticket `mask` ({layer name: bool tensor}) at the rewind point:
    weights and buffers from `rewind`, the hard mask fixed (mask logits +1 kept, -1 pruned, no
    gradient), pruned weights set to exactly zero. They then stay zero under SGD with momentum
    and weight decay: their gradient is G * 0 and their decay is wd * 0."""
    restore(model, rewind)
    layers = dict(gated_modules(model))
    if set(layers) != set(mask):
        raise ValueError(f"mask: expected the gated layers {sorted(layers)}, got {sorted(mask)}")
    for name, m in layers.items():
        kept = mask[name].to(m.weight.device)
        m.mask_logits.copy_(kept.to(m.mask_logits.dtype) * 2 - 1)
        m.mask_logits.requires_grad_(False)
        m.weight.mul_(kept)
    set_hard(model)
    return model


@torch.no_grad()
def _threshold_to(model: nn.Module, target: float) -> float | None:
    """If the hard mask's remaining fraction is more than 10% (relative) off `target`, shift
    every mask logit by the global quantile so that the fraction s > 0 becomes `target`, and
    return the fraction before; None where it was close enough."""
    remaining = sparsity_report(model).remaining
    if abs(remaining - target) <= 0.1 * target:
        return None
    # A channel's logit counts once per weight it gates, so that the quantile is one of weights.
    logits = torch.cat([m.mask_logits.expand_as(m.weight).flatten().float() for _, m in gated_modules(model)])
    keep = max(1, round(target * logits.numel()))
    threshold = torch.topk(logits, keep).values[-1]
    for _, m in gated_modules(model):
        m.mask_logits.sub_(threshold.to(m.mask_logits.dtype)).add_(1e-6)  # the keep-th largest stays > 0
    return remaining


def _set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _json(results: dict) -> str:
    import json

    return json.dumps(results, indent=2) + "\n"


def plot_results(results: dict, path: Path) -> bool:
    """Test accuracy against remaining fraction, a point per round, the dense accuracy as a line."""
    plt = pyplot()
    if plt is None:
        return False
    tickets = results["tickets"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot([t["remaining"] for t in tickets], [t["test_acc"] for t in tickets], "o-", label="CS ticket")
    for t in tickets:
        ax.annotate(f"round {t['round']}", (t["remaining"], t["test_acc"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if results.get("dense"):
        ax.axhline(results["dense"]["test_acc"], color="gray", linestyle="--", label="dense")
    remaining_axis(ax, [t["remaining"] for t in tickets])
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{results['model']} on {results['data']}, seed {results['seed']}", fontsize=10)
    ax.legend()
    save_png(plt, fig, path)
    return True


def history_csv(history: list[dict]) -> str:
    """The rows of a run's history as CSV with a header: floats to 6 significant digits, an empty
    cell where a column does not apply."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()} for row in history)
    return buffer.getvalue()


def read_history(path: str | os.PathLike) -> list[dict]:
    """A history.csv back as rows: numbers as int or float, empty cells (and the columns of a file
    older than one) as None."""
    def value(column, text):
        if text == "":
            return None
        return text if column == "phase" else int(text) if column in ("round", "epoch") else float(text)

    with open(path, newline="") as f:
        return [{column: value(column, row.get(column, "")) for column in HISTORY_COLUMNS}
                for row in csv.DictReader(f)]


def plot_history(history: list[dict], path: Path, title: str = "") -> bool:
    """Accuracy (test; train dotted; validation dashed, where held out) and the remaining fraction
    against the epochs of the whole run, one colour per phase, the phases named along the top."""
    plt = pyplot()
    if plt is None or not history:
        return False
    fig, (acc_ax, rem_ax) = plt.subplots(2, 1, figsize=(7.5, 5.5), sharex=True, height_ratios=(3, 2))
    colours = {"dense": "tab:gray", "search": "tab:blue", "retrain": "tab:green"}
    start = 0
    for (phase, round_), rows in _runs_of(history):
        x = list(range(start + 1, start + len(rows) + 1))
        colour = colours[phase]
        acc_ax.plot(x, [r["test_acc"] for r in rows], color=colour)
        acc_ax.plot(x, [r["train_acc"] for r in rows], color=colour, linestyle=":", linewidth=1)
        if rows[0]["val_acc"] is not None:
            acc_ax.plot(x, [r["val_acc"] for r in rows], color=colour, linestyle="--", linewidth=1)
        rem_ax.plot(x, [r["remaining"] for r in rows], color=colour)
        acc_ax.annotate(phase if phase == "dense" else f"{phase} {round_}", (x[0], 1.0),
                        xycoords=("data", "axes fraction"), xytext=(2, -10), textcoords="offset points", fontsize=7,
                        color=colour)
        if start:
            for ax in (acc_ax, rem_ax):
                ax.axvline(start + 0.5, color="lightgray", linewidth=0.8)
        start += len(rows)
    from matplotlib.lines import Line2D

    styles = [("test", "-"), ("train", ":")] + ([("validation", "--")] if history[0]["val_acc"] is not None else [])
    acc_ax.legend([Line2D([], [], color="black", linestyle=style, linewidth=1) for _, style in styles],
                  [name for name, _ in styles], loc="lower right", fontsize=7)
    acc_ax.set_ylabel("accuracy")
    log_percent_scale(rem_ax.yaxis)
    rem_ax.set_ylabel("weights remaining (s > 0)")
    rem_ax.set_xlabel("epoch of the run")
    if title:
        acc_ax.set_title(title, fontsize=10)
    save_png(plt, fig, path)
    return True


def _runs_of(history: list[dict]):
    """The history split into its phases, in order: ((phase, round), rows)."""
    import itertools

    return [(key, list(rows)) for key, rows in itertools.groupby(history, key=lambda r: (r["phase"], r["round"]))]

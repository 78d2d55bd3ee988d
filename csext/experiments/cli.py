"""python -m csext search ... (docs/contract.md section 3). Bad input: one error line, exit code 2."""

import argparse
import signal
import sys
import threading
import warnings

import torch

from .. import __version__, backends
from . import data as datasets
from . import distributed
from . import nets
from .baselines import METHODS
from .compare import compare
from .files import FileError, WriteError
from .search import AMP, ConfigError, DivergedError, Search, SearchConfig, SearchWarning
from .sweep import run_sweep

# The paper's setups (Savarese et al., section 5) with the authors' recipe (their code, main.py and
# models/: docs/usage.md lists what csext does otherwise). They need the CIFAR-10 files in --data-dir
# and, to finish in hours rather than days, a GPU.
PRESETS = {
    "resnet20-cifar10": dict(data="cifar10", model="resnet20", recipe="authors", epochs=85, lr=0.1,
                             lr_milestones=[56, 71], batch_size=128, weight_decay=1e-4, penalty=1e-8, mask_init=0.0,
                             beta_final=200.0, rewind_iter=2 * 391, rounds=3),  # 2 epochs of 391 steps
    "vgg16-cifar10": dict(data="cifar10", model="vgg16", recipe="authors", epochs=160, lr=0.1,
                          lr_milestones=[80, 120], batch_size=64, weight_decay=1e-4, penalty=1e-8, mask_init=0.0,
                          beta_final=200.0, rewind_iter=2 * 782, rounds=3),
}


class _HelpFormatter(argparse.HelpFormatter):
    """Each option's default after its help, unless the help says it or there is none to say."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or action.required or any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)".lstrip()


class _Parser(argparse.ArgumentParser):
    """Bad input is one line, as the rest of the command's errors: not the usage first."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def _epochs(text: str) -> list[int]:
    """--lr-milestones: comma-separated epochs."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated epochs (integers), got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m csext", description="Continuous Sparsification")
    built = ", ".join(backends.available())
    parser.add_argument("--version", action="version", help="csext's version, torch's and the backends built",
                        version=f"csext {__version__} (torch {torch.__version__}; backends: {built})")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    search = commands.add_parser("search", help="CS ticket search, results in DIR/results.json",
                                 formatter_class=_HelpFormatter)
    _add_run_options(search)
    search.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    search.add_argument("--sweep-mask-init", default=None,
                        help="comma-separated s0 values: one independent search per (s0, lam), spread over the ranks")
    search.add_argument("--sweep-penalty", default=None, help="comma-separated lam values for the sweep")
    compare = commands.add_parser("compare", help="CS against IMP, magnitude, SNIP, L0, random and L1 filter pruning",
                                  formatter_class=_HelpFormatter)
    _add_run_options(compare)
    compare.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from " + ", ".join(METHODS))
    compare.add_argument("--fractions", default="0.2,0.1,0.05",
                         help="remaining fractions for magnitude, snip and random when cs is not compared "
                              "(with cs: the fractions its tickets reached)")
    compare.add_argument("--imp-rounds", type=int, default=10, help="IMP rounds, each removing 20%% of the weights")
    compare.add_argument("--l0-penalty", type=float, default=0.1, help="lam of L0: lam / N * expected L0")
    compare.add_argument("--timing-repeats", type=int, default=20,
                         help="timed calls per network and batch size (x10 at batch 1); the median is kept")
    compare.add_argument("--resume", action="store_true",
                         help="continue the comparison in --out: the cs search from its checkpoint, methods "
                              "that finished kept, the others run")
    return parser


def _add_run_options(s: argparse.ArgumentParser) -> None:
    d = SearchConfig()
    s.add_argument("--preset", choices=sorted(PRESETS), help="the paper's setup; explicit options override it")
    s.add_argument("--data", default=d.data, help=f"{', '.join(datasets.NAMES)} or PATH.npz")
    s.add_argument("--data-dir", default=None, help="folder of the cifar10 / mnist files")
    s.add_argument("--download", action="store_true", help="fetch missing cifar10 / mnist files into --data-dir")
    s.add_argument("--model", default=d.model,
                   help=f"{', '.join(nets.NAMES)}, or MODULE:FACTORY, your function (or class) called as "
                        f"FACTORY(input_shape, num_classes) that returns an nn.Module, imported from the working "
                        f"directory or PYTHONPATH")
    s.add_argument("--rounds", type=int, default=d.rounds, help="R, search rounds, one ticket each")
    s.add_argument("--epochs", type=int, default=d.epochs, help="T, epochs of each search round")
    s.add_argument("--mask-init", type=float, default=d.mask_init, help="s0; negative values give sparser tickets")
    s.add_argument("--penalty", type=float, default=d.penalty, help="lam, weight of sum(sigmoid(beta * s))")
    s.add_argument("--beta-final", type=float, default=d.beta_final,
                   help="beta_T, the temperature at the end of a round")
    s.add_argument("--beta-per-step", action="store_true", help="anneal beta every step instead of every epoch")
    s.add_argument("--rewind-iter", type=int, default=d.rewind_iter, help="k: the rewind point is after k iterations of round 1")
    s.add_argument("--recipe", choices=nets.RECIPES, default=d.recipe,
                   help="authors: as the authors' code (github lolemacs/continuous-sparsification): their "
                        "initialisation and gated layers, weight decay on all but the mask logits, one optimizer "
                        "across the search rounds, --reset official and --rescale (docs/usage.md lists each)")
    s.add_argument("--reset", choices=["paper", "official"], default=None,
                   help="between rounds s <- min(beta_final*s, s0) (paper) or min(s, s0) (the authors' code) "
                        "(default: official with --recipe authors, else paper)")
    s.add_argument("--rescale", action=argparse.BooleanOptionalAction, default=None,
                   help="mask c * sigmoid(beta * s) and penalty lam * c * sum(sigmoid(beta * s)), c = 1 / "
                        "sigmoid(s0), as the authors' code (default: on with --recipe authors, else off)")
    s.add_argument("--granularity", choices=["weight", "channel"], default=d.granularity,
                   help="one mask logit per weight, or per output unit (a channel ticket shrinks: csext.export.shrink)")
    s.add_argument("--target-remaining", type=float, default=None,
                   help="steer lam (then the mask threshold) so the last ticket keeps this fraction")
    s.add_argument("--lr", type=float, default=d.lr, help="SGD learning rate")
    s.add_argument("--lr-milestones", type=_epochs, default=None,
                   help="comma-separated epochs at which lr is divided by 10 (default: 1/2 and 3/4 of each phase)")
    s.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    s.add_argument("--weight-decay", type=float, default=d.weight_decay, help="not applied to mask logits")
    s.add_argument("--batch-size", type=int, default=d.batch_size, help="training mini-batch size")
    s.add_argument("--dense-epochs", type=int, default=None, help="epochs of the dense baseline (default: --epochs)")
    s.add_argument("--retrain-epochs", type=int, default=None, help="epochs of each ticket's retraining (default: the dense budget)")
    s.add_argument("--exclude", default=None, help="comma-separated layer names or globs left dense (default: the recipe's, csext.experiments.nets)")
    s.add_argument("--seed", type=int, default=d.seed, help="seeds the initialisation and every epoch's data order")
    s.add_argument("--out", required=True, help="DIR for the results, checkpoints and plots")
    s.add_argument("--device", default=d.device, help="cpu, cuda or cuda:N")
    s.add_argument("--amp", choices=AMP, default=d.amp,
                   help="forward and loss under torch.autocast in bfloat16 (bf16) or float16 (fp16, with "
                        "loss scaling and lam's term in the loss); weights and mask logits stay float32")
    s.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="hold out this fraction of the training set (the same draw for every run) and report "
                        "validation accuracy beside test accuracy, to choose settings without the test set")
    s.add_argument("--compile", action="store_true",
                   help="train under torch.compile: each phase's first steps compile (seconds to minutes), the "
                        "later ones may run faster; evaluation stays eager. A run may resume with or without it")
    s.add_argument("--quiet", action="store_true", help="no progress bars")


def parse(argv) -> tuple[argparse.Namespace, SearchConfig]:
    """The command's arguments, and the run's settings: a preset's, overridden by options given."""
    argv = list(argv)
    args = _parser().parse_args(argv)
    given = {a.split("=")[0] for a in argv if a.startswith("--")}
    settings = dict(PRESETS[args.preset]) if args.preset else {}
    for name in SearchConfig.__dataclass_fields__:
        option = name.replace("_", "-")
        if f"--{option}" in given or f"--no-{option}" in given or name not in settings:
            settings[name] = getattr(args, name)
    if isinstance(settings["exclude"], str):
        settings["exclude"] = [x for x in settings["exclude"].split(",") if x]
    return args, SearchConfig(**settings)


class Terminated(KeyboardInterrupt):
    """SIGTERM, which schedulers send before they preempt a job: handled as Ctrl-C is."""


def _terminate(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    parser = _parser()
    args, config = parse(sys.argv[1:] if argv is None else argv)
    if threading.current_thread() is not threading.main_thread():  # only the main thread takes signals
        return _main_with_warnings(parser, args, config)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _main_with_warnings(parser, args, config)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main_with_warnings(parser, args, config: SearchConfig) -> int:
    with warnings.catch_warnings():
        show = warnings.showwarning

        def one_line(message, category, *where, **kw):  # csext's own warnings as the command's lines
            if issubclass(category, SearchWarning):
                print(f"python -m csext {args.command}: warning: {message}", file=sys.stderr)
            else:
                show(message, category, *where, **kw)

        warnings.showwarning = one_line
        return _main(parser, args, config)


def _main(parser, args, config: SearchConfig) -> int:
    try:
        if args.command == "compare":
            return _compare(args, config)
        config.device = distributed.init_from_env(config.device)  # under torchrun: join the group
        try:
            if args.sweep_mask_init or args.sweep_penalty:
                return _sweep(args, config)
            results = Search(config, args.out, resume=args.resume, progress=not args.quiet).run()
            main_rank = distributed.is_main()
        finally:
            distributed.close()
    except (ConfigError, datasets.DataError, FileError) as error:
        parser.exit(2, f"python -m csext {args.command}: error: {error}\n")
    except DivergedError as error:
        parser.exit(1, f"python -m csext {args.command}: error: {error}\n")
    except WriteError as error:  # a full disk: the files written before are whole, the last checkpoint too
        parser.exit(1, f"python -m csext {args.command}: error: cannot write {error.filename} ({error.strerror}); "
                       f"the last checkpoint in {args.out} is kept: the same command with --resume continues once "
                       f"this is fixed\n")
    except KeyboardInterrupt as interrupt:  # Ctrl-C or SIGTERM: one line saying how to go on, not a traceback
        signal_name, code = ("SIGTERM", 143) if isinstance(interrupt, Terminated) else ("Ctrl-C", 130)
        parser.exit(code, f"python -m csext {args.command}: interrupted ({signal_name}); the same command with "
                          f"--resume continues from what {args.out} holds (a search from its last finished epoch)\n")
    if not main_rank:  # rank 0 reports
        return 0
    dense = results["dense"]
    print(f"dense: test accuracy {dense['test_acc']:.4f}{_validation(dense)} ({dense['epochs']} epochs, "
          f"{dense['seconds']:.1f} s)")
    for t in results["tickets"]:
        print(f"round {t['round']}: {t['remaining']:.2%} of the weights remain, test accuracy {t['test_acc']:.4f}"
              f"{_validation(t)}, {t['epochs_spent']} epochs spent, {t['seconds']:.1f} s")
    print(f"results: {args.out}/results.json")
    return 0


def _print_sparsest(prefix: str, entry: dict) -> None:
    """The lines for a summary's sparsest tickets within 1 point of dense (on test; on validation)."""
    for key, within in (("sparsest_within_1_point", "within 1 point of dense"),
                        ("sparsest_within_1_point_on_validation", "within 1 point of dense on validation")):
        if key not in entry:
            continue
        best = entry[key]
        if best is None:
            print(f"{prefix}no ticket {within}")
            continue
        setting = (f"mask_init {best['mask_init']:g}, lam {best['penalty']:g}, round {best['round']}: "
                   if "mask_init" in best else "")
        print(f"{prefix}sparsest ticket {within}: {setting}{best['remaining']:.2%} of the weights at "
              f"{best['test_acc']:.4f}{_validation(best)}, {best['epochs_spent']} epochs spent")


def _validation(entry: dict) -> str:
    return f" (validation {entry['val_acc']:.4f})" if "val_acc" in entry else ""


def _compare(args, config: SearchConfig) -> int:
    try:
        fractions = [float(f) for f in args.fractions.split(",") if f]
    except ValueError:
        raise ConfigError(f"--fractions must be comma-separated numbers, got {args.fractions!r}") from None
    methods = [m for m in args.methods.split(",") if m]
    summary = compare(config, methods, args.out, fractions=fractions, imp_rounds=args.imp_rounds,
                      l0_penalty=args.l0_penalty, progress=not args.quiet, resume=args.resume,
                      timing_repeats=args.timing_repeats)
    print(f"dense: test accuracy {summary['dense']['test_acc']:.4f}{_validation(summary['dense'])}")
    for method, entry in summary["methods"].items():
        _print_sparsest(f"{method}: ", entry)
    print(f"summary: {args.out}/summary.json")
    return 0


def _floats(text, option: str) -> list[float]:
    try:
        return [float(v) for v in (text or "").split(",") if v]
    except ValueError:
        raise ConfigError(f"{option} must be comma-separated numbers, got {text!r}") from None


def _sweep(args, config: SearchConfig) -> int:
    summary = run_sweep(config, _floats(args.sweep_mask_init, "--sweep-mask-init"),
                        _floats(args.sweep_penalty, "--sweep-penalty"), args.out, resume=args.resume,
                        progress=not args.quiet)
    if summary is None:  # not rank 0
        return 0
    for run in summary["runs"]:
        last = run["tickets"][-1]
        print(f"mask_init {run['mask_init']:g}, lam {run['penalty']:g}: round {last['round']} keeps "
              f"{last['remaining']:.2%} at test accuracy {last['test_acc']:.4f}{_validation(last)}")
    _print_sparsest("all runs: ", summary)
    print(f"summary: {args.out}/summary.json")
    return 0

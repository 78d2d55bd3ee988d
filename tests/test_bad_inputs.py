"""Bad input, table by table: options, data files, checkpoints, network files, output paths and
API calls. Each case asserts the exit code (or the exception type), that the message is one
line naming what is wrong, and that nothing was left half-written; then the failures of a
running search: a full disk and SIGTERM."""

import errno
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import csext
from csext import functional as CF
from csext.experiments import cli, files, search

# Small enough that a check that is missing shows as a short run that exits 0, not a long one.
QUICK = ["--epochs", "2", "--rounds", "1", "--dense-epochs", "1", "--retrain-epochs", "1", "--quiet"]


def _npz(path: Path, classes=3, n_train=60, n_test=30, features=8, **overrides) -> Path:
    rng = np.random.default_rng(0)
    y_train = np.arange(n_train) % classes
    y_test = np.arange(n_test) % classes
    arrays = {"x_train": rng.normal(size=(n_train, features)).astype(np.float32), "y_train": y_train,
              "x_test": rng.normal(size=(n_test, features)).astype(np.float32), "y_test": y_test}
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def _tree(root: Path) -> dict:
    """Every file under root with its size and modification time: what a failed command may not change."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{text}"
    assert "Traceback" not in text and "weights_only=False" not in text
    return lines[0]


def _fails(argv, capsys, code=2):
    """Run the command line in-process; the one line it printed to stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    captured = capsys.readouterr()
    assert exit_info.value.code == code, captured.err
    return _one_line(captured.err)


# --- options ---------------------------------------------------------------------------------

OPTION_CASES = [
    # (id, extra arguments, text the message must hold)
    ("epochs-0", ["--epochs", "0"], "--epochs must be >= 1"),
    ("epochs-1", ["--epochs", "1"], "--epochs must be >= 2"),
    ("epochs-negative", ["--epochs", "-3"], "--epochs"),
    ("epochs-not-int", ["--epochs", "x"], "argument --epochs"),
    ("rounds-0", ["--rounds", "0"], "--rounds must be >= 1"),
    ("batch-size-0", ["--batch-size", "0"], "--batch-size must be >= 1"),
    ("dense-epochs-0", ["--dense-epochs", "0"], "--dense-epochs must be >= 1"),
    ("retrain-epochs-0", ["--retrain-epochs", "0"], "--retrain-epochs must be >= 1"),
    ("rewind-iter-negative", ["--rewind-iter", "-1"], "--rewind-iter must be >= 0"),
    ("beta-final-below-1", ["--beta-final", "0.5"], "--beta-final"),
    ("beta-final-inf", ["--beta-final", "inf"], "--beta-final"),
    ("beta-final-nan", ["--beta-final", "nan"], "--beta-final"),
    ("penalty-negative", ["--penalty", "-1"], "--penalty"),
    ("penalty-inf", ["--penalty", "inf"], "--penalty"),
    ("mask-init-nan", ["--mask-init", "nan"], "--mask-init"),
    ("mask-init-inf", ["--mask-init", "-inf"], "--mask-init"),
    ("lr-0", ["--lr", "0"], "--lr"),
    ("lr-negative", ["--lr", "-0.1"], "--lr"),
    ("lr-nan", ["--lr", "nan"], "--lr"),
    ("lr-not-a-number", ["--lr", "abc"], "argument --lr"),
    ("momentum-2", ["--momentum", "2"], "--momentum must lie in [0, 1)"),
    ("momentum-negative", ["--momentum", "-0.1"], "--momentum"),
    ("weight-decay-negative", ["--weight-decay", "-1"], "--weight-decay"),
    ("weight-decay-inf", ["--weight-decay", "inf"], "--weight-decay"),
    ("lr-milestones-letters", ["--lr-milestones", "a,b"], "--lr-milestones"),
    ("lr-milestones-0", ["--lr-milestones", "0"], "--lr-milestones"),
    ("lr-milestones-negative", ["--lr-milestones=-5"], "--lr-milestones"),
    ("reset-unknown", ["--reset", "bogus"], "argument --reset"),
    ("model-unknown", ["--model", "bogus"], "--model"),
    ("model-factory-missing", ["--model", "no_such_module_xyz:f"], "--model"),
    ("model-factory-not-callable", ["--model", "os:sep"], "--model"),
    ("target-remaining-0", ["--target-remaining", "0"], "--target-remaining"),
    ("target-remaining-1", ["--target-remaining", "1"], "--target-remaining"),
    ("target-remaining-above-1", ["--target-remaining", "1.5"], "--target-remaining"),
    ("val-fraction-1", ["--val-fraction", "1"], "--val-fraction"),
    ("val-fraction-negative", ["--val-fraction", "-0.1"], "--val-fraction"),
    ("amp-unknown", ["--amp", "fp8"], "argument --amp"),
    ("device-unknown", ["--device", "tpu"], "--device"),
    ("seed-not-int", ["--seed", "x"], "argument --seed"),
    ("unknown-option", ["--bogus"], "unrecognized arguments: --bogus"),
    ("preset-unknown", ["--preset", "bogus"], "argument --preset"),
    ("data-unknown", ["--data", "bogus"], "--data"),
    ("data-missing-file", ["--data", "/nonexistent/data.npz"], "no such file"),
    ("sweep-mask-init-letters", ["--sweep-mask-init", "a,b"], "--sweep-mask-init"),
    ("sweep-penalty-letters", ["--sweep-penalty", "x"], "--sweep-penalty"),
    ("lenet300-on-signals", ["--model", "lenet300"], "lenet300"),
]
if not torch.cuda.is_available():
    OPTION_CASES.append(("device-cuda-without-gpu", ["--device", "cuda"], "--device cuda"))

COMPARE_CASES = [
    ("l0-penalty-negative", ["--l0-penalty", "-1"], "--l0-penalty"),
    ("l0-penalty-nan", ["--l0-penalty", "nan"], "--l0-penalty"),
    ("methods-unknown", ["--methods", "bogus"], "--methods"),
    ("methods-empty", ["--methods", ","], "--methods"),
    ("fractions-0", ["--fractions", "0"], "--fractions"),
    ("fractions-above-1", ["--fractions", "1.5"], "--fractions"),
    ("fractions-letters", ["--fractions", "a"], "--fractions"),
    ("imp-rounds-0", ["--imp-rounds", "0"], "--imp-rounds"),
    ("epochs-1", ["--epochs", "1"], "--epochs"),
]


@pytest.mark.parametrize("case", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
def test_search_refuses_a_bad_option_in_one_line(case, tmp_path, capsys):
    _, extra, expected = case
    out = tmp_path / "out"
    line = _fails(["search", *QUICK, *extra, "--out", str(out)], capsys)
    assert line.startswith("python -m csext") and "error: " in line and expected in line, line
    assert not out.exists()


@pytest.mark.parametrize("case", COMPARE_CASES, ids=[c[0] for c in COMPARE_CASES])
def test_compare_refuses_a_bad_option_in_one_line(case, tmp_path, capsys):
    _, extra, expected = case
    out = tmp_path / "out"
    line = _fails(["compare", *QUICK, *extra, "--out", str(out)], capsys)
    assert line.startswith("python -m csext") and "error: " in line and expected in line, line
    assert not out.exists()


@pytest.mark.parametrize("argv, expected", [([], "command"), (["bogus"], "invalid choice"),
                                            (["search", *QUICK], "--out")],
                         ids=["no-command", "unknown-command", "no-out"])
def test_the_command_line_refuses_a_bad_command_in_one_line(argv, expected, capsys):
    line = _fails(argv, capsys)
    assert expected in line, line


# --- output paths ----------------------------------------------------------------------------


def _regular_file(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    return path


OUT_CASES = [
    ("empty", lambda tmp: "", "--out must name a folder"),
    ("below-dev-null", lambda tmp: "/dev/null/x", "cannot be written"),
    ("in-proc", lambda tmp: "/proc/csext-test/x", "cannot be written"),
    ("a-regular-file", _regular_file, "is a file, not a folder"),
    ("below-a-regular-file", lambda tmp: _regular_file(tmp) / "x", "cannot be written"),
]


@pytest.mark.parametrize("command", ["search", "compare"])
@pytest.mark.parametrize("case", OUT_CASES, ids=[c[0] for c in OUT_CASES])
def test_an_unwritable_out_is_refused_before_any_training(case, command, tmp_path, capsys, monkeypatch):
    _, make, expected = case
    out = make(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    line = _fails([command, *QUICK, "--out", str(out)], capsys)
    assert expected in line, line
    assert _tree(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_is_refused(tmp_path, capsys):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert "cannot be written" in _fails(["search", *QUICK, "--out", str(folder)], capsys)
    finally:
        folder.chmod(0o755)


def test_an_out_holding_a_run_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["search", *QUICK, "--out", str(out)]) == 0
    capsys.readouterr()
    before = _tree(out)
    assert "already holds a run" in _fails(["search", *QUICK, "--out", str(out)], capsys)
    assert _tree(out) == before


# --- data files --------------------------------------------------------------------------------

rng = np.random.default_rng(1)
DATA_CASES = [
    # (id, how to write PATH, text the message must hold)
    ("not-a-zip", lambda p: p.write_text("hello"), "not an .npz file"),
    ("zero-length", lambda p: p.write_bytes(b""), "not an .npz file"),
    ("truncated", lambda p: p.write_bytes(_npz(p.with_suffix(".full.npz")).read_bytes()[:300]), ".npz"),
    ("missing-arrays", lambda p: np.savez(p, x_train=np.zeros((4, 2))), "missing arrays"),
    ("x-1d", lambda p: _npz(p, x_train=np.zeros(60, np.float32)), "x_train must be"),
    ("x-5d", lambda p: _npz(p, x_train=np.zeros((60, 1, 1, 1, 8), np.float32)), "x_train must be"),
    ("nhwc-images", lambda p: _npz(p, x_train=np.zeros((60, 8, 8, 3), np.float32),
                                   x_test=np.zeros((30, 8, 8, 3), np.float32)), "(N, H, W, C)"),
    ("y-length", lambda p: _npz(p, y_train=np.zeros(59, np.int64)), "one label per row"),
    ("y-2d", lambda p: _npz(p, y_train=np.zeros((60, 1), np.int64)), "one label per row"),
    ("empty-train", lambda p: _npz(p, x_train=np.zeros((0, 8), np.float32), y_train=np.zeros(0, np.int64)),
     "x_train is empty"),
    ("fractional-labels", lambda p: _npz(p, y_train=np.full(60, 0.5)), "integer labels"),
    ("complex-x", lambda p: _npz(p, x_train=np.zeros((60, 8), np.complex64)), "numeric"),
    ("string-x", lambda p: _npz(p, x_train=np.array([["a"] * 8] * 60)), "numeric"),
    ("nan-in-x", lambda p: _npz(p, x_train=np.full((60, 8), np.nan, np.float32)), "NaN or infinite"),
    ("inf-in-x-test", lambda p: _npz(p, x_test=np.full((30, 8), np.inf, np.float32)), "NaN or infinite"),
    ("sample-shapes-differ", lambda p: _npz(p, x_test=np.zeros((30, 9), np.float32)), "one sample shape"),
    ("negative-label", lambda p: _npz(p, y_train=np.r_[np.arange(59) % 3, -1]), "labels must lie in"),
    ("test-label-beyond-train", lambda p: _npz(p, y_test=np.r_[np.arange(29) % 3, 3]), "labels must lie in"),
    ("single-class", lambda p: _npz(p, y_train=np.zeros(60, np.int64), y_test=np.zeros(30, np.int64)),
     "single class"),
    ("stray-label", lambda p: _npz(p, y_train=np.r_[np.arange(59) % 3, 99]), "no sample of 96 of the classes 0..99"),
    ("num-classes-not-integer", lambda p: _npz(p, num_classes=np.array([3, 4])), "num_classes must be one integer"),
    ("num-classes-too-small", lambda p: _npz(p, num_classes=np.array(2)), "the num_classes given"),
    ("pickled-objects", lambda p: np.savez(p, x_train=np.array([object()] * 4, dtype=object), y_train=np.zeros(4),
                                           x_test=np.zeros((4, 2)), y_test=np.zeros(4)), "not a readable .npz"),
    ("a-folder", lambda p: p.mkdir(), "no such file"),
]


@pytest.mark.parametrize("case", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_a_bad_data_file_is_refused_in_one_line(case, tmp_path, capsys):
    _, write, expected = case
    path = tmp_path / "data.npz"
    write(path)
    out = tmp_path / "out"
    line = _fails(["search", *QUICK, "--data", str(path), "--out", str(out)], capsys)
    assert "--data" in line or "data.npz" in line, line
    assert expected in line, line
    assert not out.exists()


def test_the_class_count_in_the_data_lets_classes_be_empty(tmp_path, capsys):
    path = _npz(tmp_path / "data.npz", y_train=np.r_[np.arange(59) % 3, 5], y_test=np.arange(30) % 3,
                num_classes=np.array(6))
    assert cli.main(["search", *QUICK, "--data", str(path), "--out", str(tmp_path / "out")]) == 0
    assert search.load_network(tmp_path / "out" / "ticket-1.pt")[-1].out_features == 6


# --- checkpoints -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A whole small run: its checkpoint and network files are the material of the damage below."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert cli.main(["search", *QUICK, "--out", str(out)]) == 0
    return out


def _flip_inside_a_tensor(raw: bytes) -> bytes:
    """64 bytes flipped in the middle of the largest tensor record of a torch.save zip file."""
    import io

    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    start = raw.index(record.filename.encode()) + len(record.filename) + 64 + record.file_size // 2
    return raw[:start] + bytes(b ^ 0xFF for b in raw[start:start + 64]) + raw[start + 64:]


class _Anything:
    pass


CHECKPOINT_CASES = [
    # (id, the damaged content from the good one, text the message must hold)
    ("zero-length", lambda good: b"", "is empty"),
    ("truncated", lambda good: good[: len(good) // 2], "is damaged or not a file torch.save wrote"),
    ("bytes-flipped", _flip_inside_a_tensor, "does not match its checksum"),
    ("text", lambda good: b"hello", "is damaged or not a file torch.save wrote"),
    ("python-object", lambda good: _saved({"config": {}, "phase": 0, "x": _Anything()}), "Python objects"),
    ("no-checksum", lambda good: _saved({"config": {}, "phase": 0}), "has no checksum"),
    ("not-a-dict", lambda good: _saved([1, 2, 3]), "not the dict"),
    ("checksummed-but-not-a-checkpoint", lambda good: _checked({"x": torch.zeros(2)}), "not a csext search checkpoint"),
]


def _saved(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _checked(obj) -> bytes:
    return _saved({**obj, files.CHECKSUM: files.content_sha256(obj)})


@pytest.mark.parametrize("case", CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES])
def test_a_damaged_checkpoint_is_refused_in_one_line(case, finished_run, tmp_path, capsys):
    _, damage, expected = case
    out = tmp_path / "run"
    out.mkdir()
    (out / search.CHECKPOINT).write_bytes(damage((finished_run / search.CHECKPOINT).read_bytes()))
    before = _tree(out)
    line = _fails(["search", *QUICK, "--out", str(out), "--resume"], capsys)
    assert str(out / search.CHECKPOINT) in line and expected in line, line
    assert _tree(out) == before


def test_resume_refuses_other_settings_a_missing_checkpoint_and_a_folder(finished_run, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / search.CHECKPOINT).write_bytes((finished_run / search.CHECKPOINT).read_bytes())
    assert "other settings (epochs)" in _fails(["search", *QUICK[:1], "3", *QUICK[2:], "--out", str(out),
                                                "--resume"], capsys)
    empty = tmp_path / "empty"
    assert "does not exist" in _fails(["search", *QUICK, "--out", str(empty), "--resume"], capsys)
    assert not empty.exists()
    (tmp_path / "folder" / search.CHECKPOINT).mkdir(parents=True)
    assert "does not exist" in _fails(["search", *QUICK, "--out", str(tmp_path / "folder"), "--resume"], capsys)


# --- network files -----------------------------------------------------------------------------


def _network_file(finished_run, **changes) -> dict:
    saved = files.load_checked(finished_run / "ticket-1.pt")
    saved.update(changes)
    return {k: v for k, v in saved.items() if v is not None}


NETWORK_CASES = [
    ("code-named-in-the-file", lambda run, tmp: _checked(_network_file(
        run, model="subprocess:call", input_shape=["touch", str(tmp / "created")])), "not a name, a list of sizes"),
    ("factory-named-in-the-file", lambda run, tmp: _checked(_network_file(run, model="os.path:join")),
     "pass factory="),
    ("unknown-model", lambda run, tmp: _checked(_network_file(run, model="bogus")), "not one of"),
    ("zero-length", lambda run, tmp: b"", "is empty"),
    ("bytes-flipped", lambda run, tmp: _flip_inside_a_tensor((run / "ticket-1.pt").read_bytes()), "checksum"),
    ("no-checksum", lambda run, tmp: _saved(_network_file(run)), "has no checksum"),
    ("no-state-dict", lambda run, tmp: _checked(_network_file(run, state_dict=None)), "state_dict"),
    ("no-model", lambda run, tmp: _checked(_network_file(run, model=None)), "model"),
    ("input-shape-not-sizes", lambda run, tmp: _checked(_network_file(run, input_shape=[-1])), "input_shape"),
    ("one-class", lambda run, tmp: _checked(_network_file(run, num_classes=1)), "num_classes"),
    ("weights-of-another-shape", lambda run, tmp: _checked(_network_file(run, input_shape=[7])), "does not fit"),
    ("python-object", lambda run, tmp: _saved({"model": "mlp", "x": _Anything()}), "Python objects"),
]


@pytest.mark.parametrize("case", NETWORK_CASES, ids=[c[0] for c in NETWORK_CASES])
def test_load_network_refuses_a_bad_file_and_runs_nothing_it_names(case, finished_run, tmp_path):
    _, make, expected = case
    path = tmp_path / "ticket.pt"
    path.write_bytes(make(finished_run, tmp_path))
    with pytest.raises(ValueError) as error:
        search.load_network(path)
    line = _one_line(str(error.value))
    assert str(path) in line and expected in line, line
    assert not (tmp_path / "created").exists()


def test_load_network_builds_a_factory_model_from_the_callable_passed(finished_run, tmp_path):
    path = tmp_path / "ticket.pt"
    path.write_bytes(_checked(_network_file(finished_run, model="my_nets:mlp")))
    network = search.load_network(path, factory=csext.experiments.nets.mlp)
    reference = search.load_network(finished_run / "ticket-1.pt")
    x = torch.randn(5, 40)
    torch.testing.assert_close(network(x), reference(x))
    with pytest.raises(ValueError, match="does not exist"):
        search.load_network(tmp_path / "missing.pt")


# --- the Python API --------------------------------------------------------------------------


def _plain():
    return nn.Sequential(nn.Linear(4, 3))


def _gated():
    model = _plain()
    csext.sparsify(model)
    return model


X, W, S, B = torch.randn(2, 4), torch.randn(3, 4), torch.zeros(3, 4), torch.zeros(3)
API_CASES = [
    # (id, call, exception type, text the message must hold)
    ("sparsify-a-string", lambda: csext.sparsify("model"), TypeError, "model must be an nn.Module"),
    ("sparsify-negative-penalty", lambda: csext.sparsify(_plain(), penalty=-1.0), ValueError, "penalty"),
    ("sparsify-nan-mask-init", lambda: csext.sparsify(_plain(), mask_init=math.nan), ValueError, "mask_init"),
    ("finalize-a-number", lambda: csext.finalize(3), TypeError, "model must be an nn.Module"),
    ("set-beta-a-list", lambda: csext.set_beta([], 2.0), TypeError, "model must be an nn.Module"),
    ("set-beta-below-1", lambda: csext.set_beta(_gated(), 0.5), ValueError, "beta"),
    ("set-beta-a-string", lambda: csext.set_beta(_gated(), "2"), TypeError, "beta"),
    ("set-penalty-negative", lambda: csext.set_penalty(_gated(), -1.0), ValueError, "penalty"),
    ("mask-penalty-plain-model", lambda: csext.mask_penalty(_plain()), ValueError, "no gated layers"),
    ("mask-penalty-a-string", lambda: csext.mask_penalty("model"), TypeError, "model must be an nn.Module"),
    ("gated-linear-nan-mask-init", lambda: csext.GatedLinear(4, 3, mask_init=math.nan), ValueError, "mask_init"),
    ("linear-x-features", lambda: CF.gated_linear(torch.randn(2, 5), W, S, 2.0), ValueError, "in_features"),
    ("linear-weight-3d", lambda: CF.gated_linear(X, W[None], S[None], 2.0), ValueError, "weight must be 2-D"),
    ("linear-mask-shape", lambda: CF.gated_linear(X, W, S[:2], 2.0), ValueError, "mask_logits must have the shape of weight"),
    ("linear-mask-float16", lambda: CF.gated_linear(X, W, S.half(), 2.0), TypeError, "mask_logits must be"),
    ("linear-weight-int", lambda: CF.gated_linear(X, W.int(), S, 2.0), TypeError, "weight must be"),
    ("linear-beta-below-1", lambda: CF.gated_linear(X, W, S, 0.5), ValueError, "beta"),
    ("linear-beta-bool", lambda: CF.gated_linear(X, W, S, True), TypeError, "beta"),
    ("linear-beta-nan", lambda: CF.gated_linear(X, W, S, math.nan), ValueError, "beta"),
    ("linear-penalty-negative", lambda: CF.gated_linear(X, W, S, 2.0, penalty=-1.0), ValueError, "penalty"),
    ("linear-backend-unknown", lambda: CF.gated_linear(X, W, S, 2.0, backend="bogus"), ValueError, "backend"),
    ("linear-mask-scale-0", lambda: CF.gated_linear(X, W, S, 2.0, mask_scale=0.0), ValueError, "mask_scale"),
    ("linear-x-float64", lambda: CF.gated_linear(X.double(), W, S, 2.0), TypeError, "x must have the dtype"),
    ("linear-bias-float64", lambda: CF.gated_linear(X, W, S, 2.0, B.double()), TypeError, "bias must have"),
    ("linear-weight-not-tensor", lambda: CF.gate([[1.0]], S, 2.0), TypeError, "must be tensors"),
    ("conv-padding-word", lambda: CF.gated_conv2d(torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3),
                                                   torch.zeros(3, 2, 3, 3), 2.0, padding="bogus"),
     ValueError, "padding"),
    ("conv-stride-triple", lambda: CF.gated_conv2d(torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3),
                                                    torch.zeros(3, 2, 3, 3), 2.0, stride=(1, 2, 3)),
     ValueError, "stride"),
    ("conv-channels", lambda: CF.gated_conv2d(torch.randn(1, 5, 5, 5), torch.randn(3, 2, 3, 3),
                                               torch.zeros(3, 2, 3, 3), 2.0), ValueError, "in_channels"),
    ("gate-dtype-int8", lambda: CF.gate(W, S, 2.0, dtype=torch.int8), TypeError, "dtype"),
]


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_the_api_refuses_bad_arguments_in_one_line(case):
    _, call, kind, expected = case
    with pytest.raises(kind) as error:
        call()
    assert expected in _one_line(str(error.value)), str(error.value)


@pytest.mark.parametrize("name", ["set_beta", "set_hard", "set_penalty", "finalize", "sparsity_report"])
def test_model_helpers_warn_about_a_model_without_gated_layers(name):
    call = {"set_beta": lambda m: csext.set_beta(m, 2.0), "set_hard": csext.set_hard,
            "set_penalty": lambda m: csext.set_penalty(m, 0.1), "finalize": csext.finalize,
            "sparsity_report": csext.sparsity_report}[name]
    with pytest.warns(UserWarning, match=f"{name}: Sequential has no gated layer") as record:
        call(_plain())
    ours = [w for w in record if f"{name}: Sequential" in str(w.message)]
    assert len(ours) == 1 and ours[0].filename == __file__  # at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call(_gated())


# --- a running search: a full disk, SIGTERM -------------------------------------------------


def test_a_full_disk_mid_run_stops_in_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    whole = tmp_path / "whole"
    assert cli.main(["search", *QUICK, "--out", str(whole)]) == 0
    real_save, calls = torch.save, {"n": 0}

    def disk_fills_on_the_fourth_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    out = tmp_path / "full"
    monkeypatch.setattr(torch, "save", disk_fills_on_the_fourth_save)
    line = _fails(["search", *QUICK, "--out", str(out)], capsys, code=1)
    assert "No space left on device" in line and str(out) in line and "--resume" in line, line
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    files.load_checked(out / search.CHECKPOINT)  # the last one written is whole
    monkeypatch.setattr(torch, "save", real_save)
    assert cli.main(["search", *QUICK, "--out", str(out), "--resume"]) == 0
    assert _results(out) == _results(whole)


def _results(out: Path) -> dict:
    results = json.loads((out / search.RESULTS).read_text())
    for entry in [results["dense"], *results["tickets"]]:
        entry.pop("seconds")
    return results


def test_sigterm_stops_in_one_line_and_resume_gives_the_same_tickets(tmp_path):
    args = [sys.executable, "-m", "csext", "search", "--epochs", "4", "--rounds", "2", "--quiet"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(csext.__file__).parents[1]),
                                                                     os.environ.get("PYTHONPATH")]))}
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    subprocess.run([*args, "--out", str(whole)], check=True, env=env, capture_output=True, timeout=300)
    run = subprocess.Popen([*args, "--out", str(cut)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    history, deadline = cut / search.HISTORY, time.monotonic() + 120
    while run.poll() is None and time.monotonic() < deadline:  # preempted a few epochs in
        if history.exists() and len(history.read_text().splitlines()) > 3:
            run.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 143, err
    assert _one_line(err) == (f"python -m csext search: interrupted (SIGTERM); the same command with --resume "
                              f"continues from what {cut} holds (a search from its last finished epoch)")
    files.load_checked(cut / search.CHECKPOINT)
    subprocess.run([*args, "--out", str(cut), "--resume"], check=True, env=env, capture_output=True, timeout=300)
    assert _results(cut) == _results(whole)
    for name in ("ticket-1.pt", "ticket-2.pt"):
        a, b = (files.load_checked(run_dir / name)["state_dict"] for run_dir in (whole, cut))
        assert all(torch.equal(a[k], b[k]) for k in a)

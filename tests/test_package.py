"""The package's layout: the library apart from the experiment application, one path from a
layer to its backend, and the application's old import paths still working."""

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import csext
from csext import functional as CF

PACKAGE = Path(csext.__file__).resolve().parent
APPLICATION = ("search", "compare", "baselines", "sweep", "cli", "data", "nets", "distributed")


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_import_csext_loads_no_part_of_the_application():
    loaded = _python("import sys, csext; print(' '.join(m for m in sys.modules if m.startswith('csext')))").split()
    assert "csext.experiments" not in loaded
    assert not [m for m in loaded if m.startswith("csext.experiments.") or m.split(".")[-1] in APPLICATION]


def test_the_library_imports_nothing_of_the_application():
    """No module of the library names csext.experiments (read from the source, so that an import
    inside a function counts too); only `python -m csext` (__main__.py) and the old names of the
    application's modules, which redirect to it, do."""
    offenders = []
    for path in [*PACKAGE.glob("*.py"), *PACKAGE.glob("backends/*.py")]:
        if path.name in ("_moved.py", "__main__.py") or path.stem in APPLICATION:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if any("experiments" in name for name in names):
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders


@pytest.mark.parametrize("name", APPLICATION)
def test_old_import_paths_are_the_moved_modules_with_a_warning(name):
    """Each old spelling warns at the user's own line, which Python's default filters show."""
    for spelling in (f"import csext.{name}", f"from csext import {name}", f"import csext; csext.{name}"):
        done = subprocess.run([sys.executable, "-c", spelling], capture_output=True, text=True, timeout=120,
                              cwd=Path(__file__).parent)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"<string>:1: DeprecationWarning: csext.{name} moved to csext.experiments.{name}" in done.stderr, (
            spelling, done.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = getattr(csext, name)  # as `import csext; csext.search.load_network(...)` reads it
    import importlib

    assert old is importlib.import_module(f"csext.experiments.{name}")


def test_every_module_imports_on_its_own():
    """No import cycle: each module imports first, in a fresh interpreter."""
    modules = ["csext.experiments." + m for m in APPLICATION + ("plots", "files")]
    modules += ["csext.functional", "csext.modules", "csext.model", "csext.export", "csext.schedule",
                "csext.backends", "csext.reference"]
    for module in modules:
        _python(f"import {module}")


def test_functional_takes_one_backend_module_per_call(monkeypatch):
    """gated_linear, gated_conv2d and gate reach the backend module's function of the same name,
    once, with the arguments checked and the compute dtype chosen."""
    from csext import reference

    calls = []
    for name in ("gate", "linear", "conv2d"):
        original = getattr(reference, name)

        def spy(*args, _name=name, _original=original):
            calls.append((_name, args[-1]))
            return _original(*args)

        monkeypatch.setattr(reference, name, spy)
    w, s = torch.randn(3, 4), torch.randn(3, 4)
    CF.gated_linear(torch.randn(2, 4), w, s, 2.0, backend="torch")
    CF.gated_conv2d(torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3), torch.randn(3, 2, 3, 3), 2.0, backend="torch")
    CF.gate(w, s, 2.0, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        CF.gated_linear(torch.randn(2, 4), w, s, 2.0, backend="torch")
    # the reference's layers call its gate themselves
    assert calls == [("linear", torch.float32), ("gate", torch.float32), ("conv2d", torch.float32),
                     ("gate", torch.float32), ("gate", torch.float32), ("linear", torch.bfloat16),
                     ("gate", torch.bfloat16)]


@pytest.mark.parametrize("padding", ["same", "valid", 1, (0, 2)])
@pytest.mark.parametrize("kernel_size,dilation", [(3, 1), ((2, 3), 1), (4, 2), ((2, 2), (1, 3))])
def test_conv2d_padding_strings_as_numbers(padding, kernel_size, dilation):
    """'same' and 'valid' reach every backend as numbers (an odd 'same' padded on the right and
    bottom, as F.conv2d pads it), batched or not: F.conv2d's results."""
    x = torch.randn(2, 3, 7, 8)
    w = torch.randn(4, 3, *((kernel_size,) * 2 if isinstance(kernel_size, int) else kernel_size))
    s = torch.randn_like(w)
    want = torch.nn.functional.conv2d(x, w * torch.sigmoid(2.0 * s), None, 1, padding, dilation)
    for backend in [b for b in csext.backends.available() if csext.backends.runs_on(b, "cpu")]:
        got = CF.gated_conv2d(x, w, s, 2.0, None, 1, padding, dilation, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{backend}: {m}")
        got = CF.gated_conv2d(x[0], w, s, 2.0, None, 1, padding, dilation, backend=backend)
        torch.testing.assert_close(got, want[0], rtol=1e-4, atol=1e-5, msg=lambda m: f"{backend}, unbatched: {m}")


def test_conv2d_padding_strings_are_checked():
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    with pytest.raises(ValueError, match="padding must be 'valid', 'same' or numbers, got 'full'"):
        CF.gated_conv2d(x, w, torch.randn_like(w), 1.0, padding="full")
    with pytest.raises(ValueError, match="padding='same' is not supported for strided convolutions"):
        CF.gated_conv2d(x, w, torch.randn_like(w), 1.0, stride=2, padding="same")


def test_docs_link_only_inside_the_repository():
    """README.md, docs/ and bench/README.md: every link is a path in the repository that exists."""
    import re

    root = Path(__file__).resolve().parents[1]
    pages = [root / "README.md", root / "bench" / "README.md", *sorted((root / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            path = target.split("#")[0]
            if "://" in target or (path and not (page.parent / path).exists()):
                broken.append(f"{page.relative_to(root)}: {target}")
    assert not broken
    assert len((root / "README.md").read_text().splitlines()) <= 250, "README.md is a guide: details go to docs/"


@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), ([2], (1,), [1, 2]), ((2, 1), [0, 1], (2,))])
def test_conv2d_takes_ints_and_pairs_on_every_backend(stride, padding, dilation):
    """stride, padding and dilation as an int, a 1-sequence or a pair, as F.conv2d takes them."""
    x, w = torch.randn(2, 3, 9, 8), torch.randn(4, 3, 3, 3)
    s = torch.randn_like(w)
    want = torch.nn.functional.conv2d(x, w * torch.sigmoid(2.0 * s), None, stride, padding, dilation)
    for backend in [b for b in csext.backends.available() if csext.backends.runs_on(b, "cpu")]:
        got = CF.gated_conv2d(x, w, s, 2.0, None, stride, padding, dilation, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{backend}: {m}")


def _import_a_copy(tmp_path, extension: bytes | None, record: str | None) -> str:
    """Imports a copy of the package whose csext._C file holds `extension` (None: no file) beside
    the build record `record` (None: none), in a fresh interpreter, and returns its load_error(),
    checked to be the one line it warned. Nothing is built: the file is never loaded unless the
    record names the torch running, and then it is not a library."""
    import json
    import os
    import shutil
    from importlib.machinery import EXTENSION_SUFFIXES

    copy = tmp_path / "csext"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "_C.*", "_build.json"))
    if extension is not None:
        (copy / f"_C{EXTENSION_SUFFIXES[0]}").write_bytes(extension)
    if record is not None:
        (copy / "_build.json").write_text(record)
    code = "import json, sys, csext; print(json.dumps([csext.backends.aten.load_error(), 'csext._C' in sys.modules]))"
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "TRITON_INTERPRET": "0"}  # an import needs no Triton interpreter
    env.pop("PYTHONWARNINGS", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    error, loaded = json.loads(done.stdout.splitlines()[-1])
    assert not loaded  # the file was never imported, or failed to
    assert error.startswith("csext._C did not load: ") and "\n" not in error
    warned = [line for line in done.stderr.splitlines() if "RuntimeWarning" in line]
    assert len(warned) == 1 and warned[0].endswith(f"RuntimeWarning: {error}; using the torch backend"), done.stderr
    return error


def test_an_extension_built_for_another_torch_is_not_loaded(tmp_path):
    """The build record names another torch: the binary is never loaded (one built against other
    headers may crash), and one line names both versions and the command that rebuilds it."""
    error = _import_a_copy(tmp_path, b"\x7fELF built for torch 0.0.1", '{"torch": "0.0.1"}\n')
    assert f"it was built for torch 0.0.1, but this is torch {torch.__version__}; rebuild it with " in error
    assert "pip install --no-build-isolation" in error


def test_an_extension_without_a_build_record_is_not_loaded(tmp_path):
    error = _import_a_copy(tmp_path, b"\x7fELF of unknown origin", None)
    assert "it was built for an unknown torch (no readable _build.json beside it), but this is torch" in error
    assert "pip install --no-build-isolation" in error


def test_a_missing_extension_names_its_cause_and_the_build_command(tmp_path):
    """Not Python's "cannot import name '_C' from partially initialized module" (a circular
    import, it says), which a source tree without the built extension used to give."""
    from importlib.machinery import EXTENSION_SUFFIXES

    error = _import_a_copy(tmp_path, None, None)
    assert f"it is not built (no _C{EXTENSION_SUFFIXES[0]} in {(tmp_path / 'csext').resolve()})" in error
    assert "build it with " in error and "pip install --no-build-isolation" in error
    assert "circular import" not in error


def test_an_extension_that_fails_to_load_says_why(tmp_path):
    """The record matches, but the file is not a library: the loader's reason, in one line."""
    from importlib.machinery import EXTENSION_SUFFIXES

    error = _import_a_copy(tmp_path, b"not a shared library", f'{{"torch": "{torch.__version__}"}}')
    assert f"_C{EXTENSION_SUFFIXES[0]}: " in error and "rebuild it with " in error

"""The old import paths of the experiment application (csext.search, ...), now in
csext.experiments: each name still imports, with a DeprecationWarning, as the same module."""

import importlib
import sys
import warnings

MOVED = ("search", "compare", "baselines", "sweep", "cli", "data", "nets", "distributed")
_OURS = {"csext", "csext._moved", *(f"csext.{name}" for name in MOVED)}


def _user_stacklevel() -> int:
    """The stacklevel of the first frame outside csext's redirects and the import machinery: the
    line that named the old path, where Python's filters show a DeprecationWarning. (warnings.warn
    skips importlib's bootstrap frames itself, so they do not count.)"""
    level, frame = 2, sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if "importlib" in frame.f_code.co_filename and "_bootstrap" in frame.f_code.co_filename:
            frame = frame.f_back
            continue
        if module not in _OURS and not module.startswith("importlib"):
            break
        level, frame = level + 1, frame.f_back
    return level


def redirect(name: str):
    """The module csext.experiments.X for the old name csext.X (`name`), registered under it."""
    short = name.rsplit(".", 1)[1]
    warnings.warn(f"csext.{short} moved to csext.experiments.{short}; import it from there (the old path "
                  f"will be removed in a later release)", DeprecationWarning, stacklevel=_user_stacklevel())
    module = importlib.import_module(f"csext.experiments.{short}")
    sys.modules[name] = module
    return module

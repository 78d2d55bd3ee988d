"""The old import paths of the experiment application (csext.search, ...), now in
csext.experiments: each name still imports, with a DeprecationWarning, as the same module."""

import importlib
import sys
import warnings

MOVED = ("search", "compare", "baselines", "sweep", "cli", "data", "nets", "distributed")


def redirect(name: str):
    """Make the module being imported as `name` (csext.X) the module csext.experiments.X."""
    short = name.rsplit(".", 1)[1]
    warnings.warn(f"csext.{short} moved to csext.experiments.{short}; import it from there (the old path "
                  f"will be removed in a later release)", DeprecationWarning, stacklevel=3)
    module = importlib.import_module(f"csext.experiments.{short}")
    sys.modules[name] = module
    return module

"""Moved to csext.experiments.distributed; this name still imports it, with a DeprecationWarning."""

from ._moved import redirect

redirect(__name__)

"""Moved to csext.experiments.nets; this name still imports it, with a DeprecationWarning."""

from ._moved import redirect

redirect(__name__)

"""User-facing errors: one line that says what is wrong and how to fix it."""

from __future__ import annotations


class AdaPrunerError(Exception):
    """Bad input or environment. The CLI prints ``error: <message>`` and exits with code 2."""


class OfflineError(AdaPrunerError):
    """Something needs the model/dataset hub and the hub is not reachable."""

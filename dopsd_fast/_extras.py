"""Optional dependencies: a feature imports its package here, which names the pip extra when it is missing.

A plain ``pip install dopsd_fast`` holds what `dopsd demo` and `dopsd train tiny-cpu` import (pyproject's
``dependencies``); the rest sits behind extras (``[deepspeed]``, ``[diffusers]``, ``[telemetry]``) and is imported only
where a feature needs it, never at module level (tests/test_install.py checks both).
"""
from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(ImportError):
    """A feature's optional package is not installed; the message names the extra that installs it."""


def require(module: str, extra: str, feature: str) -> ModuleType:
    """``import module`` for ``feature`` (e.g. "deepspeed.stage=2"), or MissingExtra naming ``extra``.

    Only a missing top-level package becomes MissingExtra; an installed one that fails to import (a missing
    dependency of its own, a missing submodule) raises its own error."""
    top = module.partition(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name != top:
            raise
        raise MissingExtra(f"{feature} needs the `{top}` package, which is not installed: "
                           f"pip install \"dopsd_fast[{extra}]\" (from a checkout: pip install -e \".[{extra}]\")"
                           ) from None

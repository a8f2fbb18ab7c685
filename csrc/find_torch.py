"""The torch that csrc/ compiles against: the one installed in the environment pip installs dopsd_fast into.

The extension links torch's C++ libraries, so it must be built against the torch it runs with (another version
fails to load or, worse, loads; dopsd_fast/ops/_dispatch.py compares the versions). pip builds in an isolated
environment that hides the target's site-packages, and a plain `torch` build requirement would be resolved there
afresh (here to 2.14.1+cu130, 5 GB) whatever the target holds. scikit-build-core has no setting for "the target's
torch", so this file serves it twice (pyproject.toml):

- as a dynamic-metadata plugin that sets no metadata: its build-requirement hook asks for the pinned torch
  (its `pinned` setting, the README's install line) only when the target has no torch yet, i.e. a fresh venv
  where the same pip command installs that pin; a target that has torch gets no second copy.
- run by CMakeLists.txt: prints the torch folder to compile against, the target's, else the build
  environment's (the pin).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from typing import Any, Mapping

_PROBE = "import importlib.util as u; s = u.find_spec('torch'); print(s.submodule_search_locations[0] if s else '')"


def target_torch_dir() -> str | None:
    """The torch folder of the environment pip installs into, or None. pip isolates the build with two variables
    (PYTHONPATH to a sitecustomize that drops site-packages, PYTHONNOUSERSITE); the same interpreter without them
    sees the target environment (under --no-build-isolation it is the target already)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip() or None


def dynamic_metadata(settings: Mapping[str, Any], project: Mapping[str, Any]) -> dict[str, Any]:
    return {}


def get_requires_for_dynamic_metadata(settings: Mapping[str, Any]) -> list[str]:
    # DOPSD_SKIP_NATIVE=1 compiles nothing (pyproject's override), so it needs no torch either
    if os.environ.get("DOPSD_SKIP_NATIVE") == "1" or target_torch_dir():
        return []
    return [settings["pinned"]]


if __name__ == "__main__":
    build_env = importlib.util.find_spec("torch")
    print(target_torch_dir() or (build_env.submodule_search_locations[0] if build_env else ""))

"""PEP 517 backend: setuptools' own, plus the torch that csrc/ compiles against as a build requirement.

The extension must be built against the torch it will run with (C++ ABI, dispatcher). Under pip's build isolation
the target environment's site-packages are hidden, so:
- torch already installed in the target environment (a re-install, the GPU machine): require nothing more;
  setup.py compiles against that torch, found by asking the target interpreter outside the isolation.
- no torch there yet (a clean CI venv, where torch is installed by the same pip command): require the CPU build
  the README's install line pins, so the isolated build and the final environment hold the same torch.
"""
from __future__ import annotations

import os
import subprocess
import sys

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (every hook not overridden below)

# The README / CI install line's torch pin; only used when the target environment has no torch yet.
PINNED_TORCH = "torch==2.13.0"


def target_torch_dir() -> str | None:
    """The torch package folder of the environment pip installs into (outside build isolation), or None."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    probe = "import importlib.util as u; s = u.find_spec('torch'); print(s.submodule_search_locations[0] if s else '')"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    return out.stdout.strip() or None


def _torch_requirement() -> list[str]:
    if os.environ.get("DOPSD_SKIP_NATIVE") == "1" or target_torch_dir():
        return []
    return [PINNED_TORCH]


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools.get_requires_for_build_wheel(config_settings) + _torch_requirement()


def get_requires_for_build_editable(config_settings=None):
    return _setuptools.get_requires_for_build_editable(config_settings) + _torch_requirement()

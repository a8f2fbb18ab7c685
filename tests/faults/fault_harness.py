"""The fault-injection harness: a registry of faults, each with a seeded injection point; runners that train
`dopsd train tiny-cpu` with the fault, resume, and measure the result against an uninterrupted reference run.

Measured per fault (``Outcome``): the exit code; whether the fault landed mid-run (the process was alive and had
logged rows 1..n but not the last step); steps lost (steps logged before the fault that the resume trains again);
metrics.jsonl rows duplicated, missing, or differing from the reference (loss, losses, grad_norm, lr, skip count:
bit-exact on CPU); corrupt files (every complete checkpoint's state.json and safetensors must load, finite; so must
base.safetensors and every metrics row), after the fault and after the resume; tracebacks and whether bad input
named its file; code run from a user-supplied file (payloads that would create a marker file).

The killed run is a child process (tests/faults/fault_child.py plants the exact kill points); the reference and
the resume run in-process through ``dopsd_fast.cli.main`` (no second import of torch per fault), on one thread as
the child does, so the rows compare bit-exactly. The 2-rank DeepSpeed faults reuse tests/distributed/ds_launch.py.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dopsd_fast.cli import main
from dopsd_fast.models.loading import first_nonfinite
from dopsd_fast.testing import metrics_rows, train_process, wait_for_rows
from dopsd_fast.train.checkpoint import list_checkpoints, load_tensors, read_state
from dopsd_fast.train.stop import EXIT_STOPPED
from dopsd_fast.train.watchdog import EXIT_HUNG

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))     # ds_launch (the 2-rank launches)

CHILD = Path(__file__).with_name("fault_child.py")
STEPS = 8
# a checkpoint every step and a prune at every save from step 3 on: a kill can lose at most the step under way
RUN = [f"train.steps={STEPS}", "train.checkpoint_every=1", "train.keep_last=2", "train.log_every=1"]
COMPARED = ("loss", "losses", "grad_norm", "lr", "skipped", "bad_steps")     # not the timings
DS_TIMEOUT_S = 10
DS_RUN = [f"train.steps={STEPS}", "train.checkpoint_every=1", "train.keep_last=2", "deepspeed.stage=2",
          f"deepspeed.timeout_s={DS_TIMEOUT_S}", "train.report_to=[jsonl]"]
MIB = 1 << 20
BASE_BYTES = 2_343_520          # tiny-cpu's base.safetensors


# ---------------------------------------------------------------- the registry

@dataclass(frozen=True)
class Fault:
    """One fault: ``point`` says where it strikes (the runner), ``seed`` draws the exact place (``draw``)."""
    point: str
    seed: int = 0
    long: bool = False              # the long suite only (`pytest -m faults`)

    @property
    def id(self) -> str:
        return f"{self.point}-{self.seed}"

    @property
    def kind(self) -> str:
        return KINDS[self.point]

    def draw(self) -> dict:
        """The seeded injection point (the same seed, the same place)."""
        rng = random.Random(f"{self.point}/{self.seed}")
        if self.point == "sigkill-step":           # after row n, a random fraction into the next step (or its save)
            return {"rows": rng.randint(2, STEPS - 2), "frac": rng.random()}
        if self.point == "sigkill-save":           # the checkpoint of step k, part p cut at frac of its bytes
            return {"point": "save-part", "step": rng.randint(2, STEPS - 1), "part": rng.randint(1, 4),
                    "frac": rng.random()}
        if self.point == "sigkill-prune":          # renamed into place, before (frac < 0) or in the prune
            return {"point": "prune", "step": rng.randint(3, STEPS - 1), "part": rng.randint(0, 9),
                    "frac": -1.0 if self.seed % 2 == 0 else rng.random()}
        if self.point == "sigkill-startup":        # a fresh or resumed run, killed before its first step
            return {"prior": rng.choice([0, rng.randint(1, STEPS - 2)]), "delay": rng.uniform(0.5, 3.5)}
        if self.point == "sigkill-base":           # startup: base.safetensors written and cut, then the kill
            return {"point": "base", "frac": rng.random()}
        if self.point == "sigterm":
            return {"rows": rng.randint(2, STEPS - 2)}
        if self.point == "nan":
            return {"point": "nan", "step": rng.randint(2, STEPS - 1)}
        if self.point == "disk-full":              # bytes left free: odd seeds fill up in base.safetensors at startup,
            base = 0 if self.seed % 2 else BASE_BYTES   # even ones in a step's checkpoint or log
            return {"free": base + rng.randint(MIB // 16, 2 * MIB)}
        if self.point in ("rank-stop", "rank-kill"):
            return {"rows": rng.randint(2, 3)}
        return {}


KINDS = {
    "sigkill-step": "SIGKILL in a step", "sigkill-save": "SIGKILL during the checkpoint write",
    "sigkill-prune": "SIGKILL between rename and prune", "sigkill-startup": "SIGKILL during startup",
    "sigkill-base": "SIGKILL writing base.safetensors", "sigterm": "SIGTERM", "nan": "NaN gradient",
    "disk-full": "disk full (tmpfs)", "rank-stop": "SIGSTOPped rank (2 ranks)", "rank-kill": "killed rank (2 ranks)",
    "bad-config": "bad config files", "bad-data": "bad images / captions / metadata",
    "bad-weights": "bad weights (model.pretrained)", "bad-checkpoint": "bad checkpoints",
}


def registry() -> list[Fault]:
    """Every fault of the suite; ``long`` ones run under `pytest -m faults` only."""
    short = [Fault("sigkill-step"), Fault("sigkill-save"), Fault("sigkill-prune"), Fault("sigterm"), Fault("nan"),
             Fault("disk-full"), Fault("bad-config"), Fault("bad-checkpoint")]
    long = [Fault("sigkill-step", s, True) for s in range(1, 6)] + \
           [Fault("sigkill-save", s, True) for s in range(1, 5)] + \
           [Fault("sigkill-prune", s, True) for s in range(1, 4)] + \
           [Fault("sigkill-startup", s, True) for s in range(3)] + \
           [Fault("sigkill-base", s, True) for s in range(2)] + \
           [Fault("sigterm", s, True) for s in range(1, 3)] + [Fault("nan", 1, True)] + \
           [Fault("disk-full", s, True) for s in range(1, 5)] + \
           [Fault("bad-data", 0, True), Fault("bad-weights", 0, True), Fault("bad-checkpoint", 1, True)] + \
           [Fault("rank-stop", 0, True), Fault("rank-kill", 0, True)]
    return short + long


# ---------------------------------------------------------------- what a fault left

@dataclass
class Outcome:
    fault: Fault
    exit: int | None = None
    expected_exit: int | None = None
    mid_run: bool = True            # alive, rows 1..n logged, n below the last step, when the fault struck
    logged: int = 0                 # the last step logged when the fault struck
    resumed_from: int = 0           # the checkpoint the resume continued from
    steps_lost: int = 0
    rows_duplicated: int = 0
    rows_missing: int = 0
    rows_differing: int = 0
    corrupted: list[str] = field(default_factory=list)
    tracebacks: int = 0
    cases: int = 1                  # bad-input corpora: one fault per file
    unnamed: list[str] = field(default_factory=list)       # bad inputs refused without naming the file
    code_run: int = 0               # payloads that ran
    exit_after_s: float | None = None      # rank faults: the survivor's exit after its peer died or hung
    resume_exit: int | None = 0
    note: str = ""

    @property
    def survived(self) -> bool:
        limit_ok = self.exit_after_s is None or self.exit_after_s <= DS_TIMEOUT_S + 30
        return (self.exit == self.expected_exit and self.mid_run and self.steps_lost <= 1 and not self.corrupted
                and not (self.rows_duplicated or self.rows_missing or self.rows_differing) and not self.tracebacks
                and not self.unnamed and not self.code_run and self.resume_exit in (0, None) and limit_ok)

    def record(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "fault"}
        return {"fault": self.fault.id, "kind": self.fault.kind, "long": self.fault.long,
                "injection": self.fault.draw(),
                **d, "files_corrupted": len(self.corrupted), "survived": self.survived}


def logged_steps(out: Path) -> list[int]:
    """Steps of the whole rows of metrics.jsonl (a row torn by the kill is not counted: the resume drops it)."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]


def corrupt_files(out: Path) -> list[str]:
    """The files of ``out`` a resume, `dopsd sample` or `dopsd export` would read and cannot: every complete
    checkpoint's state.json and safetensors (finite), base.safetensors, config.yaml and the whole metrics rows."""
    bad = []
    for ckpt in list_checkpoints(out / "checkpoints"):
        try:
            read_state(ckpt, required=("step", "data", "config"))
        except Exception as err:                   # noqa: BLE001 (any failure is a corrupt file)
            bad.append(f"{ckpt / 'state.json'}: {err}")
        for f in sorted(ckpt.glob("*.safetensors")):
            try:
                load_tensors(f)
            except Exception as err:               # noqa: BLE001
                bad.append(f"{f}: {err}")
        parts = ["student", "teacher"] + (["rng-rank00000"] if (ckpt / "deepspeed").is_dir() else ["optimizer", "rng"])
        bad += [f"{ckpt}: complete (state.json) but {p}.safetensors is missing" for p in parts
                if not (ckpt / f"{p}.safetensors").is_file()]
    if (out / "base.safetensors").exists():
        try:
            load_file(str(out / "base.safetensors"))
        except Exception as err:                   # noqa: BLE001
            bad.append(f"{out / 'base.safetensors'}: {err}")
    if (out / "config.yaml").exists():
        import yaml
        try:
            assert isinstance(yaml.safe_load((out / "config.yaml").read_text()), dict)
        except Exception as err:                   # noqa: BLE001
            bad.append(f"{out / 'config.yaml'}: {err!r}")
    if (out / "metrics.jsonl").exists():
        for n, line in enumerate((out / "metrics.jsonl").read_text().splitlines(keepends=True), 1):
            try:
                json.loads(line)
            except ValueError:
                if line.endswith("\n"):            # a torn last line is the kill's, and the resume drops it
                    bad.append(f"{out / 'metrics.jsonl'}:{n}")
    return bad


def compare_rows(outcome: Outcome, rows: list[dict], reference: list[dict], upto: int | None = None) -> None:
    """Rows duplicated, missing and (up to step ``upto``, default all) differing from the reference."""
    steps = [r["step"] for r in rows]
    outcome.rows_duplicated = len(steps) - len(set(steps))
    outcome.rows_missing = len(set(range(1, STEPS + 1)) - set(steps))
    ref = {r["step"]: r for r in reference}
    outcome.rows_differing = sum(1 for r in rows if (upto is None or r["step"] < upto)
                                 and any(r.get(k) != ref[r["step"]].get(k) for k in COMPARED))


@contextlib.contextmanager
def captured():
    """stdout + stderr of in-process `dopsd` calls (logging's last-resort handler writes to sys.stderr too)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        yield buf


def dopsd(*args: str) -> tuple[int, str]:
    """`dopsd ARGS` in this process: its exit code and output; a traceback is counted, not raised."""
    threads, backend = torch.get_num_threads(), os.environ.get("DOPSD_BACKEND")
    torch.set_num_threads(1)                       # as the killed child (testing.train_process): bit-exact rows;
    os.environ["DOPSD_BACKEND"] = "reference"      # model.ops_backend=auto would take Triton's interpreter here
    with captured() as buf:
        warnings = logging.StreamHandler(buf)           # as the last-resort handler of a real run (pytest holds
        logging.getLogger("dopsd_fast").addHandler(warnings)     # the root logger here)
        try:
            rc = main(list(args))
        except BaseException:                      # noqa: BLE001 (a traceback is the finding)
            import traceback
            traceback.print_exc(file=buf)
            rc = 1
        finally:
            logging.getLogger("dopsd_fast").removeHandler(warnings)
            torch.set_num_threads(threads)
            os.environ.pop("DOPSD_BACKEND") if backend is None else os.environ.update(DOPSD_BACKEND=backend)
    return rc, buf.getvalue()


def train_in_process(out: Path, *sets: str) -> tuple[int, str]:
    args = ["train", "tiny-cpu", "--no-samples", "--no-progress", "--set", f"train.output_dir={json.dumps(str(out))}",
            "--set", "train.resume=auto"]
    return dopsd(*args, *[a for s in (*RUN, *sets) for a in ("--set", s)])


def reference_run(out: Path) -> list[dict]:
    rc, text = train_in_process(out)
    assert rc == 0, text[-4000:]
    return metrics_rows(out)


def resume(outcome: Outcome, out: Path, reference: list[dict], upto: int | None = None) -> None:
    """Resume the faulted run in ``out`` to the last step and measure it."""
    newest = list_checkpoints(out / "checkpoints")
    outcome.resumed_from = int(newest[-1].name.split("-")[1]) if newest else 0
    outcome.steps_lost = max(0, outcome.logged - outcome.resumed_from)
    outcome.resume_exit, text = train_in_process(out)
    outcome.tracebacks += text.count("Traceback")
    if outcome.resume_exit != 0:
        outcome.note += f" resume: {text[-1500:]}"
        return
    compare_rows(outcome, metrics_rows(out), reference, upto)
    outcome.corrupted += [c for c in corrupt_files(out) if c not in outcome.corrupted]


# ---------------------------------------------------------------- single-process faults

def run_process_fault(fault: Fault, tmp: Path, reference: list[dict]) -> Outcome:
    """A kill, signal or NaN in one `dopsd train` process, then a resume (in-process) to the last step."""
    out, p, o = tmp / "run", fault.draw(), Outcome(fault)
    planted = {"DOPSD_FAULT": json.dumps(p)} if "point" in p else {}
    o.expected_exit = {"sigterm": EXIT_STOPPED, "nan": 0}.get(fault.point, -signal.SIGKILL)
    if fault.point == "sigkill-startup" and p["prior"]:
        rc, text = train_in_process(out, f"train.steps={p['prior']}")
        assert rc == 0, text[-4000:]
    before = logged_steps(out)
    proc = train_process(out, *RUN, script=CHILD, **planted)
    try:
        if fault.point in ("sigkill-step", "sigterm"):
            wait_for_rows(out, p["rows"], proc)
            if fault.point == "sigkill-step":
                time.sleep(p["frac"] * metrics_rows(out)[-1]["sec"] * 1.5)     # into the next step or its save
            o.mid_run = proc.poll() is None
            proc.send_signal(signal.SIGKILL if fault.point == "sigkill-step" else signal.SIGTERM)
        elif fault.point == "sigkill-startup":
            time.sleep(p["delay"])
            o.mid_run = proc.poll() is None
            proc.kill()
        text = proc.communicate(timeout=600)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    o.exit = proc.returncode
    o.tracebacks += text.count("Traceback")
    if o.exit != o.expected_exit or "Traceback" in text:
        o.note += f" run: {text[-1500:]}"
    steps = logged_steps(out)
    o.logged = max(steps, default=0)
    if fault.point in ("sigkill-startup", "sigkill-base"):     # killed before its first step: the prior run's rows
        o.mid_run &= steps == before
        o.note += f"prior run: {p.get('prior', 0)} steps;"
    elif fault.point != "nan":                      # rows 1..n, the last step not reached
        o.mid_run &= steps == list(range(1, o.logged + 1)) and 1 <= o.logged < STEPS
    root = out / "checkpoints"
    if fault.point == "sigkill-save":               # the torn part is in the pending folder, never published
        o.mid_run &= (root / f"step-{p['step']:06d}.tmp").is_dir()
    if fault.point == "sigkill-prune":              # renamed into place, the oldest not yet (wholly) removed
        o.mid_run &= (root / f"step-{p['step']:06d}" / "state.json").is_file() and (
            len(list_checkpoints(root)) > 2 or any(root.glob("step-*.tmp")))
    if fault.point == "sigkill-base":               # killed in the write: nothing of a base in place yet
        o.mid_run &= not (out / "base.safetensors").exists() and (out / "base.safetensors.tmp").is_file()
    o.corrupted = corrupt_files(out)
    if fault.point == "nan":                        # trained on: the step was skipped, nothing else changed
        rows = metrics_rows(out)
        skipped = [r["step"] for r in rows if r.get("skipped")]
        o.mid_run = skipped == [p["step"]]
        compare_rows(o, rows, reference, upto=p["step"])
        o.corrupted += [f"{c}: not finite" for c in list_checkpoints(out / "checkpoints")
                        for f in c.glob("*.safetensors") if first_nonfinite(load_file(str(f))) is not None]
        return o
    resume(o, out, reference)
    return o


# ---------------------------------------------------------------- disk full

def mount_tmpfs(where: Path, size: str) -> str | None:
    """Mount a tmpfs of ``size`` at ``where``; the reason when this machine does not allow it."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return "mounting a tmpfs needs root and mount(8); not available here"
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                       text=True)
    return None if r.returncode == 0 else f"mount -t tmpfs refused: {r.stderr.strip() or r.returncode}"


def run_disk_full(fault: Fault, tmp: Path, reference: list[dict], skip) -> Outcome:
    """A run on a 16 MiB tmpfs with ``free`` bytes left: it must exit 2 naming the file it could not write, keep
    its complete checkpoints, and resume exactly once space is freed."""
    fs, p, o = tmp / "tmpfs", fault.draw(), Outcome(fault, expected_exit=2)
    reason = mount_tmpfs(fs, "16m")
    if reason:
        skip(reason)
    try:
        filler = fs / "filler"
        with open(filler, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(fs).free - p["free"])
        out = fs / "run"
        proc = train_process(out, *RUN, script=CHILD)
        text = proc.communicate(timeout=600)[0]
        o.exit = proc.returncode
        o.tracebacks += text.count("Traceback")
        named = re.search(rf"dopsd: error: .*{re.escape(str(out))}\S*.*(No space left on device|disk is full)", text)
        if not named:
            o.unnamed.append(text[-800:])
        steps = logged_steps(out)
        o.logged = max(steps, default=0)
        o.mid_run = steps == list(range(1, o.logged + 1)) and o.logged < STEPS
        o.note += f"failed after {o.logged} steps;"
        o.corrupted = corrupt_files(out)
        filler.unlink()
        if out.exists():
            resume(o, out, reference)
        else:
            o.note += " nothing written;"
    finally:
        subprocess.run(["umount", "-l", str(fs)], capture_output=True)
    return o


# ---------------------------------------------------------------- bad input corpora

PAYLOAD_YAML = "!!python/object/apply:os.system [\"touch {mark}\"]\n"


class Payload:
    """Pickled, this object runs ``touch MARK`` when unpickled: a file that executes code if anything loads it."""

    def __init__(self, mark: Path):
        self.mark = mark

    def __reduce__(self):
        return (os.system, (f"touch {self.mark}",))


def bad_config_cases(tmp: Path, mark: Path) -> list[tuple[str, list[str], str]]:
    """(name, `dopsd` args, the file or key the error must name)."""
    cases = []
    for name, content in [("syntax.yaml", b"model: {family: z_image\n  dim: [\n"),
                          ("latin1.yaml", b"model:\n  family: caf\xe9\n"),
                          ("list.yaml", b"- a\n- b\n"), ("empty.yaml", b""),
                          ("unknown.yaml", b"model: {family: z_image}\nmodle: {}\n"),
                          ("types.yaml", b"train: {steps: many}\n"),
                          ("payload.yaml", PAYLOAD_YAML.format(mark=mark).encode()),
                          ("payload-nested.yaml", f"train:\n  steps: {PAYLOAD_YAML.format(mark=mark)}".encode())]:
        (tmp / name).write_bytes(content)
        cases.append((name, ["train", str(tmp / name), "--no-progress", "--no-samples",
                             "--set", f"train.output_dir={json.dumps(str(tmp / 'out'))}"], str(tmp / name)))
    payload = PAYLOAD_YAML.format(mark=mark).strip()
    cases.append(("--set payload", ["train", "--no-progress", "--set", f"train.steps={payload}",
                                    "--set", f"train.output_dir={json.dumps(str(tmp / 'out'))}"], "train.steps"))
    return cases


def bad_checkpoint_cases(tmp: Path, mark: Path, source: Path, short: bool) -> list[tuple[str, list[str], str]]:
    """A copy of a finished run per case, its newest checkpoint damaged; resume (auto, or that checkpoint named
    from a new output_dir) must exit 2 naming the damaged file and write nothing there."""
    def damage(name, part, how):
        run = tmp / name
        shutil.copytree(source, run)
        newest = list_checkpoints(run / "checkpoints")[-1]
        f = newest / part
        if how == "truncate":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        elif how == "random":
            f.write_bytes(random.Random(name).randbytes(f.stat().st_size))
        elif how == "pickle":
            f.write_bytes(pickle.dumps(Payload(mark)))
        elif how == "nan":
            t = load_file(str(f))
            k = sorted(t)[0]
            t[k] = t[k].clone().view(-1).index_fill_(0, torch.tensor([0]), float("nan")).view(t[k].shape)
            save_file(t, str(f))
        elif how == "json-garbage":
            f.write_text('{"step": 8, "data": ')
        elif how == "json-types":
            f.write_text(json.dumps({**json.loads(f.read_text()), "step": "eight"}))
        elif how == "missing":
            f.unlink()
        return run, f

    kinds = [("truncated student", "student.safetensors", "truncate"),
             ("pickle as optimizer", "optimizer.safetensors", "pickle"),
             ("NaN teacher", "teacher.safetensors", "nan")]
    if not short:
        kinds += [("random-byte student", "student.safetensors", "random"),
                  ("torn state.json", "state.json", "json-garbage"),
                  ("state.json wrong type", "state.json", "json-types"), ("missing rng", "rng.safetensors", "missing"),
                  ("pickle as student", "student.safetensors", "pickle")]
    cases = []
    for n, (label, part, how) in enumerate(kinds):
        run, f = damage(f"run{n}", part, how)
        sets = [a for s in (f"train.output_dir={json.dumps(str(run))}", "train.resume=auto", *RUN)
                for a in ("--set", s)]
        cases.append((f"{label} (auto)", ["train", "tiny-cpu", "--no-progress", "--no-samples", *sets], str(f)))
    # the explicit path into a new output_dir: refused before that folder exists
    new = tmp / "new-run"
    sets = [a for s in (f"train.output_dir={json.dumps(str(new))}", f"train.resume={json.dumps(str(f.parent))}", *RUN)
            for a in ("--set", s)]
    cases.append((f"{label} (explicit path, new output_dir)",
                  ["train", "tiny-cpu", "--no-progress", "--no-samples", *sets], str(f)))
    return cases


def _image(path: Path, w: int, h: int, mode: str = "RGB", seed: int = 0, **save) -> None:
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    channels = len(Image.new(mode, (1, 1)).getbands())
    raw = torch.randint(0, 256, (h, w, channels), generator=g, dtype=torch.uint8).numpy()
    Image.fromarray(raw if channels > 1 else raw[..., 0]).convert(mode).save(path, **save)


def bad_data_cases(tmp: Path, mark: Path) -> list[tuple[str, list[str], str]]:
    """A folder of one good pair and one file of every bad kind: the run trains (exit 0) naming each skipped file;
    the same folder without the good pair exits 2 naming the folder."""
    data = tmp / "data"
    data.mkdir()
    _image(data / "good.png", 64, 64, seed=1)
    (data / "good.txt").write_text("a photo of a cat")
    (data / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    _image(data / "truncated.jpg", 200, 200, seed=5, quality=95)
    (data / "truncated.jpg").write_bytes((data / "truncated.jpg").read_bytes()[:4000])
    _image(data / "cmyk.jpg", 64, 64, mode="CMYK", seed=6)
    _image(data / "tiny.png", 8, 8, seed=7)
    _image(data / "nocaption.png", 64, 64, seed=8)
    _image(data / "latin1.png", 64, 64, seed=9)
    (data / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (data / "pickle.png").write_bytes(pickle.dumps(Payload(mark)))
    os.symlink("loop.png", data / "loop.png")
    os.mkfifo(data / "pipe.png")
    for n in ("corrupt", "truncated", "cmyk", "tiny", "pickle", "loop", "pipe"):
        (data / f"{n}.txt").write_text(n)
    meta = tmp / "meta"
    meta.mkdir()
    _image(meta / "0.png", 64, 64, seed=1)
    (meta / "metadata.jsonl").write_bytes(b"\n".join([json.dumps({"file_name": "0.png", "caption": "a cat"}).encode(),
                                                      b"{not json", b'{"file_name": "absent.png", "caption": "x"}',
                                                      b'{"file_name": "0.png", "caption": "caf\xe9"}']))
    sets = lambda path, out: [a for s in ("data.kind=folder", f"data.path={json.dumps(str(path))}", "data.buckets=1",
                                          "data.cache_dir=null", f"train.output_dir={json.dumps(str(out))}",
                                          "train.steps=1", "train.resume=null") for a in ("--set", s)]
    base = ["train", "tiny-cpu", "--no-progress", "--no-samples"]
    cases = [(f"{n} skipped", [*base, *sets(data, tmp / "out-data")], n) for n in
             ("corrupt.png", "truncated.jpg", "cmyk.jpg", "tiny.png", "nocaption.png", "latin1.png", "pickle.png",
              "loop.png", "pipe.png")]
    cases += [(f"{n} skipped", [*base, *sets(meta, tmp / "out-meta")], n)
              for n in ("metadata.jsonl:2", "absent.png", "metadata.jsonl:4")]
    bad = tmp / "nothing-usable"
    shutil.copytree(data, bad, symlinks=True,       # (not the FIFO: copying reads it)
                    ignore=lambda d, names: [n for n in names if n.startswith(("good", "pipe"))])
    cases.append(("nothing usable", [*base, *sets(bad, tmp / "out-none")], str(bad)))
    return cases


TINY_ARCH = dict(in_channels=3, dim=64, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                 axes_dims=[8, 12, 12], axes_lens=[256, 64, 64])


def bad_weights_cases(tmp: Path, mark: Path, base: Path) -> list[tuple[str, list[str], str]]:
    """model.pretrained folders with a damaged config.json or weights file: exit 2 naming it, nothing written."""
    cases = []
    for name, cfg, weights in [("config.json not JSON", b"{not json", None), ("config.json a list", b"[1, 2]", None),
                               ("weights random bytes", None, random.Random(0).randbytes(4096)),
                               ("weights truncated", None, base.read_bytes()[:100000]),
                               ("weights a pickle", None, pickle.dumps(Payload(mark)))]:
        folder = tmp / name.replace(" ", "-")
        folder.mkdir()
        (folder / "config.json").write_bytes(cfg if cfg is not None else json.dumps(TINY_ARCH).encode())
        weights = weights if weights is not None else base.read_bytes()
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(weights)
        named = folder / ("config.json" if cfg is not None else "diffusion_pytorch_model.safetensors")
        sets = [a for s in ("model.arch={}", f"model.pretrained={json.dumps(str(folder))}", "train.steps=1",
                            f"train.output_dir={json.dumps(str(tmp / 'out'))}", "train.resume=null")
                for a in ("--set", s)]
        cases.append((name, ["train", "tiny-cpu", "--no-progress", "--no-samples", *sets], str(named)))
    return cases


def run_corpus(fault: Fault, tmp: Path, reference_dir: Path) -> Outcome:
    """Every case of a bad-input corpus: no traceback, the file named, the expected exit, no payload run, and a
    refused run writes nothing into its output_dir (a corpus' output_dirs do not exist before)."""
    mark = tmp / "payload-ran"
    o = Outcome(fault, expected_exit=2)
    if fault.point == "bad-config":
        cases = bad_config_cases(tmp, mark)
    elif fault.point == "bad-checkpoint":
        cases = bad_checkpoint_cases(tmp, mark, reference_dir, short=not fault.long)
    elif fault.point == "bad-data":
        cases = bad_data_cases(tmp, mark)
    else:
        cases = bad_weights_cases(tmp, mark, reference_dir / "base.safetensors")
    o.cases, o.exit = len(cases), 2
    results = {}
    for name, args, named in cases:
        key = tuple(args)
        if key not in results:          # the data cases share runs: one run names every file of its folder
            out = Path(json.loads(next(a.split("=", 1)[1] for a in args if a.startswith("train.output_dir="))))
            existed = out.exists()
            rc, text = dopsd(*args)
            wrote = not existed and out.exists() and rc == 2
            results[key] = (rc, text, wrote)
        rc, text, wrote = results[key]
        want = 0 if fault.point == "bad-data" and name != "nothing usable" else 2
        if rc != want:
            o.exit = rc
            o.note += f" {name}: exit {rc} (expected {want});"
        if wrote:
            o.corrupted.append(f"{name}: the refused run created its output_dir")
        if "Traceback" in text:
            o.tracebacks += 1
            o.note += f" {name}: traceback;"
        if named not in text:
            o.unnamed.append(f"{name}: {named} not named in: {text[-600:]}")
    o.code_run = int(mark.exists())
    return o


# ---------------------------------------------------------------- 2-rank DeepSpeed faults (long suite)

def ds_reference_run(out: Path) -> list[dict]:
    from ds_launch import finish, torchrun
    finish(torchrun(out, *DS_RUN))
    return metrics_rows(out)


def run_rank_fault(fault: Fault, tmp: Path, reference: list[dict]) -> Outcome:
    """Rank 1 of 2 bare ranks SIGSTOPped or SIGKILLed mid-run: rank 0 must exit within timeout_s + 30 s (76 for a
    hung peer, non-zero for a dead one); then a torchrun resume reproduces the reference run."""
    from ds_launch import bare_ranks, torchrun

    out, p = tmp / "run", fault.draw()
    sig = signal.SIGSTOP if fault.point == "rank-stop" else signal.SIGKILL
    o = Outcome(fault, expected_exit=EXIT_HUNG if sig == signal.SIGSTOP else "non-zero")
    ranks = bare_ranks(out, *DS_RUN)
    try:
        wait_for_rows(out, p["rows"], ranks[0])
        o.mid_run = all(r.poll() is None for r in ranks)
        ranks[1].send_signal(sig)
        tic = time.monotonic()
        try:
            text = ranks[0].communicate(timeout=DS_TIMEOUT_S + 30)[0]
            o.exit_after_s = round(time.monotonic() - tic, 1)
        except subprocess.TimeoutExpired:
            text, o.exit_after_s = "", float("inf")
    finally:
        for r in ranks:
            if r.poll() is None:
                r.kill()
            r.communicate()
    o.exit = ranks[0].returncode
    if o.exit != o.expected_exit:
        o.note += f" rank 0: {text[-2500:]}"
    if o.expected_exit == "non-zero":
        o.expected_exit = o.exit if o.exit not in (0, None) else "non-zero"
    o.tracebacks += text.count("Traceback") if sig == signal.SIGSTOP else 0   # a dead peer: gloo's error may be one
    steps = logged_steps(out)
    o.logged = max(steps, default=0)
    o.mid_run &= steps == list(range(1, o.logged + 1)) and o.logged < STEPS
    o.corrupted = corrupt_files(out)
    newest = list_checkpoints(out / "checkpoints")
    o.resumed_from = int(newest[-1].name.split("-")[1]) if newest else 0
    o.steps_lost = max(0, o.logged - o.resumed_from)
    proc = torchrun(out, *DS_RUN)
    text = proc.communicate(timeout=600)[0]
    o.resume_exit = proc.returncode
    if proc.returncode == 0:
        compare_rows(o, metrics_rows(out), reference)
        o.corrupted += [c for c in corrupt_files(out) if c not in o.corrupted]
    else:
        o.note += f" resume: {text[-1500:]}"
    return o

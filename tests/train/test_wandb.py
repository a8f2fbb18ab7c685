"""train.report_to: [wandb] in wandb's offline mode: the rows metrics.jsonl holds, the run's config and the validation
grid reach the run files, a resumed run continues the same wandb run, and a run wandb cannot start is an error
saying what to do. (Without wandb installed: tests/test_install.py.)"""
import json

import pytest

from dopsd_fast.testing import tiny_trainer
from dopsd_fast.train.config import ConfigError, load_config
from dopsd_fast.train.trainer import make_trainer
from dopsd_fast.train.wandb_sink import RUN_ID_FILE, WandB

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

BLOCK, HEADER = 32768, 7      # wandb's run file: LevelDB-log blocks of records (crc32, length, type) after a header


def run_records(path) -> list:
    """The protobuf Records of an offline run's ``run-<id>.wandb`` file."""
    data, pos, part, out = path.read_bytes(), HEADER, b"", []
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:        # a block's tail too short for a record header is padding
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        part += data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):                      # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            out.append(record)
            part = b""
    return out


def logged(records) -> tuple[dict[int, dict], dict]:
    """({step: {key: value}} of the history rows, {config key: value} of the config updates)."""
    history, config = {}, {}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history.setdefault(items["_step"], {}).update(items)
        elif kind in ("config", "run"):
            update = r.config.update if kind == "config" else r.run.config.update
            config.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in update})
    return history, config


def test_wandb_offline_run_holds_the_rows_config_and_grid_and_a_resume_continues_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    sinks = ["train.report_to=[wandb,jsonl]", "train.checkpoint_every=1", "validation.every=2", "validation.pairs=1"]
    tiny_trainer(out, "train.steps=2", *sinks).train()
    make_trainer(load_config("tiny-cpu", [f"train.output_dir={out}", "train.resume=auto", "train.steps=3", *sinks]),
                 progress=False).train()
    wandb.teardown()        # the wandb-core process has written the run files out (finish() may return before)

    run_id = (out / RUN_ID_FILE).read_text().strip()
    files = sorted((tmp_path / "wandb-dir" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [f.name for f in files] == [f"run-{run_id}.wandb"] * 2          # the resume reopened the same run
    (first, config), (second, resumed_config) = (logged(run_records(f)) for f in files)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        history = (first if row["step"] <= 2 else second)[row["step"]]
        assert history["loss"] == row["loss"] and history["grad_norm"] == row["grad_norm"]
        assert [history[f"losses/{k}"] for k in range(len(row["losses"]))] == row["losses"]
    assert first[2]["validation/_type"] == second[3]["validation/_type"] == "image-file"      # the grids
    assert config["train"]["steps"] == 2 and config["train"]["report_to"] == ["wandb", "jsonl"]
    assert resumed_config["train"]["steps"] == 3 and config["method"] == resumed_config["method"]


def test_a_run_wandb_cannot_start_is_an_error_naming_the_ways_out(tmp_path, monkeypatch):
    def refuse(**kwargs):
        raise wandb.Error("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "init", refuse)
    with pytest.raises(ConfigError, match=r"train.report_to: \[wandb\]: wandb could not start the run \(api_key not "
                                          r"configured \(no-tty\)\); run `wandb login`, set WANDB_MODE=offline"):
        WandB(tmp_path, {}, resumed=False)

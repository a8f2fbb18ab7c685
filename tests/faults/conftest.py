"""The fault suite's session: the long cases run under `pytest -m faults` only (CI's `pytest -q tests bench` runs the
short ones), one table of every fault tried is printed at the end, and written as JSON + markdown into the folder
$DOPSD_FAULTS_TABLE names (the long run's table is committed under results/faults/)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

COLUMNS = ("faults tried", "survived", "steps lost (max)", "rows duplicated", "rows missing", "files corrupted",
           "tracebacks", "payloads run")


class Collector:
    def __init__(self):
        self.records: list[dict] = []

    def add(self, outcome) -> None:
        self.records.append(outcome.record())

    def table(self) -> list[dict]:
        rows: dict[str, dict] = {}
        for r in self.records:
            row = rows.setdefault(r["kind"], {"fault": r["kind"], **{c: 0 for c in COLUMNS}})
            row["faults tried"] += r["cases"]
            row["survived"] += r["cases"] if r["survived"] else 0
            row["steps lost (max)"] = max(row["steps lost (max)"], r["steps_lost"])
            row["rows duplicated"] += r["rows_duplicated"]
            row["rows missing"] += r["rows_missing"]
            row["files corrupted"] += r["files_corrupted"]
            row["tracebacks"] += r["tracebacks"]
            row["payloads run"] += r["code_run"]
            if r["exit_after_s"] is not None:
                row["survivor exit (s)"] = max(row.get("survivor exit (s)", 0), r["exit_after_s"])
        total = {"fault": "total", **{c: sum(x[c] for x in rows.values()) for c in COLUMNS}}
        total["steps lost (max)"] = max((x["steps lost (max)"] for x in rows.values()), default=0)
        return [*rows.values(), total]

    def markdown(self) -> str:
        table = self.table()
        extra = any("survivor exit (s)" in r for r in table)
        cols = ["fault", *COLUMNS] + (["survivor exit (s)"] if extra else [])
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in table]
        return "\n".join(lines)


COLLECTOR = Collector()


@pytest.fixture(scope="session")
def fault_log() -> Collector:
    return COLLECTOR


def _long_selected(config) -> bool:
    return "faults" in (config.option.markexpr or "")


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    skip = pytest.mark.skip(reason="long fault suite: run it with `pytest -m faults`")
    for item in items:
        if here in item.path.parents and not _long_selected(config):
            marker = item.get_closest_marker("faults")
            if marker is not None and marker.kwargs.get("long"):
                item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not COLLECTOR.records:
        return
    terminalreporter.write_sep("=", "fault injection")
    terminalreporter.write_line(COLLECTOR.markdown())
    for r in COLLECTOR.records:
        if not r["survived"]:
            terminalreporter.write_line(f"NOT SURVIVED {r['fault']}: {json.dumps(r)[:1500]}")
    folder = os.environ.get("DOPSD_FAULTS_TABLE")
    if folder:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "table.md").write_text(COLLECTOR.markdown() + "\n")
        (folder / "faults.json").write_text(json.dumps({"table": COLLECTOR.table(), "faults": COLLECTOR.records},
                                                       indent=1) + "\n")
        terminalreporter.write_line(f"fault table: {folder / 'table.md'}, {folder / 'faults.json'}")

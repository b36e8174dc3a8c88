"""The fault matrix's fixtures: step traces and the figures table (the cluster is `tests/conftest.py`'s).

Every row test records its figures with `figures(row, fault, ...)`; at the end
of the session they are written to `test-output/fault-matrix.md` and `.json`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults.matrix import Trace

OUTPUT_DIR = Path(__file__).resolve().parents[2] / "test-output"
_OUTCOME = pytest.StashKey[str]()
# Rows covered outside this directory, listed in the table for completeness.
ELSEWHERE = [{
    "row": 12, "fault": "bad inputs", "status": "see tests",
    "test": "tests/unit/test_bad_input.py; tests/cluster/test_membership.py (use_gpu without GPUs, resources no "
            "node can hold); tests/cluster/test_checkpoint.py (name in use); tests/cluster/test_events.py "
            "(unwritable event log)",
}]


class FaultMatrix:
    """Figures per row test, written as a Markdown table and JSON at the end of the session."""

    COLUMNS = ("row", "fault", "status", "detection_s", "recovery_s", "steps_redone", "restarts", "budget")

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, Any]] = {}

    def record(self, test: str, row: int, fault: str, **figures: Any) -> None:
        key = f"{test} {fault}"
        entry = self.entries.setdefault(key, {"row": row, "fault": fault, "test": test, "status": "running"})
        entry.update({k: v for k, v in figures.items() if v is not None})

    def rows(self) -> list[dict[str, Any]]:
        return sorted([*self.entries.values(), *ELSEWHERE], key=lambda e: (e["row"], e["test"]))

    def markdown(self) -> str:
        header = ["#", "fault", "status", "detection (s)", "recovery (s)", "steps redone", "restarts / budget",
                  "other figures", "test"]
        lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for e in self.rows():
            budget = e.get("budget")
            spent = "" if "restarts" not in e else f"{e['restarts']} / {'∞' if budget == -1 else budget}"
            other = ", ".join(f"{k}={_fmt(v)}" for k, v in e.items() if k not in (*self.COLUMNS, "test"))
            cells = [e["row"], e["fault"], e["status"], _fmt(e.get("detection_s")), _fmt(e.get("recovery_s")),
                     _fmt(e.get("steps_redone")), spent, other, e["test"]]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        return "\n".join(lines) + "\n"

    def write(self, directory: Path) -> None:
        if not self.entries:
            return
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "fault-matrix.json").write_text(json.dumps(self.rows(), indent=1, default=str) + "\n")
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        (directory / "fault-matrix.md").write_text(
            f"# Fault matrix ({stamp})\n\nRows as in docs RELIABILITY.md; times are wall-clock seconds on this "
            f"machine, under whatever load it had.\n\n" + self.markdown()
        )


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    return str(value)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" or report.failed:
        item.stash[_OUTCOME] = "passed" if report.passed else ("skipped" if report.skipped else "failed")


@pytest.fixture(scope="session")
def fault_matrix() -> Iterator[FaultMatrix]:
    matrix = FaultMatrix()
    yield matrix
    matrix.write(OUTPUT_DIR)


@pytest.fixture
def figures(fault_matrix: FaultMatrix, request: pytest.FixtureRequest) -> Iterator[Any]:
    """`figures(row, fault, detection_s=..., recovery_s=..., steps_redone=..., restarts=..., budget=..., **more)`.

    One table line per (test, fault); a test that measures two runs names two faults.
    """
    test = request.node.nodeid

    def record(row: int, fault: str, **values: Any) -> None:
        fault_matrix.record(test, row, fault, **values)

    yield record
    for entry in fault_matrix.entries.values():
        if entry["test"] == test:
            entry["status"] = request.node.stash.get(_OUTCOME, "error")


@pytest.fixture
def trace(tmp_path: Path) -> Trace:
    return Trace(tmp_path / "trace")


"""Run `ray_elastic.run` in a thread while the test drives the cluster from the main thread."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import ray_elastic


class BackgroundRun:
    """`ray_elastic.run(...)` in a thread; its events are followed through the JSON-lines log."""

    def __init__(self, tmp_path: Path, train_fn: Any, **kwargs: Any):
        self.events_path = tmp_path / f"events-{time.monotonic_ns()}.jsonl"
        kwargs.setdefault("progress", "none")
        self._kwargs = dict(kwargs, event_log_path=str(self.events_path))
        self._train_fn = train_fn
        self.result: Any = None
        self.error: BaseException | None = None
        self.ended_at: float | None = None  # time.time() when run returned or raised
        self._thread = threading.Thread(target=self._target, daemon=True)
        self._thread.start()

    def _target(self) -> None:
        try:
            self.result = ray_elastic.run(self._train_fn, **self._kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc
        finally:
            self.ended_at = time.time()

    def alive(self) -> bool:
        """True while `run` has not returned or raised."""
        return self._thread.is_alive()

    def events(self) -> list[dict]:
        if not self.events_path.exists():
            return []
        return [json.loads(line) for line in self.events_path.read_text().splitlines() if line.strip()]

    def wait_for(self, kind: str, count: int = 1, timeout_s: float = 90.0, **data: Any) -> dict:
        """Block until `count` events of `kind` (with matching data fields) were logged."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            matching = [
                e for e in self.events()
                if e["kind"] == kind and all(e["data"].get(k) == v for k, v in data.items())
            ]
            if len(matching) >= count:
                return matching[count - 1]
            if not self._thread.is_alive():
                raise AssertionError(f"run ended before {count} {kind!r} event(s): {self.error!r}")
            time.sleep(0.05)
        seen = [e["kind"] for e in self.events()]
        raise AssertionError(f"no {count} {kind!r} event(s) within {timeout_s}s; saw {seen}\n{self.stacks_text()}")

    def stacks_text(self) -> str:
        """Where every rank of the still running run is now (for a failure message)."""
        run_ids = {e["run_id"] for e in self.events()}
        if not self.alive() or len(run_ids) != 1:
            return "(no stacks: the run is not running)"
        try:
            ranks = ray_elastic.stacks(run_ids.pop(), timeout_s=5)
        except Exception as exc:  # noqa: BLE001 - a diagnostic only
            return f"(no stacks: {exc!r})"
        return "\n".join(f"--- rank {s.rank} (pid {s.pid}, round {s.round_id}) {s.collective} {s.note}\n{s.stack}"
                         for s in ranks)

    def join(self, timeout_s: float = 180.0) -> Any:
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise AssertionError(f"run still going after {timeout_s}s")
        if self.error is not None:
            raise self.error
        return self.result

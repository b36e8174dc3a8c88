"""Run metrics exported through `ray.util.metrics` (Prometheus, via each node's Ray metrics agent).

The coordinator owns one `MetricsExporter` and the controller feeds it through
three calls: every event, the moment a failure is detected, and rank 0's
reports. Exported, each tagged with `run_id` (Ray prefixes names with `ray_`):

| name (as scraped)                      | kind    | meaning                                               |
| -------------------------------------- | ------- | ----------------------------------------------------- |
| ray_elastic_world_size                 | gauge   | workers in the current round                          |
| ray_elastic_num_nodes                  | gauge   | nodes in the current round                            |
| ray_elastic_round_id                   | gauge   | id of the current round                               |
| ray_elastic_restarts                   | gauge   | restarts spent so far (the failure budget used)       |
| ray_elastic_restarts_total             | counter | the same, as a counter                                |
| ray_elastic_recovery_seconds           | gauge   | last failure detected -> next round formed            |
| ray_elastic_step_seconds               | gauge   | time between rank 0's last two reports (one step)     |
| ray_elastic_step                       | gauge   | rank 0's last reported `step`                         |

`values` holds the last value of each, so the exporter can be read back directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ray_elastic.events import Event

_GAUGES = {
    "world_size": "Workers in the current round.",
    "num_nodes": "Nodes in the current round.",
    "round_id": "Id of the current round.",
    "restarts": "Restarts spent so far (failure budget used).",
    "recovery_seconds": "Seconds from the last failure detected to the next round formed.",
    "step_seconds": "Seconds between rank 0's last two reports.",
    "step": "Rank 0's last reported step.",
}
_COUNTERS = {"restarts_total": "Restarts spent so far."}


def _ray_gauge(name: str, description: str) -> Any:
    from ray.util.metrics import Gauge

    return Gauge(name, description, tag_keys=("run_id",))


def _ray_counter(name: str, description: str) -> Any:
    from ray.util.metrics import Counter

    return Counter(name, description, tag_keys=("run_id",))


class MetricsExporter:
    """Turns controller events and rank 0's reports into gauges and counters.

    Args:
        run_id: the `run_id` tag on every series.
        make_gauge, make_counter: `(name, description) -> metric` with `set`/`inc(value, tags=)`;
            Ray's by default (names get the `elastic_` prefix here, `ray_` from Ray).
    """

    def __init__(
        self,
        run_id: str,
        make_gauge: Callable[[str, str], Any] = _ray_gauge,
        make_counter: Callable[[str, str], Any] = _ray_counter,
    ):
        self.tags = {"run_id": run_id}
        self._gauges = {name: make_gauge(f"elastic_{name}", text) for name, text in _GAUGES.items()}
        self._counters = {name: make_counter(f"elastic_{name}", text) for name, text in _COUNTERS.items()}
        self.values: dict[str, float] = {}
        self._failure_detected_at: float | None = None
        self._last_report_time: float | None = None

    def _set(self, name: str, value: float) -> None:
        self.values[name] = float(value)
        self._gauges[name].set(float(value), tags=self.tags)

    def _inc(self, name: str, by: float) -> None:
        if by <= 0:
            return
        self.values[name] = self.values.get(name, 0.0) + by
        self._counters[name].inc(by, tags=self.tags)

    def on_failure_detected(self, now: float) -> None:
        """A round failed (crash, hang, exception, node loss): recovery starts now (controller clock)."""
        if self._failure_detected_at is None:
            self._failure_detected_at = now

    def on_event(self, event: Event, now: float) -> None:
        """Update from one controller event; `now` is the controller's clock."""
        if event.kind == "round_formed":
            self._set("world_size", event.data.get("world_size", 0))
            self._set("num_nodes", event.data.get("num_nodes", 0))
            self._set("round_id", event.round_id)
            if self._failure_detected_at is not None:
                self._set("recovery_seconds", max(0.0, now - self._failure_detected_at))
                self._failure_detected_at = None
            self._last_report_time = None  # no step time across a re-form
        elif event.kind == "restart":
            restarts = float(event.data.get("restarts", self.values.get("restarts", 0.0) + 1))
            self._inc("restarts_total", restarts - self.values.get("restarts_total", 0.0))
            self._set("restarts", restarts)
        elif event.kind in ("finished", "failed", "aborted"):
            self._set("world_size", 0)
            self._set("num_nodes", 0)

    def on_reports(self, reports: list[tuple[float, dict[str, Any]]]) -> None:
        """Rank 0's reports `(wall time, metrics)`, oldest first: step time and step."""
        for stamp, metrics in reports:
            if self._last_report_time is not None and stamp > self._last_report_time:
                self._set("step_seconds", stamp - self._last_report_time)
            self._last_report_time = stamp
            step = metrics.get("step")
            if isinstance(step, (int, float)) and not isinstance(step, bool):
                self._set("step", step)

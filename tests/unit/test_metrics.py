"""MetricsExporter: what each event and report sets (recording metrics stand in for Ray's)."""

from __future__ import annotations

from ray_elastic.events import Event
from ray_elastic.metrics import MetricsExporter


class Recorded:
    """A metric that keeps what it was given: the (value, tags) of each set or inc."""

    def __init__(self, name: str, description: str):
        self.name, self.description = name, description
        self.calls: list[tuple[float, dict]] = []

    def set(self, value: float, tags: dict) -> None:
        self.calls.append((value, tags))

    def inc(self, value: float, tags: dict) -> None:
        self.calls.append((value, tags))


def _exporter() -> tuple[MetricsExporter, dict[str, Recorded]]:
    made: dict[str, Recorded] = {}

    def make(name: str, description: str) -> Recorded:
        made[name] = Recorded(name, description)
        return made[name]

    return MetricsExporter("run-1", make_gauge=make, make_counter=make), made


def _event(kind: str, round_id: int = 0, **data) -> Event:
    return Event(kind, "run-1", round_id, "STATE", kind, data=data)


def test_failure_to_next_round_is_the_recovery_time():
    exporter, made = _exporter()
    exporter.on_event(_event("round_formed", 0, world_size=4, num_nodes=4), now=10.0)
    assert "recovery_seconds" not in exporter.values, "the first round is no recovery"
    exporter.on_failure_detected(now=20.0)
    exporter.on_failure_detected(now=21.0)  # a second rank failing in the same round: still the first moment
    exporter.on_event(_event("restart", 0, restarts=1), now=20.5)
    exporter.on_event(_event("round_formed", 1, world_size=3, num_nodes=3), now=22.5)
    assert exporter.values["recovery_seconds"] == 2.5
    assert exporter.values["world_size"] == 3 and exporter.values["num_nodes"] == 3
    assert exporter.values["round_id"] == 1
    assert exporter.values["restarts"] == 1 and exporter.values["restarts_total"] == 1
    assert made["elastic_world_size"].calls[-1] == (3.0, {"run_id": "run-1"})
    exporter.on_event(_event("scale_up", 1), now=30.0)
    exporter.on_event(_event("round_formed", 2, world_size=4, num_nodes=4), now=31.0)
    assert exporter.values["recovery_seconds"] == 2.5, "a scale-up is not a recovery"


def test_restart_counter_counts_each_restart_once():
    exporter, made = _exporter()
    for restarts in (1, 2, 2, 3):
        exporter.on_event(_event("restart", restarts=restarts), now=0.0)
    assert exporter.values["restarts_total"] == 3
    assert [value for value, _ in made["elastic_restarts_total"].calls] == [1, 1, 1]


def test_step_time_from_rank0_reports_and_not_across_rounds():
    exporter, _ = _exporter()
    exporter.on_event(_event("round_formed", 0, world_size=2, num_nodes=2), now=0.0)
    exporter.on_reports([(100.0, {"step": 1}), (100.25, {"step": 2})])
    exporter.on_reports([(100.75, {"step": 3, "loss": 0.1})])
    assert exporter.values["step_seconds"] == 0.5 and exporter.values["step"] == 3
    exporter.on_event(_event("round_formed", 1, world_size=2, num_nodes=2), now=5.0)
    exporter.on_reports([(130.0, {"step": 4})])
    assert exporter.values["step_seconds"] == 0.5, "the gap across a re-form is not a step"


def test_terminal_events_zero_the_size():
    exporter, _ = _exporter()
    exporter.on_event(_event("round_formed", 0, world_size=2, num_nodes=2), now=0.0)
    exporter.on_event(_event("finished"), now=1.0)
    assert exporter.values["world_size"] == 0 and exporter.values["num_nodes"] == 0

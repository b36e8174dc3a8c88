"""Structured events: every coordinator transition, with its reason."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

logger = logging.getLogger("ray_elastic")


@dataclass(frozen=True)
class Event:
    """One thing that happened to a run.

    `kind` is one of: round_formed, worker_lost, node_lost, restart,
    scale_up, scale_down, waiting, node_ready, finished, failed, aborted.
    """

    kind: str
    run_id: str
    round_id: int
    state: str
    message: str
    time: float = field(default_factory=time.time)
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str, sort_keys=True)


@dataclass(frozen=True)
class RoundRecord:
    """A round in the run's history: id, size, when it started, and why."""

    round_id: int
    world_size: int
    num_nodes: int
    started_at: float
    cause: str


class EventLog:
    """Keeps events in order, mirrors them to the log and an optional JSON-lines file."""

    def __init__(self, run_id: str, path: str | None = None):
        self.run_id = run_id
        self.events: list[Event] = []
        self._path = path

    def emit(self, kind: str, round_id: int, state: str, message: str, **data: Any) -> Event:
        event = Event(kind, self.run_id, round_id, state, message, data=data)
        self.events.append(event)
        logger.info("[%s round %d %s] %s", self.run_id, round_id, state, message)
        if self._path:
            with open(self._path, "a", encoding="utf-8") as out:
                out.write(event.to_json() + "\n")
        return event

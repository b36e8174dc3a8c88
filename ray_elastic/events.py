"""Structured events: every coordinator transition, with its reason."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

logger = logging.getLogger("ray_elastic")


@dataclass(frozen=True)
class Event:
    """One thing that happened to a run.

    `kind` is one of: round_formed, worker_lost, node_lost, restart,
    scale_up, scale_down, waiting, node_ready, finished, failed, aborted; and, sent by
    a worker, restored_from_storage (sharded state whose shards and replicas were lost).
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


def resolve_log_path(path: str | None) -> str | None:
    """Make an event-log path absolute and check it can be appended to, before any actor starts.

    The coordinator writes the file, on the driver's node but from its own working
    directory, so a relative path is resolved against the driver's.

    Raises:
        ConfigError: the file cannot be opened for appending.
    """
    if path is None:
        return None
    from ray_elastic.errors import ConfigError

    resolved = os.path.abspath(os.fspath(path))
    try:
        with open(resolved, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"event_log_path {path!r} cannot be written ({exc.strerror}); pass a file in an existing, "
            f"writable directory, or None."
        ) from exc
    return resolved


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

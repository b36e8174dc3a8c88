"""Structured events: every coordinator transition, with its reason."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("ray_elastic")


@dataclass(frozen=True)
class Event:
    """One thing that happened to a run.

    `kind` is one of: round_formed, worker_lost, node_lost, restart,
    scale_up, scale_down, waiting, node_ready, snapshot, finished, failed, aborted,
    drain (Ray is draining a node of the round: `data` has node_id, reason,
    deadline (epoch seconds or None) and path: "commit" (left at the next
    commit), "crash" (too close to the deadline: dropped as a crash),
    "withdrawn", or "handover" (a drained worker handed the last commit to
    the next round: `to`, `ok`)); commit_lost (no member of a new round holds a
    commit although the run committed: `step`, `from_storage`); shards_handed_over
    (a rank killed for staying in an aborted round first gave the sharded
    commits it held to a rank that left: `rank`, `to_rank`, `shards`); workers_started
    (new workers, held back after a failure while the survivors recovered, were started:
    `started`, `waited_s`); and, sent by a
    worker, restored_from_storage (sharded state whose shards and replicas were lost).
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
    directory, so a relative path is resolved against the driver's (lexically: no
    '..' is left for anyone to reinterpret). The file is created owner-only, and a
    symbolic link at the path is refused, here and at every write.

    Raises:
        ConfigError: the file cannot be opened for appending, or is a link or not a regular file.
    """
    if path is None:
        return None
    from ray_elastic.errors import ConfigError
    from ray_elastic.safepath import absolute, is_link, open_append

    resolved = absolute(path)
    if is_link(resolved):
        raise ConfigError(
            f"event_log_path {os.fspath(path)!r} is a symbolic link ({resolved} -> {os.readlink(resolved)}); the "
            f"event log is never written through a link. Pass the real file's path."
        )
    try:
        with open_append(resolved):
            pass
    except OSError as exc:
        raise ConfigError(
            f"event_log_path {os.fspath(path)!r} cannot be written ({exc.strerror or exc}); pass a regular file "
            f"in an existing, writable directory, or None."
        ) from exc
    return str(resolved)


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
            from ray_elastic.safepath import open_append

            try:
                with open_append(Path(self._path)) as out:
                    out.write(event.to_json() + "\n")
            except OSError as exc:  # a link planted there, or the disk went away: the run goes on
                logger.error("event log %s not written (%s); events stay in RunResult.events", self._path, exc)
        return event

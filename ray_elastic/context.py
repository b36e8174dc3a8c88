"""What a running train_fn can ask about its place in the run.

A worker process runs one train_fn at a time, so the active session is a
per-process value set by the worker before it calls train_fn.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ray_elastic.snapshot import SnapshotHolder


WORKER_EVENT = "__ray_elastic_event__"  # key of a report that carries an event (`Session.add_event`)


@dataclass(frozen=True)
class TrainContext:
    """The caller's place in the current round (see DESIGN.md, section 2)."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    restart_count: int
    round_id: int
    run_id: str
    node_id: str
    device: torch.device


class Session:
    """Per-round glue between train_fn and its worker: progress, reports, stop requests."""

    def __init__(
        self,
        context: TrainContext,
        snapshots: SnapshotHolder,
        checkpointer: Any = None,
        on_stop_check: Callable[[], bool] | None = None,
        collective_timeout_s: float | None = None,
        set_busy: Callable[[str | None], None] | None = None,
    ):
        self.context = context
        self.collective_timeout_s = collective_timeout_s  # None: torch's default
        # Says (with a description; None when done) that the training thread is inside a long wait that is not a
        # hang, such as forming a process group: the coordinator then gives it `hang_timeout_s`, not less.
        self.set_busy: Callable[[str | None], None] = set_busy or (lambda what: None)
        self.snapshots = snapshots
        self.checkpointer = checkpointer
        self._stop_requested = on_stop_check or (lambda: False)
        self._lock = threading.Lock()
        self.reports: deque[tuple[float, dict[str, Any]]] = deque()
        self._first_seq = 0  # sequence number of reports[0]
        self.last_metrics: dict[str, Any] | None = None
        self.progress_count = 0
        self.last_progress = time.monotonic()
        self.last_committed_step: int | None = None
        self._interrupt_handlers: list[Callable[[str], None]] = []
        self._interrupted: str | None = None  # the round's interrupt so far ("abort" outranks "stop")
        # Processes running this rank's training outside the worker (a script subprocess): `stacks` reads
        # theirs with py-spy.
        self.subprocess_pids: list[int] = []
        # (work, flag) of the stop-flag all-reduce the last commit started (see State.commit).
        self.pending_agreement: tuple[Any, Any] | None = None
        self._on_return: list[Callable[[], None]] = []  # run when train_fn returns (see `train_fn_returned`)
        self._on_progress: list[Callable[[], None]] = []  # run at every progress point (see `mark_progress`)

    def add_interrupt_handler(self, handler: Callable[[str], None]) -> None:
        """Call `handler(reason)` when the round is aborted ("abort") or asked to stop ("stop").

        For train_fns that wait on something other than collectives (a subprocess,
        say), so that they can leave the round promptly. A handler added after the round was interrupted, or
        asked to stop, is called at once: the request may come while train_fn is still setting up. A handler
        may be called more than once.
        """
        with self._lock:
            self._interrupt_handlers.append(handler)
            already = self._interrupted
        if already is None and self.stop_requested():
            already = "stop"
        if already is not None:
            handler(already)

    def interrupt(self, reason: str) -> None:
        with self._lock:
            if self._interrupted != "abort":
                self._interrupted = reason
            handlers = list(self._interrupt_handlers)
        for handler in handlers:
            handler(reason)

    def finish_agreement(self) -> bool:
        """Wait for the stop-flag all-reduce the last commit started; True if any rank asked to stop."""
        pending, self.pending_agreement = self.pending_agreement, None
        if pending is None:
            return False
        work, flag = pending
        work.wait()
        return bool(flag.item())

    def on_train_fn_return(self, callback: Callable[[], None]) -> None:
        """Call `callback()` when train_fn returns, before the round ends (to finish background work)."""
        self._on_return.append(callback)

    def train_fn_returned(self) -> None:
        for callback in list(self._on_return):
            callback()

    def add_event(self, kind: str, message: str, **data: Any) -> None:
        """Have the coordinator log an event of this rank (it travels with the reports, not as a metric)."""
        with self._lock:
            self.reports.append((time.time(), {WORKER_EVENT: {"kind": kind, "message": message, "data": data}}))

    def on_progress(self, callback: Callable[[], None]) -> None:
        """Call `callback()` at every progress point of the round (a commit, a report), on train_fn's thread."""
        self._on_progress.append(callback)

    def mark_progress(self) -> None:
        self.progress_count += 1
        self.last_progress = time.monotonic()
        for callback in self._on_progress:
            callback()

    def stop_requested(self) -> bool:
        return self._stop_requested()

    def add_report(self, metrics: dict[str, Any]) -> None:
        with self._lock:
            self.last_metrics = dict(metrics)
            self.reports.append((time.time(), self.last_metrics))
        self.mark_progress()

    def unacknowledged_reports(self, acked_seq: int = -1) -> tuple[int, list[tuple[float, dict[str, Any]]]]:
        """Forget reports up to `acked_seq` (the coordinator has them); return (first seq, the rest).

        Reports are kept until acknowledged, so an answer lost at the end of a round
        costs nothing: the round's outcome carries whatever was not acknowledged.
        """
        with self._lock:
            while self.reports and self._first_seq <= acked_seq:
                self.reports.popleft()
                self._first_seq += 1
            return self._first_seq, list(self.reports)


_active: Session | None = None


def set_session(session: Session | None) -> None:
    global _active
    _active = session


def get_session() -> Session:
    if _active is None:
        raise RuntimeError(
            "No ray_elastic session is active: get_context(), report() and State() "
            "only work inside a train_fn started by ray_elastic.run."
        )
    return _active


def get_context() -> TrainContext:
    """Return the calling worker's :class:`TrainContext`.

    Raises:
        RuntimeError: outside a train_fn run by ray_elastic.
    """
    return get_session().context


def report(metrics: dict[str, Any]) -> None:
    """Record metrics of this step; rank 0's last report becomes `RunResult.metrics`.

    Cheap: it stays in the worker's memory until the coordinator's next heartbeat.
    """
    if not isinstance(metrics, dict):
        raise TypeError(f"report() takes a dict of metrics, got {type(metrics).__name__}.")
    get_session().add_report(metrics)

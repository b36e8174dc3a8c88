"""What the coordinator heard from each member of a round, and the pure rule that judges it.

Two channels (see `ray_elastic.pulse`):

- probes, answered by a Python thread of the worker: they carry progress and reports,
  and need the GIL;
- the native pulse, answered by a C++ thread: asked only when a probe is overdue,
  it tells a busy process (a call holding the GIL) from a stopped or unreachable one.

A member is lost to silence when a probe has waited more than `probe_timeout_s`
and a native check started after the last sign of life failed. Nothing is judged
from a probe that was never sent, so a coordinator that was itself slow never
blames its workers for it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ray_elastic.coordinator.types import Heartbeat, Pulse

OK, CHECK, LOST, GONE = "ok", "check", "lost", "gone"


def verdict(pending_since: float | None, alive_at: float, failed_at: float, gone: bool, now: float,
            probe_timeout_s: float) -> str:
    """Judge one worker from its signals.

    Args:
        pending_since: when the probe it has not answered yet was sent (None: none outstanding).
        alive_at: the last time its native pulse answered.
        failed_at: the last time a native check of it failed (no answer, or no native channel).
        gone: a native check found its process gone (connection refused).
        now: the coordinator's clock.
        probe_timeout_s: the silence bound.

    Returns:
        GONE (its process exited), LOST (silent on both channels), CHECK (ask its native
        pulse now), or OK.
    """
    if gone:
        return GONE
    if pending_since is None:
        return OK
    heard = max(pending_since, alive_at)
    waited = now - heard
    if waited <= probe_timeout_s / 2:
        return OK
    if waited > probe_timeout_s and failed_at >= heard:
        return LOST
    return CHECK


@dataclass
class Liveness:
    """Signals per member of one round (plain bookkeeping; `verdict` decides)."""

    pending_since: dict[str, float] = field(default_factory=dict)
    alive_at: dict[str, float] = field(default_factory=dict)
    failed_at: dict[str, float] = field(default_factory=dict)
    native: dict[str, str] = field(default_factory=dict)  # the last native answer per worker
    gone: set[str] = field(default_factory=set)
    busy: dict[str, str] = field(default_factory=dict)  # what a worker said it is busy with, if anything
    busy_seen_at: dict[str, float] = field(default_factory=dict)  # the last answer that said it was busy
    busy_announced: set[str] = field(default_factory=set)  # "busy, not lost" events already emitted

    def probed(self, members: Iterable[str], beats: list[Heartbeat], now: float) -> None:
        """After `WorkerGroup.probe`: members that answered, or had none outstanding, got a probe now."""
        answered = {b.worker_id for b in beats}
        for beat in beats:
            self.busy[beat.worker_id] = beat.busy
            if beat.busy:
                self.busy_seen_at[beat.worker_id] = now
        for worker_id in members:
            if worker_id in answered or worker_id not in self.pending_since:
                self.pending_since[worker_id] = now

    def pulsed(self, pulses: list[Pulse], now: float) -> None:
        for pulse in pulses:
            self.native[pulse.worker_id] = pulse.state
            if pulse.state == "alive":
                self.alive_at[pulse.worker_id] = now
            elif pulse.state == "gone":
                self.gone.add(pulse.worker_id)
            else:
                self.failed_at[pulse.worker_id] = now

    def verdicts(self, workers: Iterable[str], now: float, probe_timeout_s: float) -> dict[str, str]:
        return {
            w: verdict(self.pending_since.get(w), self.alive_at.get(w, float("-inf")),
                       self.failed_at.get(w, float("-inf")), w in self.gone, now, probe_timeout_s)
            for w in workers
        }

    def silent_for(self, worker_id: str, now: float) -> float:
        """Seconds since the last sign of life (a probe answer or a native answer)."""
        heard = max(self.pending_since.get(worker_id, now), self.alive_at.get(worker_id, float("-inf")))
        return now - heard

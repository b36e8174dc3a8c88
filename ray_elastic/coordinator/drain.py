"""Node drains: Ray's notice that a node is going away, and what the run does about it.

What Ray 2.60 tells a client: the GCS keeps, for every node a `DrainNode` request was
accepted for (`ray drain-node`, autoscaler v2, KubeRay), its deadline in epoch
milliseconds (0: none), read with `GcsClient.get_draining_nodes()` (about 0.4 ms here).
The node stays alive and keeps its running actors; it accepts no new work (a placement
group or actor pinned to it stays pending), it exits by itself as soon as it is idle,
and it is still listed as draining after its deadline if nothing killed it: the deadline
is a promise by the caller, who kills the node then. The drain's reason and message are
not exposed while the node lives (they appear as `DeathReason`/`DeathReasonMessage` in
`ray.nodes()` once it has exited). A drain for idle termination is rejected by the
raylet of a node that holds any work (the run's placement group is work), so a drain
accepted for a node of the run is a preemption; a drain cannot be withdrawn once
accepted. An idle-termination drain that was rejected is how a drain is "cancelled" in
Ray 2.60: the node never leaves. If a notice ever disappears while the node lives, the
node is eligible again.

What the run does (the pure decisions are here; the controller acts):
- a member node with a notice and time to spare is left at the next commit: the same
  stop-at-commit as a scale-up, so no step is redone and no restart is charged;
- when the deadline is too close for that (closer than two steps plus `drain_margin_s`:
  a stop asked now takes effect at the commit after next), the node's ranks are dropped
  at once as if the node had crashed (the uncommitted step is redone, one restart is
  charged), which beats waiting for the kill and a broken collective;
- a node with a notice is never chosen for a round; its idle workers are released at
  once, so Ray can let it go before the deadline.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

logger = logging.getLogger("ray_elastic")

# What Ray's drain requests say, as far as the run can tell (see the module docstring).
PREEMPTION = "preemption"


@dataclass(frozen=True)
class DrainNotice:
    """A node Ray is draining.

    Attributes:
        node_id: the node.
        deadline: when it will be killed, on the controller's (monotonic) clock; None: no deadline.
        deadline_wall: the same moment in `time.time()` seconds, for events; None: no deadline.
        reason: "preemption" (the only drain Ray accepts for a node that holds work).
    """

    node_id: str
    deadline: float | None
    deadline_wall: float | None = None
    reason: str = PREEMPTION

    def remaining_s(self, now: float) -> float:
        """Seconds left until the deadline (infinite without one; negative once past)."""
        return math.inf if self.deadline is None else self.deadline - now

    def describe(self, now: float) -> str:
        if self.deadline is None:
            return f"{self.reason}, no deadline"
        return f"{self.reason}, deadline in {self.remaining_s(now):.1f}s"


@dataclass(frozen=True)
class DrainDecision:
    """What to do about the round's drained nodes.

    Attributes:
        leave: nodes to leave at the next commit (newly noticed).
        crash: nodes to drop now, without a commit: too little time left.
        withdrawn: nodes that were leaving but whose notice is gone: they stay.
    """

    leave: tuple[str, ...] = ()
    crash: tuple[str, ...] = ()
    withdrawn: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.leave or self.crash or self.withdrawn)


def time_needed_s(seconds_per_step: float | None, margin_s: float) -> float:
    """How long leaving at a commit may take: a stop seen now is agreed on at the next commit and
    applied at the one after, so up to two steps, plus the margin."""
    return margin_s + 2.0 * (seconds_per_step or 0.0)


def decide(
    members: Sequence[str],
    notices: Mapping[str, DrainNotice],
    leaving: Collection[str],
    now: float,
    seconds_per_step: float | None,
    margin_s: float,
    replacement_ready: bool = False,
) -> DrainDecision:
    """Decide, for the nodes of the running round, which to leave at a commit and which to drop now.

    When every node of the round is drained, leaving would leave nobody holding the commit: the
    round trains on until a node is ready to take over (it receives the commit when the round
    re-forms), or until the deadline comes within twice the time a commit needs.

    Args:
        members: node ids of the round.
        notices: drain notices by node id (any node of the cluster).
        leaving: nodes already being left at the next commit.
        now: the controller's clock (the notices' deadlines are on it).
        seconds_per_step: the run's recent step time, None if not known yet.
        margin_s: time kept in hand before a deadline.
        replacement_ready: a node group that is not drained is ready to join.

    Returns:
        The decision; empty when nothing changes.
    """
    leave: list[str] = []
    crash: list[str] = []
    withdrawn: list[str] = []
    needed = time_needed_s(seconds_per_step, margin_s)
    last_holders = bool(members) and all(n in notices for n in members) and not replacement_ready
    for node_id in members:
        notice = notices.get(node_id)
        if notice is None:
            if node_id in leaving:
                withdrawn.append(node_id)
            continue
        remaining = notice.remaining_s(now)
        if node_id in leaving:
            if remaining <= 0:  # still in the round at its deadline: it is being killed now
                crash.append(node_id)
            continue
        if remaining < needed:
            crash.append(node_id)
        elif not (last_holders and remaining >= 2 * needed):
            leave.append(node_id)
    return DrainDecision(tuple(leave), tuple(crash), tuple(withdrawn))


@dataclass
class StepClock:
    """The run's recent seconds per committed step, from (time, step) observations.

    Observations come from heartbeats, so they are as coarse as the probe interval; the
    estimate spans up to `window` step changes, which evens that out.
    """

    window: int = 8
    _samples: deque[tuple[float, int]] = field(default_factory=deque)

    def reset(self) -> None:
        self._samples.clear()

    def observe(self, now: float, step: int | None) -> None:
        if step is None or (self._samples and step <= self._samples[-1][1]):
            return
        self._samples.append((now, step))
        while len(self._samples) > self.window:
            self._samples.popleft()

    def seconds_per_step(self) -> float | None:
        if len(self._samples) < 2:
            return None
        (t0, s0), (t1, s1) = self._samples[0], self._samples[-1]
        return (t1 - t0) / (s1 - s0)


@dataclass
class DrainTracker:
    """The controller's memory of drains: nodes being left, the step clock of the round, and the
    round asked to stop for a drain."""

    leaving: set[str] = field(default_factory=set)
    clock: StepClock = field(default_factory=StepClock)
    round_id: int = -1
    stopped_round: int = -1


def read_draining_nodes(now: float, timeout_s: float = 2.0) -> dict[str, DrainNotice] | None:
    """Ask the GCS which nodes are draining; None when it cannot be asked (the caller keeps what it had).

    Args:
        now: the caller's clock; deadlines (epoch ms in Ray) are converted to it.
        timeout_s: limit for the GCS call.

    Must run in a process connected to Ray (the coordinator actor).
    """
    import time

    import ray

    try:
        gcs = ray._private.worker.global_worker.gcs_client  # type: ignore[attr-defined]
        draining = gcs.get_draining_nodes(timeout=timeout_s)
    except Exception:  # noqa: BLE001 - advisory: a failed poll changes nothing
        logger.debug("get_draining_nodes failed", exc_info=True)
        return None
    wall = time.time()
    notices = {}
    for node_id, deadline_ms in draining.items():
        at = deadline_ms / 1000.0 if deadline_ms > 0 else None
        notices[node_id] = DrainNotice(node_id, None if at is None else now + (at - wall), at)
    return notices

"""Fencing: a worker the coordinator may have left behind publishes nothing.

The coordinator declares a worker lost when it answered neither probes nor its
native pulse for `probe_timeout_s` (a frozen process or node, a partition). Such
a worker can wake up later, inside a round that the others have left and re-formed
without it. Ray's kill reaches it soon after it wakes, but not before its training
thread runs on; a partitioned worker may not be reached at all.

So each worker holds a lease on its round, renewed by every probe it answers.
The coordinator cannot have declared it lost before `probe_timeout_s` passed
without an answer; while less time than that has passed since the last answer,
the worker is certainly still a member. Past it, before anything that outlives the
round (publishing a durable checkpoint), the worker waits for two more probes:
the one the coordinator sent before losing patience may still arrive after a
wake-up, a second one only comes if it still counts the worker in. If they do not
come, the worker raises `RoundFenced` and leaves the round without writing.

For the same reason, the first answer after a silence of that length renews nothing:
it may be that late probe, answered by another thread just before the training thread
reaches its fence (seen in a full test run: a woken worker published a checkpoint into a re-formed
run). Only a second answer, which the coordinator sends only after reading the first
(one probe in flight per worker), makes the lease fresh again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

# Renewals count as fresh for this share of probe_timeout_s: room for clocks that tick at slightly
# different rates on the two machines.
FRESH_SHARE = 0.8


class RoundFenced(BaseException):
    """Raised in a worker that may have been left behind; it leaves its round without publishing.

    A BaseException, like `MembershipChange`, so that `except Exception` in user code
    does not swallow it.
    """


class Lease:
    """A worker's claim to its current round, renewed by the coordinator's probes.

    Args:
        timeout_s: the coordinator's `probe_timeout_s`.
        confirm_s: how long `check` waits for the two probes that confirm membership.
        clock: a monotonic clock.
    """

    def __init__(self, timeout_s: float, confirm_s: float, clock: Callable[[], float] = time.monotonic):
        self.timeout_s = timeout_s
        self.confirm_s = confirm_s
        self._clock = clock
        self._cond = threading.Condition()
        self._round_id = -1
        self._renewed = float("-inf")
        self._answered = float("-inf")  # the last answer, fresh or not
        self._answers = 0

    def begin(self, round_id: int) -> None:
        """The coordinator just started this worker's part in `round_id`: a fresh lease."""
        with self._cond:
            self._round_id = round_id
            self._renewed = self._answered = self._clock()
            self._answers = 0
            self._cond.notify_all()

    def renew(self, round_id: int) -> None:
        """A probe of `round_id` is being answered; it renews the lease unless it ends a long silence."""
        with self._cond:
            if round_id != self._round_id:
                return
            now = self._clock()
            if now - self._answered < self.timeout_s * FRESH_SHARE:
                self._renewed = now
            self._answered = now
            self._answers += 1
            self._cond.notify_all()

    def age(self) -> float:
        """Seconds since the last renewal."""
        with self._cond:
            return self._clock() - self._renewed

    def check(self, round_id: int, action: str) -> None:
        """Return if this worker is certainly still a member of `round_id`; else wait to be sure, or raise.

        Raises:
            RoundFenced: the round is not this worker's current one, or no probe
                confirmed its membership within `confirm_s`.
        """
        with self._cond:
            if round_id != self._round_id:
                raise RoundFenced(f"round {round_id} is over for this worker; not going to {action}")
            silent_s = self._clock() - self._renewed
            if silent_s < self.timeout_s * FRESH_SHARE:
                return
            target = self._answers + 2
            deadline = self._clock() + self.confirm_s
            while self._answers < target and self._round_id == round_id:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    raise RoundFenced(
                        f"no liveness probe from the coordinator for {silent_s + self.confirm_s:.1f}s "
                        f"(probe_timeout_s={self.timeout_s:g}): it has most likely left this worker behind "
                        f"(frozen, or cut off); not going to {action}"
                    )
                self._cond.wait(remaining)
            if self._round_id != round_id:
                raise RoundFenced(f"round {round_id} is over for this worker; not going to {action}")


class FencedCheckpointer:
    """A worker's view of the run's `Checkpointer` for one round: fenced, and marked busy while it writes.

    Everything is delegated; `maybe_save` marks the worker busy (its probe answers say
    so, and the coordinator does not take a long write for a hang) and the write is
    published only if `fence()` returns.

    Args:
        inner: the run's checkpointer.
        fence: raises `RoundFenced` if the worker may have been left behind.
        busy: called with a description when a write starts, with None when it ends.
    """

    def __init__(self, inner: object, fence: Callable[[], None], busy: Callable[[str | None], None]):
        self._inner = inner
        self._fence = fence
        self._busy = busy

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def maybe_save(self, holder: object, context: object) -> object:
        self._busy(f"writing durable checkpoint of commit {getattr(holder, 'commit_id', '?')}")
        try:
            return self._inner.maybe_save(holder, context, before_publish=self._fence)  # type: ignore[attr-defined]
        finally:
            self._busy(None)

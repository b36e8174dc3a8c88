"""Faults as data: inject a raise, a crash or a hang at a given rank and step.

    faults = FaultInjector().fail_at(rank=1, step=17).kill_at(rank=2, step=30)
    def train_fn(config):
        ...
        faults.check(state.step)      # once per step, inside the training loop

A fault fires only in the round whose restart count matches (default: the
first attempt), so it fires once even though train_fn is re-entered and
replacement processes start with a fresh copy of the injector.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field

from ray_elastic.context import get_context


class InjectedFault(RuntimeError):
    """The exception `fail_at` raises."""


@dataclass(frozen=True)
class Fault:
    kind: str  # "raise" | "kill" | "hang" | "exit"
    rank: int
    step: int
    restart_count: int = 0


@dataclass
class FaultInjector:
    faults: list[Fault] = field(default_factory=list)

    def _add(self, kind: str, rank: int, step: int, restart_count: int) -> FaultInjector:
        self.faults.append(Fault(kind, rank, step, restart_count))
        return self

    def fail_at(self, rank: int, step: int, restart_count: int = 0) -> FaultInjector:
        """train_fn raises InjectedFault on `rank` at `step`."""
        return self._add("raise", rank, step, restart_count)

    def kill_at(self, rank: int, step: int, restart_count: int = 0) -> FaultInjector:
        """The worker process of `rank` SIGKILLs itself at `step`."""
        return self._add("kill", rank, step, restart_count)

    def hang_at(self, rank: int, step: int, restart_count: int = 0) -> FaultInjector:
        """The worker process of `rank` SIGSTOPs itself at `step` (a hang the watchdog must catch)."""
        return self._add("hang", rank, step, restart_count)

    def check(self, step: int) -> None:
        """Fire any fault set for this rank, step and restart count."""
        ctx = get_context()
        for fault in self.faults:
            if (fault.rank, fault.step, fault.restart_count) != (ctx.rank, step, ctx.restart_count):
                continue
            if fault.kind == "raise":
                raise InjectedFault(f"injected failure on rank {ctx.rank} at step {step}")
            if fault.kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if fault.kind == "hang":
                os.kill(os.getpid(), signal.SIGSTOP)
                time.sleep(0.1)


def fail_at(rank: int, step: int, restart_count: int = 0) -> FaultInjector:
    """Shorthand: an injector with one `fail_at` fault."""
    return FaultInjector().fail_at(rank, step, restart_count)

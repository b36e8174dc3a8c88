"""Faults as data: inject a raise, a crash, a hang or a stall at a given rank and step.

    faults = FaultInjector().fail_at(rank=1, step=17).kill_at(rank=2, step=30)
    def train_fn(config):
        ...
        faults.check(state.step)      # once per step, inside the training loop

A fault fires only in the round whose restart count matches (default: the
first attempt), so it fires once even though train_fn is re-entered and
replacement processes start with a fresh copy of the injector.

Faults can also be requested while a run goes (a soak test, a notebook):
`FaultInjector(trigger_dir=d)` fires a fault at the next `check` of the rank
named by `request_fault(d, kind, rank)`. With `log_path`, every fault that
fires first appends `kind rank step wall_time pid round_id` there, so a harness can time
detection and recovery from the moment of the fault, and knows the round it hit.
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
    kind: str  # "raise" | "kill" | "hang" | "stall"
    rank: int
    step: int
    restart_count: int = 0


_KINDS = ("raise", "kill", "hang", "stall")
STALL_S = 3600.0


def _trigger_path(trigger_dir: str, kind: str, rank: int) -> str:
    return os.path.join(trigger_dir, f"{kind}-rank{rank}")


def request_fault(trigger_dir: str, kind: str, rank: int) -> None:
    """Ask rank `rank` of a run whose injector watches `trigger_dir` to raise/kill/hang at its next check."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    with open(_trigger_path(trigger_dir, kind, rank), "w", encoding="utf-8"):
        pass


@dataclass
class FaultInjector:
    faults: list[Fault] = field(default_factory=list)
    log_path: str | None = None
    trigger_dir: str | None = None

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

    def stall_at(self, rank: int, step: int, restart_count: int = 0) -> FaultInjector:
        """The training thread of `rank` sleeps for an hour at `step`: its process answers probes and aborts, but
        never leaves its round (as a rank stuck in a collective no sever reaches), until it is killed."""
        return self._add("stall", rank, step, restart_count)

    def check(self, step: int) -> None:
        """Fire any fault set for (or requested of) this rank, step and restart count."""
        ctx = get_context()
        for fault in self.faults:
            if (fault.rank, fault.step, fault.restart_count) == (ctx.rank, step, ctx.restart_count):
                self._fire(fault.kind, ctx.rank, step, ctx.round_id)
        if self.trigger_dir is not None:
            for kind in _KINDS:
                try:  # removing the request claims it: it fires once
                    os.unlink(_trigger_path(self.trigger_dir, kind, ctx.rank))
                except FileNotFoundError:
                    continue
                self._fire(kind, ctx.rank, step, ctx.round_id)

    def _fire(self, kind: str, rank: int, step: int, round_id: int) -> None:
        if self.log_path is not None:
            with open(self.log_path, "a", encoding="utf-8") as out:
                out.write(f"{kind} {rank} {step} {time.time():.6f} {os.getpid()} {round_id}\n")
        if kind == "raise":
            raise InjectedFault(f"injected failure on rank {rank} at step {step}")
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "hang":
            os.kill(os.getpid(), signal.SIGSTOP)
            time.sleep(0.1)
        if kind == "stall":
            time.sleep(STALL_S)


def fail_at(rank: int, step: int, restart_count: int = 0) -> FaultInjector:
    """Shorthand: an injector with one `fail_at` fault."""
    return FaultInjector().fail_at(rank, step, restart_count)


class SlowToSave:
    """A State attribute that makes every durable checkpoint write take `seconds` longer (slow storage).

    `State(model=..., ballast=SlowToSave(3.0))`: `torch.save` pickles it with protocol 2 and
    waits there; a commit's deep copy and the state broadcast (other protocols) are not slowed.
    """

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __deepcopy__(self, memo: dict) -> SlowToSave:
        return SlowToSave(self.seconds)

    def __reduce_ex__(self, protocol: object) -> tuple:
        if protocol == 2:
            time.sleep(self.seconds)
        return (SlowToSave, (self.seconds,))

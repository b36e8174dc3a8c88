"""The error taxonomy of ray_elastic.

Every error the runtime raises to users derives from :class:`ElasticError`::

    ElasticError
    ├── ConfigError              bad input, raised before any actor starts
    │   └── RunNameInUseError    a run name already used without resume=True
    ├── SnapshotLostError        the newest commit is gone from memory (ends the run: no restart helps)
    ├── TrainingFailedError      the run failed; names the first failure
    │   ├── NotEnoughNodesError  fewer than min_nodes for longer than the timeout
    │   └── CoordinatorLostError the coordinator actor died
    └── RunAbortedError          the driver aborted the run (Ctrl-C, abort())

All of them pickle with their payload, so they cross actor boundaries intact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class ElasticError(Exception):
    """Root of every error raised by ray_elastic."""

    def __reduce__(self):  # keep the message when crossing actors
        return (type(self), self.args)


class ConfigError(ElasticError, ValueError):
    """An argument of `run` (or the CLI) cannot work; the message says what to change."""


class RunNameInUseError(ConfigError):
    """A run with this name already stored checkpoints and `resume=True` was not given."""


class SnapshotLostError(ElasticError):
    """No rank still holds the newest commit, and no durable checkpoint replaces it (raised in `State(...)`).

    With snapshot="live": every rank's optimizer stepped past the commit and then failed before
    the next one (train_fn raised on every rank between optimizer.step() and commit()). Sharded
    state: some shard and every replica of it are gone. A restart would meet the same loss, so
    the coordinator ends the run on it (`TrainingFailedError`) instead of spending its budget.
    """

    @classmethod
    def for_commit(cls, commit_id: int, step: Any) -> SnapshotLostError:
        at = f"commit {commit_id}" + ("" if step is None else f" (step {step})")
        return cls(
            f"{at} is lost: every rank's optimizer stepped past it and then left the round before the next "
            f"commit, and snapshot='live' keeps no copy of optimizer-owned tensors. Resume from a durable "
            f"checkpoint (storage_path=..., resume=True), or run with snapshot='copy' to keep a copy."
        )


class RunAbortedError(ElasticError):
    """The run was aborted by its driver before it finished."""


@dataclass(frozen=True)
class FailureInfo:
    """One observed failure of a rank: what, where, and when.

    Attributes:
        kind: "exception" (train_fn raised), "died" (the process or its node
            went away), "hang" (stopped making progress), or "silent" (answered
            no liveness probe nor its native pulse for probe_timeout_s: stopped,
            its node frozen, or cut off).
        rank: global rank in the round where it failed (-1 if not yet assigned).
        node_id: Ray node id of the worker.
        round_id: the round it failed in.
        step: the last committed step seen from that rank, if known.
        message: one-line summary.
        traceback: formatted traceback of the exception, if any; for a hang or a
            silent rank, its stack when the round was aborted and where every rank was.
    """

    kind: str
    rank: int
    node_id: str
    round_id: int
    message: str
    step: int | None = None
    traceback: str = ""

    def describe(self) -> str:
        step = "?" if self.step is None else str(self.step)
        return (
            f"rank {self.rank} on node {self.node_id[:12]} ({self.kind}) "
            f"in round {self.round_id} after committed step {step}: {self.message}"
        )


class TrainingFailedError(ElasticError):
    """The run failed. `first_failure` is the root cause; `failures` all of them.

    Args:
        reason: why the run gave up (budget spent, nodes missing, ...).
        first_failure: the first failure observed in the run, if any.
        failures: every failure observed, in order.
        restarts: restarts spent.
        max_restarts: the budget.
    """

    def __init__(
        self,
        reason: str,
        first_failure: FailureInfo | None = None,
        failures: tuple[FailureInfo, ...] = (),
        restarts: int = 0,
        max_restarts: int = 0,
    ):
        self.reason = reason
        self.first_failure = first_failure
        self.failures = tuple(failures)
        self.restarts = restarts
        self.max_restarts = max_restarts
        super().__init__(self._message())

    def _message(self) -> str:
        budget = "unlimited" if self.max_restarts < 0 else str(self.max_restarts)
        lines = [f"{self.reason} (restarts spent: {self.restarts} of {budget})"]
        if self.first_failure is not None:
            lines.append(f"Root cause (first observed failure): {self.first_failure.describe()}")
            if self.first_failure.traceback:
                lines.append(self.first_failure.traceback.rstrip())
            for other in self.failures:  # every other rank stuck in the same round, with its stack
                if other != self.first_failure and other.round_id == self.first_failure.round_id and (
                        other.kind in ("hang", "silent")):
                    lines.append(f"Also stuck: {other.describe()}")
                    if other.traceback:
                        lines.append(other.traceback.rstrip())
        return "\n".join(lines)

    def __reduce__(self):
        return (
            type(self),
            (self.reason, self.first_failure, self.failures, self.restarts, self.max_restarts),
        )


class NotEnoughNodesError(TrainingFailedError):
    """Fewer than min_nodes could be gathered within the wait timeout."""


class CoordinatorLostError(TrainingFailedError):
    """The coordinator actor died; workers were torn down. Resume from storage."""

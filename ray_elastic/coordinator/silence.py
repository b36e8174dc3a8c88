"""The controller's handling of silent and stuck workers (a mixin of `Controller`).

Decisions come from `liveness.verdict` and `policy.overdue_after_abort`; these
methods feed them the signals (probe answers, native pulses, stacks) and act:
kill the lost, name the stuck ranks with their stacks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ray_elastic.coordinator import policy
from ray_elastic.coordinator.liveness import CHECK, GONE, LOST
from ray_elastic.coordinator.types import Heartbeat, OutcomeKind, RoundPlan, StackReport, WorkerOutcome
from ray_elastic.diagnostics import compare_collectives, first_user_frame, holds_the_gil

_KILLED = (OutcomeKind.SILENT, OutcomeKind.DIED, OutcomeKind.HUNG)
SHARD_HANDOVER_TIMEOUT_S = 10.0  # how long a rank about to be killed has to give its shards to a peer
LATER_STACK_WAIT_S = 0.5  # how long a rank about to be killed for staying in an aborted round has to say where


class SilenceMixin:
    """Needs `config`, `group`, `last_step` and `_emit` of the controller."""

    config: Any
    group: Any
    last_step: dict[str, int | None]

    def _emit(self, kind: str, message: str, **data: Any) -> None:  # provided by Controller
        raise NotImplementedError

    # -- signals -------------------------------------------------------------------------------
    def _live_answers(self, state: Any, beats: list[Heartbeat], now: float) -> list[Heartbeat]:
        """Probe answers that count: none from a worker already lost (it may have woken up since)."""
        beats = [b for b in beats
                 if b.worker_id not in state.outcomes or state.outcomes[b.worker_id].kind not in _KILLED]
        unsettled = [w for w in state.plan.worker_ids if w not in state.outcomes]
        state.liveness.probed(unsettled, beats, now)
        return beats

    def _pulse(self, state: Any, workers: list[str], now: float) -> dict[str, str]:
        """Ask the native pulse of `workers` (those not in flight), record answers; every unsettled verdict."""
        timeout_s = self.config.probe_timeout_s / 2
        pulses = self.group.check_pulse(workers, timeout_s)
        state.liveness.pulsed(pulses, now)
        unsettled = [w for w in state.plan.worker_ids if w not in state.outcomes]
        return state.liveness.verdicts(unsettled, now, self.config.probe_timeout_s)

    # -- running ---------------------------------------------------------------------------------
    def _judge_silence(self, state: Any, now: float) -> list[str]:
        """Members lost to silence (or found gone) now; their outcomes are set and they are killed."""
        unsettled = [w for w in state.plan.worker_ids if w not in state.outcomes]
        verdicts = state.liveness.verdicts(unsettled, now, self.config.probe_timeout_s)
        checked = [w for w, v in verdicts.items() if v == CHECK]
        verdicts = self._pulse(state, checked, now)
        self._announce_busy(state, now)
        lost = sorted(w for w, v in verdicts.items() if v in (LOST, GONE))
        for worker_id in lost:
            state.outcomes[worker_id] = self._lost_outcome(state, worker_id, verdicts[worker_id], now)
        if lost:
            self.group.kill(lost, reason="silent")
        return lost

    def _announce_busy(self, state: Any, now: float) -> None:
        liveness = state.liveness
        for worker_id, answer in liveness.native.items():
            if answer != "alive" or worker_id in liveness.busy_announced or worker_id in state.outcomes:
                continue
            waited = now - liveness.pending_since.get(worker_id, now)
            if waited <= self.config.probe_timeout_s:  # only once it would have been lost without its pulse
                continue
            liveness.busy_announced.add(worker_id)
            self._emit("worker_busy",
                       f"worker {worker_id} answered no probe for {waited:.1f}s but its process runs (native "
                       f"pulse answered): busy in a call that holds the GIL, not lost",
                       worker_id=worker_id, waited_s=round(waited, 3))

    def _lost_outcome(self, state: Any, worker_id: str, verdict: str, now: float) -> WorkerOutcome:
        if verdict == GONE:
            return WorkerOutcome(worker_id, state.plan.round_id, OutcomeKind.DIED,
                                 message="its process is gone (its native liveness port refused the connection)",
                                 step=self.last_step.get(worker_id))
        native = state.liveness.native.get(worker_id, "none")
        second = ("it has no native pulse to ask" if native == "none"
                  else "its native pulse did not answer either")
        return WorkerOutcome(
            worker_id, state.plan.round_id, OutcomeKind.SILENT,
            message=(f"answered no liveness probe for {state.liveness.silent_for(worker_id, now):.1f}s "
                     f"(probe_timeout_s={self.config.probe_timeout_s:g}) and {second}: its process is stopped, "
                     f"its node frozen, or it is cut off from the coordinator; killed"),
            step=self.last_step.get(worker_id),
        )

    def _silence_trigger(self, state: Any, lost: list[str]) -> str:
        first = state.outcomes[lost[0]]
        names = ", ".join(lost[:4]) + (", ..." if len(lost) > 4 else "")
        return f"{len(lost)} worker(s) lost to silence ({names}): {first.message}"

    # -- restarting ------------------------------------------------------------------------------
    def _settle_after_abort(self, state: Any, unsettled: list[str], now: float) -> bool:
        """Kill the aborted workers that are gone, silent, or overdue; True if any was."""
        verdicts = self._pulse(state, unsettled, now)
        lost = {w for w in unsettled if verdicts[w] in (LOST, GONE)}
        hang_limit = self.config.hang_timeout_s
        busy_limit = hang_limit if hang_limit is not None else self.config.collective_timeout_s
        overdue = policy.overdue_after_abort(
            [w for w in unsettled if w not in lost], state.liveness.busy, state.liveness.busy_seen_at, state.since,
            now, self.config.abort_timeout_s, busy_limit,
        )
        if not lost and not overdue:
            return False
        for worker_id in sorted(lost):
            state.outcomes[worker_id] = self._lost_outcome(state, worker_id, verdicts[worker_id], now)
        ranks = _ranks(state.plan) if overdue else {}
        # Where they are now, not only where the abort found them: what keeps a rank in an aborted round is a bug
        # to report, and the abort's stack is often a collective it left long ago.
        later = self.group.current_stacks(sorted(overdue), LATER_STACK_WAIT_S) if overdue and not state.diagnose else {}
        # A rank whose Python answers nothing is read from outside; one seen holding the GIL cannot give its shards
        # away either (the ask would wait SHARD_HANDOVER_TIMEOUT_S for nothing), so none is asked of it.
        unanswered = sorted(w for w in overdue if w not in later) if not state.diagnose else []
        later |= self.group.outside_stacks(unanswered) if unanswered else {}
        holding_gil = {w for w in unanswered if w in later and holds_the_gil(later[w].stack)}
        for worker_id in overdue:
            busy = state.liveness.busy.get(worker_id)
            why = (f"was still busy ({busy}) past the hang bound after the round was aborted"
                   if busy else "did not answer or leave the round after it was aborted")
            state.outcomes[worker_id] = WorkerOutcome(
                worker_id, state.plan.round_id, OutcomeKind.HUNG,
                message=(self._stall_message() + ", then " if worker_id in state.stalled else "") + why + "; killed",
                step=self.last_step.get(worker_id),
                # Where the abort found it (it may have moved on since): a rank that does not leave is a bug
                # to report, and this is the one trace of it (a diagnosed round adds every rank's, later).
                traceback="" if state.diagnose else _abort_stack_text(
                    state.stacks.get(worker_id), ranks[worker_id][0], state.plan.round_id)
                + _later_stack_text(later.get(worker_id), now - state.since),
            )
        for worker_id in sorted(set(overdue) - holding_gil):
            self._hand_over_shards(state, worker_id, ranks)
        self.group.kill(sorted(lost | set(overdue)), reason="unresponsive after abort")
        return True

    def _hand_over_shards(self, state: Any, worker_id: str, ranks: dict[str, tuple[int, str]]) -> None:
        """Before a rank that answers but stays in an aborted round is killed: it gives the sharded commits it holds
        to a rank that left (another node's first), so that its shards outlive it (it may hold a shard's only
        other copy). A rank stuck in a gloo collective still answers on its other threads."""
        left = [w for w, o in state.outcomes.items() if o.kind not in _KILLED and w in ranks]
        if not left:
            return
        rank, node_id = ranks[worker_id]
        left.sort(key=lambda w: (ranks[w][1] == node_id, ranks[w][0]))
        kept = self.group.hand_over_shards(worker_id, left, SHARD_HANDOVER_TIMEOUT_S)
        if kept is None:
            return
        keeper, shards = kept
        self._emit("shards_handed_over",
                   f"rank {rank} stayed in aborted round {state.plan.round_id}; before it was killed it gave old "
                   f"shard(s) {', '.join(map(str, shards))} to rank {ranks[keeper][0]} (node {ranks[keeper][1][:12]})",
                   rank=rank, to_rank=ranks[keeper][0], shards=shards)

    def _stall_message(self) -> str:  # provided by Controller
        raise NotImplementedError

    # -- diagnosis -------------------------------------------------------------------------------
    def _with_stacks(self, state: Any, causes: list[WorkerOutcome]) -> list[WorkerOutcome]:
        """For a round aborted for silence or a hang: the stuck ranks' stacks on their outcomes, and an event."""
        if not state.diagnose:
            return causes
        state.stacks.update((r.worker_id, r) for r in self.group.stack_reports())
        ranks = _ranks(state.plan)
        summary = _stuck_summary(state, ranks)
        out = []
        for outcome in causes:
            if outcome.kind in (OutcomeKind.HUNG, OutcomeKind.SILENT) and not outcome.traceback:
                outcome = dataclasses.replace(outcome, traceback=_stack_text(
                    state.stacks.get(outcome.worker_id), ranks[outcome.worker_id][0], state.plan.round_id, summary))
            out.append(outcome)
        self._emit(
            "stuck_ranks",
            f"round {state.plan.round_id} was aborted ({state.trigger.split(':')[0]}); where every rank was: "
            + "; ".join(summary),
            stacks={
                str(ranks[w][0]): {"worker_id": w, "node_id": ranks[w][1], "pid": r.pid, "stack": r.stack,
                                   "collective": r.collective, "note": r.note}
                for w, r in state.stacks.items() if w in ranks
            },
        )
        return out


def _ranks(plan: RoundPlan) -> dict[str, tuple[int, str]]:
    members = ((w, g.node_id) for g in plan.groups for w in g.workers)
    return {w: (rank, node_id) for rank, (w, node_id) in enumerate(members)}


def _stuck_summary(state: Any, ranks: dict[str, tuple[int, str]]) -> list[str]:
    """One line per rank: where it was (its user frame, where it stands in the collectives), or why unknown."""
    standing = compare_collectives({
        f"rank {ranks[w][0]}": (r.collective_seq, r.collective) for w, r in state.stacks.items() if w in ranks
    })
    lines = []
    for worker_id, (rank, _) in sorted(ranks.items(), key=lambda kv: kv[1][0]):
        outcome = state.outcomes.get(worker_id)
        report = state.stacks.get(worker_id)
        if outcome is not None and outcome.kind is OutcomeKind.SILENT:
            lines.append(f"rank {rank} silent (no stack)")
            continue
        if report is None:
            lines.append(f"rank {rank}: no stack ({outcome.kind.value if outcome else 'no answer'})")
            continue
        where = first_user_frame(report.stack)
        parts = [p for p in (f"at {where}" if where else "", standing.get(f"rank {rank}", "")) if p]
        stuck = " (stuck)" if outcome is not None and outcome.kind is OutcomeKind.HUNG else ""
        lines.append(f"rank {rank}{stuck} " + ", ".join(parts or [report.note or "stack read"]))
    return lines


def _abort_stack_text(report: StackReport | None, rank: int, round_id: int) -> str:
    if report is None or not report.stack:
        return f"No stack of rank {rank}: it answered nothing when round {round_id} was aborted."
    return f"Stack of rank {rank} (pid {report.pid}) when round {round_id} was aborted:\n{report.stack.rstrip()}"


def _later_stack_text(report: StackReport | None, after_s: float) -> str:
    if report is None:
        return ""
    if not report.stack:
        return f"\nStill in the round {after_s:.1f}s after the abort; no stack: {report.note}" if report.note else ""
    how = f" ({report.note})" if report.note else ""
    return f"\nStill in the round {after_s:.1f}s after the abort{how}, at:\n{report.stack.rstrip()}"


def _stack_text(report: StackReport | None, rank: int, round_id: int, summary: list[str]) -> str:
    return _abort_stack_text(report, rank, round_id) + "\nEvery rank then: " + "; ".join(summary)

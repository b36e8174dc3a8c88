"""`ray-elastic run` on this machine alone, without Ray: the scripts are local subprocesses.

The coordinator's `Controller` drives a `LocalWorkerGroup` instead of actors: one
node, `nproc_per_node` script slots, the same fresh round store, restarts, budget,
events and failure report as on a cluster. Starting no Ray is what makes a local
launch as quick as torchrun's (see README, "Design notes"), and it places the
scripts the way torchrun does: `nproc_per_node` processes whatever the CPU count.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import threading
from collections.abc import Callable
from typing import Any

from ray_elastic.cli_output import ConsoleSink
from ray_elastic.config import RunConfig
from ray_elastic.coordinator.controller import Controller, RunSummary, progress_snapshot
from ray_elastic.coordinator.group import WorkerGroup
from ray_elastic.coordinator.types import Heartbeat, NodeGroup, OutcomeKind, RoundPlan, RoundSpec, WorkerOutcome
from ray_elastic.events import EventLog
from ray_elastic.launcher import RankPlace, RankRun, RoundInterrupted, RoundStopped, ScriptFailedError, ScriptSpec
from ray_elastic.store import RoundStore
from ray_elastic.worker.actor import torchrun_env
from ray_elastic.worker.process_group import is_communication_error

NODE_ID = "local"


class LocalWorkerGroup(WorkerGroup):
    """One node (this machine) whose slots run the script as subprocesses, round after round.

    Args:
        config: the run's configuration (nproc_per_node slots, run id, store port).
        spec: the script every slot runs.
        store_host: MASTER_ADDR given to the scripts.
        base_env: the environment scripts start from (the CLI's).
        console: where the scripts' lines are printed.
    """

    def __init__(self, config: RunConfig, spec: ScriptSpec, store_host: str, base_env: dict[str, str],
                 console: ConsoleSink | None = None):
        self.config = config
        self.spec = spec
        self.store_host = store_host
        self.base_env = base_env
        self.console = console or ConsoleSink()
        self.worker_ids = tuple(f"{NODE_ID}-{i}" for i in range(config.nproc_per_node))
        self.death_signal: int = signal.SIGTERM  # what an abort sends (the signal the CLI got, when it forwards one)
        self.store: RoundStore | None = None
        self._round_id = -1
        self._lock = threading.Lock()
        self._busy: set[str] = set()
        self._killed: set[tuple[int, str]] = set()
        self._runs: dict[str, RankRun] = {}
        self._threads: list[threading.Thread] = []
        self._outcomes: queue.Queue[WorkerOutcome] = queue.Queue()
        self._pids: list[int] = []

    def refresh(self, now: float) -> int:
        return 0  # this machine is the only node, always there; a round starts its scripts

    def hold_new_workers(self, hold: bool) -> None:
        pass  # no worker processes of its own: a round starts its scripts

    def ready_groups(self) -> list[NodeGroup]:
        with self._lock:
            return [] if self._busy else [NodeGroup(NODE_ID, self.worker_ids)]

    def pending_count(self) -> int:
        return 0

    def start_round(self, plan: RoundPlan) -> None:
        if self.store is not None:
            self.store.close()
        self.store = RoundStore(self.store_host, port=self.config.store_port)
        self._round_id = plan.round_id
        self._threads = [t for t in self._threads if t.is_alive()]
        for a in plan.assignments():
            spec = RoundSpec(a, plan.round_id, plan.restart_count, self.store_host, self.store.port,
                             self.config.max_restarts)
            env = {**self.base_env, **torchrun_env(spec, self.config.run_id)}
            place = RankPlace(self.config.run_id, plan.round_id, a.rank, a.local_rank, a.num_nodes)
            rank_run = RankRun(self.spec, place, env, self.console)
            with self._lock:
                self._busy.add(a.worker_id)
                self._runs[a.worker_id] = rank_run
            thread = threading.Thread(target=self._run_rank, args=(a.worker_id, plan.round_id, rank_run),
                                      name=f"ray_elastic-rank{a.rank}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _run_rank(self, worker_id: str, round_id: int, rank_run: RankRun) -> None:
        outcome = WorkerOutcome(worker_id, round_id, OutcomeKind.FAILED, message="launcher error")
        try:
            value = rank_run.run()
            outcome = WorkerOutcome(worker_id, round_id, OutcomeKind.DONE, value=value)
        except RoundStopped as exc:
            outcome = WorkerOutcome(worker_id, round_id, OutcomeKind.STOPPED, message=str(exc))
        except RoundInterrupted as exc:
            outcome = WorkerOutcome(worker_id, round_id, OutcomeKind.ABORTED, message=str(exc))
        except ScriptFailedError as exc:
            outcome = WorkerOutcome(worker_id, round_id, OutcomeKind.FAILED, message=f"ScriptFailedError: {exc}",
                                    traceback=exc.remote_traceback, communication=is_communication_error(exc))
        except Exception as exc:  # noqa: BLE001 - the script could not start (exec failed, no such file ...)
            outcome = WorkerOutcome(worker_id, round_id, OutcomeKind.FAILED, message=f"{type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                if rank_run.proc.pid is not None:
                    self._pids.append(rank_run.proc.pid)
                self._busy.discard(worker_id)
            self._outcomes.put(outcome)

    def wait(self, timeout_s: float) -> list[WorkerOutcome]:
        try:
            got = [self._outcomes.get(timeout=timeout_s)]
        except queue.Empty:
            return []
        with contextlib.suppress(queue.Empty):
            while True:
                got.append(self._outcomes.get_nowait())
        with self._lock:  # a worker the controller killed already has its (HUNG) outcome
            return [o for o in got if (o.round_id, o.worker_id) not in self._killed]

    def probe(self, round_id: int) -> list[Heartbeat]:
        with self._lock:  # a script is alive for as long as its slot is busy
            busy = sorted(self._busy) if round_id == self._round_id else []
        return [Heartbeat(w, round_id, 0, None) for w in busy]

    def _interrupt(self, worker_ids: list[str], reason: str) -> None:
        with self._lock:
            runs = [self._runs[w] for w in worker_ids if w in self._runs and w in self._busy]
        for rank_run in runs:
            rank_run.proc.interrupt(reason, self.death_signal)

    def request_stop(self, round_id: int) -> None:
        if round_id == self._round_id:
            self._interrupt(list(self.worker_ids), "stop")

    def abort(self, round_id: int, worker_ids: list[str], diagnose: bool = False) -> None:
        if round_id != self._round_id:
            return
        if self.store is not None:
            self.store.close()  # ranks still forming their group wait on the store: this frees them
            self.store = None
        self._interrupt(worker_ids, "abort")

    def kill(self, worker_ids: list[str], reason: str) -> None:
        with self._lock:
            self._killed |= {(self._round_id, w) for w in worker_ids}
            runs = [self._runs[w] for w in worker_ids if w in self._runs]
        for rank_run in runs:
            rank_run.proc.kill()

    def worker_pids(self) -> list[int]:
        with self._lock:
            return sorted(self._pids)

    def shutdown(self) -> None:
        """Stop every script still running (the signal, SIGKILL after the grace), then close the store."""
        self._interrupt(list(self.worker_ids), "abort")
        for thread in self._threads:
            thread.join(timeout=self.spec.kill_grace_s + 15)
        if self.store is not None:
            self.store.close()
            self.store = None


def run_local(config: RunConfig, spec: ScriptSpec, store_host: str, signals: tuple[int, ...], display: Any,
              base_env: dict[str, str] | None = None,
              console: ConsoleSink | None = None) -> tuple[RunSummary, int | None]:
    """Run the script on this machine until the run ends.

    Args:
        config: the run's configuration (min/max nodes 1 here).
        spec: the script.
        store_host: MASTER_ADDR for the scripts.
        signals: signals forwarded to the scripts (each ends the run).
        display: a progress display (`progress.make_progress`).
        base_env: the scripts' environment (default: this process's).
        console: where the scripts' lines are printed (default: this process's stdout/stderr).

    Returns:
        (the run's summary, the signal that ended it or None).
    """
    group = LocalWorkerGroup(config, spec, store_host, dict(os.environ if base_env is None else base_env), console)
    controller = Controller(config, group, EventLog(config.run_id, config.event_log_path), poll_s=0.05)
    received: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        if not received:
            received.append(signum)
            group.death_signal = signum
            controller.request_abort(f"the launcher got {signal.Signals(signum).name}")

    previous = _install(signals, forward)
    seen = 0
    try:
        while not controller.state.terminal:
            controller.step()
            if len(controller.events.events) > seen:
                snapshot = progress_snapshot(controller, seen)
                snapshot["events"] = [e for e in snapshot["events"] if e.kind != "node_ready"]  # one node, always
                display.update(snapshot)
                seen = len(controller.events.events)
    finally:
        group.shutdown()
        _restore(previous)
        display.close()
    return controller.summary(), (received[0] if received else None)


def _install(signals: tuple[int, ...], handler: Callable[[int, Any], None]) -> dict[int, Any]:
    previous: dict[int, Any] = {}
    if threading.current_thread() is not threading.main_thread():
        return previous  # signal handlers can only be set from the main thread
    for signum in signals:
        with contextlib.suppress(OSError, ValueError):
            previous[signum] = signal.signal(signum, handler)
    return previous


def _restore(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        with contextlib.suppress(OSError, ValueError, TypeError):
            signal.signal(signum, handler)

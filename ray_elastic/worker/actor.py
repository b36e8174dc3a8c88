"""The worker: one process slot that runs train_fn round after round without restarting.

A plain class; `RayWorkerGroup` makes it a threaded actor so that its control
methods (`probe`, `request_stop`, `abort`) answer while `run_round` trains.
"""

from __future__ import annotations

import gc
import importlib
import inspect
import os
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from ray_elastic.config import RunConfig
from ray_elastic.context import Session, TrainContext, set_session
from ray_elastic.coordinator.types import Heartbeat, OutcomeKind, RoundSpec, StackReport, WorkerOutcome
from ray_elastic.diagnostics import FLIGHT_RECORDER_ENTRIES, collective_state, py_spy_dump, thread_stack
from ray_elastic.errors import SnapshotLostError
from ray_elastic.netbind import listen_host, pin_gloo_interface
from ray_elastic.pulse import PulseServer
from ray_elastic.snapshot import SnapshotHolder
from ray_elastic.state import MembershipChange
from ray_elastic.worker.fence import FencedCheckpointer, Lease
from ray_elastic.worker.process_group import (
    GLOO_CONNECT_WAIT_FACTOR,
    GroupHandle,
    connect_round_store,
    form_timeout_s,
    is_communication_error,
    release_round_objects,
)


def torchrun_env(spec: RoundSpec, run_id: str) -> dict[str, str]:
    """The environment torchrun gives a worker in the same place."""
    a = spec.assignment
    return {
        "RANK": str(a.rank),
        "LOCAL_RANK": str(a.local_rank),
        "WORLD_SIZE": str(a.world_size),
        "LOCAL_WORLD_SIZE": str(a.local_world_size),
        "GROUP_RANK": str(a.node_rank),
        "ROLE_RANK": str(a.rank),
        "ROLE_WORLD_SIZE": str(a.world_size),
        "NODE_RANK": str(a.node_rank),
        "MASTER_ADDR": spec.store_host,
        "MASTER_PORT": str(spec.store_port),
        "TORCHELASTIC_RESTART_COUNT": str(spec.restart_count),
        "TORCHELASTIC_MAX_RESTARTS": str(spec.max_restarts),
        "TORCHELASTIC_RUN_ID": run_id,
    }


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray (unit tests)
        return "127.0.0.1"


class ElasticWorker:
    """Runs train_fn in rounds; keeps its process, imports and snapshot between them.

    Args:
        config: the run's configuration.
        train_fn: the user's function, taking `config` (or nothing).
        train_config: the value passed to train_fn.
        worker_id: stable id of this slot instance.
        node_id: Ray node id this worker runs on.
        checkpointer: optional durable checkpointer (see `checkpoint.py`).
        prober_ip: node IP of the coordinator, which probes this worker's native pulse.
    """

    def __init__(
        self,
        config: RunConfig,
        train_fn: Callable[..., Any],
        train_config: Any,
        worker_id: str,
        node_id: str,
        checkpointer: Any = None,
        prober_ip: str = "",
    ):
        os.environ["OMP_NUM_THREADS"] = config.omp_num_threads  # for the user's code and its subprocesses
        # torch's flight recorder names the collective a stuck rank waits in (see diagnostics.py).
        os.environ.setdefault("TORCH_FR_BUFFER_SIZE", FLIGHT_RECORDER_ENTRIES)
        import torch

        torch.set_num_threads(int(config.omp_num_threads))  # torch was imported with this module already

        for module in config.warmup_modules:  # before `ready`, so a newcomer never imports inside a round
            importlib.import_module(module)
        gc.freeze()  # what imports made lives as long as the process: the collection after each round skips it

        self.config = config
        self.train_fn = train_fn
        self.train_config = train_config
        self.worker_id = worker_id
        self.node_id = node_id
        self.checkpointer = checkpointer
        self.snapshots = SnapshotHolder(config.snapshot, config.shard_replicas, config.shard_replica_every,
                                        config.shard_replica_overlap)
        self._lock = threading.Lock()
        self._round_id = -1
        self._group: GroupHandle | None = None
        self._session: Session | None = None
        self._stop_round = -1  # the latest round asked to stop (its request may come before its run_round)
        self._aborted: set[int] = set()
        self._gloo_ifname: str | None = None  # GLOO_SOCKET_IFNAME as this worker last pinned it
        self._train_thread: int | None = None
        self._joining = False  # the training thread is in run_round, connecting to its round (no session yet)
        self._leaving = False  # the training thread is past its round's train_fn, letting the round go
        self._busy: tuple[str, float] | None = None  # a long activity of the training thread, and its start
        self._lease = Lease(config.probe_timeout_s,
                            confirm_s=max(2 * config.probe_timeout_s, 4 * config.heartbeat_interval_s))
        # Probed from the coordinator's node (`prober_ip`, "" when unknown): loopback when that is this machine.
        self._pulse = PulseServer(listen_host(_node_ip(), [prober_ip]))

    # -- control path ------------------------------------------------------------------------------
    def ready(self) -> dict[str, Any]:
        """Answered once imports are done: the worker can join a round."""
        import ray

        gpu_ids = [str(g) for g in ray.get_gpu_ids()] if self.config.use_gpu else []
        return {"pid": os.getpid(), "worker_id": self.worker_id, "node_id": self.node_id, "gpu_ids": gpu_ids,
                "pulse": self._pulse.address}

    def probe(self, round_id: int, acked_seq: int = -1) -> Heartbeat:
        """Liveness and progress; carries the reports the coordinator has not acknowledged."""
        self._lease.renew(round_id)
        session = self._session
        if self._round_id != round_id:
            return Heartbeat(self.worker_id, round_id, -1, None)
        busy = self._busy_text()  # forming the round's group counts too: it has no session yet
        if session is None:
            return Heartbeat(self.worker_id, round_id, -1, None, busy=busy)
        first_seq, reports = session.unacknowledged_reports(acked_seq)
        return Heartbeat(
            self.worker_id, round_id, session.progress_count, session.last_committed_step, reports, first_seq,
            snapshot=self.snapshots.describe(), busy=busy,
        )

    def _busy_text(self) -> str:
        busy = self._busy
        return f"{busy[0]} for {time.monotonic() - busy[1]:.1f}s" if busy else ""

    def stacks(self, diagnose_script: bool = True) -> StackReport:
        """Where the training thread (or the script this round runs) is now."""
        return self._stack_report(self._round_id, diagnose_script)

    def _stack_report(self, round_id: int, diagnose_script: bool) -> StackReport:
        session = self._session
        pids = list(session.subprocess_pids) if session is not None else []
        note = f"busy {busy}" if (busy := self._busy_text()) else ""
        if pids:
            if not diagnose_script:
                return StackReport(self.worker_id, round_id, os.getpid(), "", note=f"script pid {pids[-1]}")
            stack, how = py_spy_dump(pids[-1])
            return StackReport(self.worker_id, round_id, os.getpid(), stack, note=how)
        if session is None:
            if self._leaving or (self._joining and round_id == self._round_id):
                where = "leaving its round" if self._leaving else "joining its round"
                return StackReport(self.worker_id, round_id, os.getpid(), thread_stack(self._train_thread),
                                   note=note or where)
            return StackReport(self.worker_id, round_id, os.getpid(), "", note="not in a round")
        seq, op = collective_state()
        return StackReport(self.worker_id, round_id, os.getpid(), thread_stack(self._train_thread), op, note, seq)

    def request_stop(self, round_id: int) -> None:
        """Have round `round_id` leave at its next commit (a script: stopped now); one not begun yet is
        remembered, since this call and its `run_round` run on different threads in either order."""
        with self._lock:
            if round_id < self._round_id:
                return
            self._stop_round = max(self._stop_round, round_id)
            session = self._session if round_id == self._round_id else None
        if session is not None:
            session.interrupt("stop")

    def abort(self, round_id: int, diagnose: bool = False) -> StackReport | None:
        """Break this round's collectives so the training thread leaves the round.

        Returns:
            where the training thread was just before (py-spy for a script only if `diagnose`),
            or None if `round_id` is not this worker's round (one it has not begun yet is left at once when it
            begins: its abort may run first, the two calls being on different threads).
        """
        with self._lock:
            if round_id < self._round_id:
                return None
            self._aborted.add(round_id)
            if round_id > self._round_id:  # its run_round has not begun: it will leave at once when it does
                return None
            group = self._group
            session = self._session
        report = self._stack_report(round_id, diagnose)
        if session is not None:
            session.interrupt("abort")
        if group is not None:
            group.sever()
        return report

    def export_shards(self) -> list[dict[str, Any]]:
        """The sharded commits this process holds, for a peer to keep before this process is killed for not
        leaving an aborted round (answered while the training thread is stuck; empty: no sharded state)."""
        store = self.snapshots.shards
        return [] if store is None else store.export_held()

    def adopt_shards(self, held: list[dict[str, Any]]) -> list[int] | None:
        """Keep the shards of a peer about to be killed (`export_shards`) that this process lacks; between rounds
        only. Returns the shards kept; None when nothing was offered."""
        if not held:
            return None
        store = self.snapshots.shards
        with self._lock:
            in_round = self._session is not None
        if store is None or in_round:
            return []
        return store.adopt(held)

    def export_snapshot(self) -> dict[str, Any] | None:
        """This worker's committed snapshot, handed over before its node is drained (None: it holds none)."""
        with self._lock:
            in_round = self._session is not None
        if in_round or self.snapshots.held_commit_id() < 0:
            return None
        return self.snapshots.as_payload()

    def import_snapshot(self, payload: dict[str, Any] | None) -> int:
        """Hold a snapshot handed over from a drained node's worker (if newer); return the commit held."""
        if payload is not None and payload["commit_id"] > self.snapshots.commit_id:
            self.snapshots.load_payload(payload)
        return self.snapshots.held_commit_id()

    # -- training path -----------------------------------------------------------------------------
    def _device(self, spec: RoundSpec):
        """CPU, or this worker's GPU with every GPU of its node visible (so NCCL sees its peers)."""
        import torch

        if not self.config.use_gpu:
            return torch.device("cpu")
        if spec.node_gpu_ids and not torch.cuda.is_initialized():
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(spec.node_gpu_ids)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
        own = spec.gpu_ids[0] if spec.gpu_ids else None
        index = visible.index(own) if own in visible else 0
        return torch.device("cuda", index)

    def run_round(self, spec: RoundSpec) -> WorkerOutcome:
        """Join round `spec.round_id`, run train_fn in it, and report how it ended."""
        a = spec.assignment
        with self._lock:
            if spec.round_id <= self._round_id:
                return WorkerOutcome(self.worker_id, spec.round_id, OutcomeKind.ABORTED, message="stale round")
            self._round_id = spec.round_id
            self._joining = True
        self._train_thread = threading.get_ident()
        self._lease.begin(spec.round_id)
        os.environ.update(torchrun_env(spec, self.config.run_id))
        self._gloo_ifname = pin_gloo_interface(spec.bind_host or _node_ip(), self._gloo_ifname)
        device = self._device(spec)
        if device.type == "cuda" and self.config.worker_backend == "nccl":
            import torch

            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
            torch.cuda.set_device(device)
        context = TrainContext(
            rank=a.rank,
            local_rank=a.local_rank,
            world_size=a.world_size,
            local_world_size=a.local_world_size,
            node_rank=a.node_rank,
            num_nodes=a.num_nodes,
            restart_count=spec.restart_count,
            round_id=spec.round_id,
            run_id=self.config.run_id,
            node_id=self.node_id,
            device=device,
        )
        checkpointer = None if self.checkpointer is None else FencedCheckpointer(
            self.checkpointer, lambda: self._lease.check(spec.round_id, "publish a durable checkpoint"),
            self._set_busy,
        )
        session = Session(context, self.snapshots, checkpointer,
                          on_stop_check=lambda: self._stop_round >= spec.round_id,
                          collective_timeout_s=self.config.collective_timeout_s, set_busy=self._set_busy)
        session.last_committed_step = self._last_step()
        store = None
        try:
            store = connect_round_store(spec.store_host, spec.store_port, max(30.0, self.config.abort_timeout_s),
                                        aborted=lambda: spec.round_id in self._aborted)
            group = None if not self.config.init_process_group else self._form_group(spec, store, device)
            if group is not None:
                session.on_progress(group.learn_peer_listeners)
            with self._lock:
                self._group = group
                self._session = session
                self._joining = False
                aborted_early = spec.round_id in self._aborted
            if aborted_early:
                return self._outcome(spec, OutcomeKind.ABORTED, session=session, message="aborted while forming")
            set_session(session)
            value = self._call_train_fn()
            session.train_fn_returned()  # background work of the round (a sharded checkpoint write) finishes first
            session.finish_agreement()  # every rank started it at its last commit: let it complete
            return self._outcome(spec, OutcomeKind.DONE, value=value, session=session)
        except MembershipChange:
            return self._outcome(spec, OutcomeKind.STOPPED, session=session)
        except BaseException as exc:  # noqa: BLE001 - every failure is reported, none escapes
            if self._group is not None:
                self._group.sever()  # unblock peers at once; they are waiting on us
            if spec.round_id in self._aborted:
                return self._outcome(spec, OutcomeKind.ABORTED, session=session, message=str(exc))
            return self._outcome(
                spec,
                OutcomeKind.FAILED,
                session=session,
                message=f"{type(exc).__name__}: {exc}",
                # A failed script subprocess (the CLI) carries the script's own traceback.
                traceback=getattr(exc, "remote_traceback", "") or "".join(traceback.format_exception(exc)),
                communication=is_communication_error(exc),
                unrecoverable=isinstance(exc, SnapshotLostError),
            )
        finally:
            set_session(None)
            self.snapshots.end_round()  # before train_fn runs again: nothing it does can touch the commit
            with self._lock:
                group, self._group = self._group, None
                self._session = None
                self._joining = False
                self._leaving = True  # a stack read now shows where the thread is (destroying the group, say)
            if group is not None:
                group.destroy()
            del store
            del session  # the outcome is built: nothing of the round is needed
            release_round_objects()
            self._leaving = False

    def _form_group(self, spec: RoundSpec, store: Any, device: Any) -> GroupHandle:
        """The round's default group. While it connects, this worker says it is busy: a rank whose peer died
        mid-connect cannot leave before gloo gives up (see `form_timeout_s`), and must not be killed for that."""
        import torch.distributed as dist

        a = spec.assignment
        bound = GLOO_CONNECT_WAIT_FACTOR * form_timeout_s(a.world_size)
        self._set_busy(f"forming the round's process group (gloo gives up on a lost peer within ~{bound:.0f}s)")
        try:
            return GroupHandle(
                self.config.worker_backend,
                dist.PrefixStore(f"{spec.store_prefix}/round{spec.round_id}", store),
                a.rank,
                a.world_size,
                self.config.collective_timeout_s,
                device_id=device if self.config.worker_backend == "nccl" else None,
            )
        finally:
            self._set_busy(None)

    def _set_busy(self, what: str | None) -> None:
        self._busy = (what, time.monotonic()) if what else None

    def _last_step(self) -> int | None:
        step = self.snapshots.attrs.get("step")
        return step if isinstance(step, int) else None

    def _call_train_fn(self) -> Any:
        try:
            takes_config = len(inspect.signature(self.train_fn).parameters) > 0
        except (TypeError, ValueError):
            takes_config = True
        return self.train_fn(self.train_config) if takes_config else self.train_fn()

    def _outcome(self, spec: RoundSpec, kind: OutcomeKind, session: Session, **fields: Any) -> WorkerOutcome:
        first_seq, reports = session.unacknowledged_reports()
        return WorkerOutcome(
            self.worker_id, spec.round_id, kind, step=session.last_committed_step,
            reports=reports, first_seq=first_seq, snapshot=self.snapshots.describe(), **fields
        )

"""`ray_elastic.run`: the front door."""

from __future__ import annotations

import inspect
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import cloudpickle
from ray._raylet import PlacementGroupID
from ray.exceptions import RayActorError
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ray_elastic.cluster_auth import check_cluster_access
from ray_elastic.config import RunConfig, validate
from ray_elastic.coordinator.actor import Coordinator
from ray_elastic.coordinator.controller import RunSummary
from ray_elastic.errors import ConfigError, CoordinatorLostError
from ray_elastic.events import Event, RoundRecord, resolve_log_path
from ray_elastic.placement import autoscaler_node_types, check_feasible, cluster_nodes
from ray_elastic.progress import make_progress


@dataclass
class RunResult:
    """What a finished run returns.

    Attributes:
        return_values: train_fn's return value per rank of the final round.
        metrics: the last metrics reported by rank 0.
        restarts: restarts spent (failures; scale-ups are free).
        rounds: history of rounds: (round_id, world_size, num_nodes, started_at, cause).
        events: every transition as a structured event.
        metrics_history: rank 0's reports with time, round id and world size; past 10,000
            entries every other one is dropped (repeatedly), so a long run keeps a coarser history.
        worker_pids: every worker process the run started (all gone once `run` returns).
        snapshot: how commits were kept when the run ended: "live" (optimizer state by reference) or
            "copy"; with snapshot="auto", a `snapshot` event says when and why it was chosen.
    """

    return_values: list[Any]
    metrics: dict[str, Any] | None
    restarts: int
    rounds: list[RoundRecord]
    events: list[Event] = field(default_factory=list)
    metrics_history: list[dict[str, Any]] = field(default_factory=list)
    run_id: str = ""
    worker_pids: list[int] = field(default_factory=list)
    snapshot: str = ""


def _find_unpicklable(fn: Callable[..., Any]) -> str | None:
    """Name the captured object that stops train_fn from pickling, if one can be found."""
    try:
        captured = inspect.getclosurevars(fn)
    except (TypeError, ValueError):
        return None
    for kind, names in (("closure variable", captured.nonlocals), ("global", captured.globals)):
        for name, value in names.items():
            try:
                cloudpickle.dumps(value)
            except Exception as exc:  # noqa: BLE001 - any pickling failure is the answer
                return f"{kind} {name!r} ({type(value).__name__}): {exc}"
    return None


_PICKLE_LOCK = threading.Lock()


def _pickle_train_fn(train_fn: Callable[..., Any], train_config: Any) -> bytes:
    if not callable(train_fn):
        raise ConfigError(f"train_fn must be callable, got {type(train_fn).__name__}.")
    module = sys.modules.get(getattr(train_fn, "__module__", "") or "")
    by_value = module is not None and module.__name__ != "__main__" and "site-packages" not in (
        getattr(module, "__file__", "") or ""
    )
    with _PICKLE_LOCK:  # the by-value registry is global: runs started from two threads must not interleave
        if by_value:
            cloudpickle.register_pickle_by_value(module)
        try:
            return cloudpickle.dumps((train_fn, train_config))
        except Exception as exc:  # noqa: BLE001 - reported with the culprit
            culprit = _find_unpicklable(train_fn)
            where = f" It captures {culprit}." if culprit else ""
            raise ConfigError(
                f"train_fn cannot be pickled to send to workers: {exc}.{where} Create that object inside "
                f"train_fn instead of capturing it."
            ) from exc
        finally:
            if by_value:
                cloudpickle.unregister_pickle_by_value(module)


# Starting a local Ray, Ray turns its token authentication on and warns that it did; the warning
# is for shared clusters and there is nothing to act on here, so a local start leaves it out.
_LOCAL_START_NOTICES = ("ray._private.authentication.authentication_token_setup",)


def _connect(ray_address: str | None) -> None:
    if ray.is_initialized():
        return
    address = ray_address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        check_cluster_access(address)  # a missing or wrong Ray token: ConfigError now, not a 20 s retry
        try:
            ray.init(address=address, log_to_driver=True)
        except ray.exceptions.AuthenticationError as exc:
            raise ConfigError(f"cannot join the Ray cluster at {address}: {exc}") from None
        return
    loggers = [logging.getLogger(name) for name in _LOCAL_START_NOTICES]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        ray.init(address=address, include_dashboard=False)
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def run(
    train_fn: Callable[..., Any],
    *,
    config: Any = None,
    min_nodes: int = 1,
    max_nodes: int | None = None,
    nproc_per_node: int = 1,
    max_restarts: int = 3,
    use_gpu: bool = False,
    resources_per_worker: Mapping[str, float] | None = None,
    storage_path: str | None = None,
    name: str | None = None,
    resume: bool = False,
    checkpoint_every: int = 1,
    keep_checkpoints: int = 2,
    wait_for_nodes_timeout_s: float = 60.0,
    hang_timeout_s: float | None = 300.0,
    abort_timeout_s: float = 5.0,
    probe_timeout_s: float = 2.0,
    worker_start_timeout_s: float = 180.0,
    heartbeat_interval_s: float = 0.5,
    join_debounce_s: float = 0.5,
    replacement_wait_s: float = 3.0,
    collective_timeout_s: float = 1800.0,
    backend: str | None = None,
    event_log_path: str | None = None,
    progress: str = "auto",
    ray_address: str | None = None,
    init_process_group: bool = True,
    warmup_modules: Sequence[str] = ("torch._dynamo",),
    snapshot: str = "auto",
    shard_replicas: int = 1,
    shard_replica_every: int = 1,
    shard_replica_overlap: bool = False,
    store_port: int = 0,
) -> RunResult:
    """Train `train_fn` on between min_nodes and max_nodes Ray nodes, surviving failures.

    Args:
        train_fn: called on every worker as `train_fn(config)` (or `train_fn()`), with the
            default process group initialized; called again after each membership change.
        config: passed to train_fn.
        min_nodes, max_nodes: node count range (max defaults to min).
        nproc_per_node: workers per node.
        max_restarts: failures tolerated (-1: unlimited). Scale-ups are free.
        use_gpu: one GPU per worker, nccl backend.
        resources_per_worker: Ray resources of one worker (default {"CPU": 1}).
        storage_path, name, resume, checkpoint_every, keep_checkpoints: durable checkpoints.
        wait_for_nodes_timeout_s: how long to wait below min_nodes before failing.
        hang_timeout_s: a round with no commit/report for this long is treated as hung (None: off).
        abort_timeout_s: how long an aborted worker may take to leave its round before it is killed.
        probe_timeout_s: a worker that answers no liveness probe for this long, and whose native
            (GIL-free) pulse does not answer either, is lost to silence (frozen, or cut off).
        worker_start_timeout_s: how long placing and starting workers on existing nodes may take.
        heartbeat_interval_s: how often the coordinator probes workers (progress, metrics).
        join_debounce_s: a burst of joining nodes settles for this long before one re-form (not when the
            nodes waiting already fill max_nodes: they join at the next commit).
        replacement_wait_s: after a failure, no new worker process starts (a dead worker's replacement, the
            workers of a new node) until the survivors commit or report in their new round, or this long
            after the failure: a starting process (Python, Ray, torch) takes CPU from the survivors'
            recovery on the node it shares with them. 0: start them at once.
        collective_timeout_s: torch.distributed timeout (the last resort; aborts come first).
        backend: "gloo" or "nccl" (default: nccl with use_gpu, else gloo).
        event_log_path: also write events as JSON lines here.
        progress: "auto", "bar", "log" or "none".
        ray_address: cluster to connect to (default: RAY_ADDRESS, else a local Ray).
        init_process_group: False for train_fns that form their own group (the CLI's scripts).
        warmup_modules: imported by every worker before it joins a round, so a newcomer does not
            import them inside the round while survivors wait (DDP's constructor imports
            torch._dynamo: ~2 s on 2 cores). Pass () to skip.
        snapshot: how `State.commit()` keeps the commit. "auto" (default): copies for the first
            commits while the loop is watched, then "live" if each optimizer.step() is followed by
            commit() with no collective in between, else copies for good (no error); the `snapshot`
            event and `RunResult.snapshot` say which. "copy": a copy of every tensor (any loop).
            "live": an optimizer's parameters and state are kept by reference, not copied (no
            commit cost for them); needs commit() after every optimizer.step() with no collective
            in between (checked), and loses the commit (SnapshotLostError) if train_fn raises
            between optimizer.step() and commit() on every rank at once.
        shard_replicas: for sharded (FSDP2) state, how many other ranks (on other nodes first) keep a
            copy of each rank's committed shards, so that losing a rank costs no committed step
            (0: none; a lost shard then comes from storage). Ignored for replicated (DDP) state.
        shard_replica_every: refresh those copies at every N-th commit (and at every commit where the
            world changes); after a failure at most N-1 committed steps are redone.
        shard_replica_overlap: send each commit's copies while the next step trains instead of inside
            commit(): cheaper steps, but a rank lost before its copy arrived costs the last committed
            step (at most N with shard_replica_every=N). Resizes at a commit still redo none.
        store_port: port of every round's store (MASTER_PORT) on the coordinator's node, for
            scripts that name it (the CLI's --master-port); 0 (default) picks a free port each round.

    Returns:
        RunResult of the final round.

    Raises:
        ConfigError: bad input, before any actor starts.
        TrainingFailedError: the run failed; names the first failure and the budget spent.
        RunAbortedError: interrupted.
    """
    run_id = name or f"run-{uuid.uuid4().hex[:8]}"
    cfg = validate(
        RunConfig(
            run_id=run_id,
            min_nodes=min_nodes,
            max_nodes=min_nodes if max_nodes is None else max_nodes,
            nproc_per_node=nproc_per_node,
            max_restarts=max_restarts,
            use_gpu=use_gpu,
            backend=backend,
            resources_per_worker={} if resources_per_worker is None else resources_per_worker,
            storage_path=storage_path,
            resume=resume,
            checkpoint_every=checkpoint_every,
            keep_checkpoints=keep_checkpoints,
            wait_for_nodes_timeout_s=wait_for_nodes_timeout_s,
            hang_timeout_s=hang_timeout_s,
            abort_timeout_s=abort_timeout_s,
            probe_timeout_s=probe_timeout_s,
            worker_start_timeout_s=worker_start_timeout_s,
            heartbeat_interval_s=heartbeat_interval_s,
            join_debounce_s=join_debounce_s,
            replacement_wait_s=replacement_wait_s,
            collective_timeout_s=collective_timeout_s,
            event_log_path=resolve_log_path(event_log_path),
            init_process_group=init_process_group,
            # a bare string is kept as is, so that validate() rejects it instead of splitting it into letters
            warmup_modules=warmup_modules if isinstance(warmup_modules, str) else tuple(warmup_modules),  # type: ignore[arg-type]
            snapshot=snapshot,
            shard_replicas=shard_replicas,
            shard_replica_every=shard_replica_every,
            shard_replica_overlap=shard_replica_overlap,
            store_port=store_port,
        )
    )
    if progress not in ("auto", "bar", "log", "none"):
        raise ConfigError(f"progress must be 'auto', 'bar', 'log' or 'none', got {progress!r}.")
    blob = _pickle_train_fn(train_fn, config)
    checkpointer = None
    if cfg.storage_path:
        from ray_elastic.checkpoint import Checkpointer

        checkpointer = Checkpointer.for_run(cfg)
    _connect(ray_address)
    check_feasible(cfg, cluster_nodes(), autoscaler_node_types())
    try:
        coordinator = (
            ray.remote(Coordinator)
            .options(
                name=coordinator_name(run_id),
                num_cpus=0,
                max_concurrency=8,
                scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
            )
            .remote(cfg, blob, checkpointer)
        )
    except ValueError as exc:  # the actor name is taken: a run of this name is live
        raise ConfigError(
            f"a run named {run_id!r} is already running on this Ray cluster; wait for it to end or choose "
            f"another name."
        ) from exc
    summary = _drive(coordinator, cfg, make_progress(progress))
    if summary.error is not None:
        raise summary.error
    return RunResult(
        return_values=summary.return_values,
        metrics=summary.metrics,
        restarts=summary.restarts,
        rounds=summary.rounds,
        events=summary.events,
        metrics_history=summary.metrics_history,
        run_id=run_id,
        worker_pids=summary.worker_pids,
        snapshot=summary.snapshot,
    )


def _drive(coordinator: Any, cfg: RunConfig, display: Any) -> RunSummary:
    """Wait for the coordinator, showing progress; tear everything down on any exit."""
    run_ref = coordinator.run.remote()
    seen = 0
    try:
        while True:
            done, _ = ray.wait([run_ref], timeout=display.interval_s)
            try:
                snapshot = ray.get(coordinator.progress.remote(seen), timeout=5)
                seen += len(snapshot["events"])
                display.update(snapshot)
            except (RayActorError, ray.exceptions.GetTimeoutError):
                pass
            if done:
                break
        try:
            return ray.get(run_ref)
        except RayActorError as exc:
            hint = (
                f"Run again with storage_path={cfg.storage_path!r}, name={cfg.run_id!r} and resume=True to "
                f"continue from the newest complete checkpoint"
                if cfg.storage_path
                else "No storage_path was set, so nothing durable is left; set storage_path= to be able to resume"
            )
            raise CoordinatorLostError(
                f"the coordinator of run {cfg.run_id!r} died ({str(exc).splitlines()[0]}); its workers "
                f"were torn down. {hint}"
            ) from exc
    except BaseException:
        coordinator.abort.remote("driver interrupted")
        deadline = time.monotonic() + cfg.abort_timeout_s + 5
        while time.monotonic() < deadline:
            done, _ = ray.wait([run_ref], timeout=0.2)
            if done:
                break
        try:  # show how the run ended (the abort) before re-raising
            display.update(ray.get(coordinator.progress.remote(seen), timeout=2))
        except Exception:  # noqa: BLE001 - the coordinator may be gone
            pass
        raise
    finally:
        display.close()
        ray.kill(coordinator, no_restart=True)
        _remove_placement_groups(cfg.run_id)  # they outlive a coordinator that died


def coordinator_name(run_id: str) -> str:
    """The Ray actor name of a run's coordinator (find it with `ray.get_actor`)."""
    return f"ray_elastic-coordinator-{run_id}"


def _remove_placement_groups(run_id: str) -> None:
    """Remove the run's node placement groups (`ray_elastic-<run_id>-<node id>`) still standing."""
    prefix = f"ray_elastic-{run_id}-"
    for info in (ray.util.placement_group_table() or {}).values():
        pg_name = str(info.get("name", ""))
        suffix = pg_name[len(prefix):]
        if not pg_name.startswith(prefix) or "-" in suffix or info.get("state") == "REMOVED":
            continue
        try:
            remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(info["placement_group_id"])))
        except Exception:  # noqa: BLE001 - already gone
            pass

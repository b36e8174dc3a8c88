"""One frozen configuration for a run, validated before anything starts."""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ray_elastic.errors import ConfigError

SNAPSHOT_MODES = ("auto", "copy", "live")


@dataclass(frozen=True)
class RunConfig:
    """Everything the coordinator and workers need to know about a run.

    Sizes are counts of nodes (a node group holds `nproc_per_node` workers).
    Every timeout is in seconds (`_s`); `None` disables where documented.
    """

    run_id: str
    min_nodes: int = 1
    max_nodes: int = 1
    nproc_per_node: int = 1
    max_restarts: int = 3
    use_gpu: bool = False
    backend: str | None = None
    resources_per_worker: Mapping[str, float] = field(default_factory=dict)
    storage_path: str | None = None
    resume: bool = False
    checkpoint_every: int = 1
    keep_checkpoints: int = 2
    # Timeouts and cadences.
    wait_for_nodes_timeout_s: float = 60.0
    worker_start_timeout_s: float = 180.0
    hang_timeout_s: float | None = 300.0
    abort_timeout_s: float = 5.0
    cause_wait_s: float = 1.0  # a round failed with only a peer's collective error known: wait this long for the cause
    probe_timeout_s: float = 2.0
    heartbeat_interval_s: float = 0.5
    join_debounce_s: float = 0.5
    replacement_wait_s: float = 3.0  # after a failure, new workers start once the survivors move, at most this late
    initial_gather_s: float = 2.0
    collective_timeout_s: float = 1800.0
    node_poll_interval_s: float = 1.0
    # Node drains (coordinator/drain.py): how often Ray is asked which nodes are draining, and the
    # time kept in hand before a drain's deadline when deciding whether to leave at a commit.
    drain_poll_interval_s: float = 0.25
    drain_margin_s: float = 1.0
    event_log_path: str | None = None
    # False for train_fns that form their own group (the torchrun-compatible CLI).
    init_process_group: bool = True
    warmup_modules: tuple[str, ...] = ("torch._dynamo",)
    snapshot: str = "auto"
    # Sharded (FSDP2) state: copies of each rank's committed shards on other nodes, refreshed every N commits.
    shard_replicas: int = 1
    shard_replica_every: int = 1
    shard_replica_overlap: bool = False
    # Port of every round's store on the coordinator's node (the CLI's --master-port); 0: a free one.
    store_port: int = 0
    # OMP_NUM_THREADS of every worker: the driver's, else 1. Each worker sets it itself: a Ray runtime_env
    # would start every worker process through Ray's setup process (measured: ~1.4 s more CPU per worker).
    omp_num_threads: str = field(default_factory=lambda: os.environ.get("OMP_NUM_THREADS") or "1")

    @property
    def worker_backend(self) -> str:
        """The torch.distributed backend the workers form their group with."""
        if self.backend:
            return self.backend
        return "nccl" if self.use_gpu else "gloo"

    @property
    def bundle(self) -> dict[str, float]:
        """Resources of one worker, as one placement-group bundle."""
        bundle = {"CPU": 1.0}
        bundle.update({k: float(v) for k, v in self.resources_per_worker.items()})
        if self.use_gpu:  # a whole GPU per worker unless a share is asked for (ranks sharing one, gloo)
            asked = bundle.get("GPU", 0.0)
            bundle["GPU"] = asked if 0 < asked < 1 else max(1.0, asked)
        return {k: v for k, v in bundle.items() if v > 0}

    @property
    def unlimited_restarts(self) -> bool:
        return self.max_restarts < 0


def _require_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an int, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}.")


def _require_seconds(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number of seconds, got {value!r}.")
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a finite number of seconds >= 0, got {value}.")


def _find_spec(module: str) -> Any:
    try:
        return importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None


def validate(config: RunConfig) -> RunConfig:
    """Check a config's own consistency (not the cluster's); return it.

    Raises:
        ConfigError: naming the argument and what to change.
    """
    _require_int("min_nodes", config.min_nodes, 1)
    _require_int("max_nodes", config.max_nodes, 1)
    if config.max_nodes < config.min_nodes:
        raise ConfigError(
            f"max_nodes ({config.max_nodes}) must be >= min_nodes ({config.min_nodes}); "
            f"raise max_nodes or lower min_nodes."
        )
    _require_int("nproc_per_node", config.nproc_per_node, 1)
    if isinstance(config.max_restarts, bool) or not isinstance(config.max_restarts, int):
        raise ConfigError(f"max_restarts must be an int (-1 for unlimited), got {config.max_restarts!r}.")
    if config.max_restarts < -1:
        raise ConfigError(f"max_restarts must be >= 0, or -1 for unlimited; got {config.max_restarts}.")
    if not isinstance(config.use_gpu, bool):
        raise ConfigError(f"use_gpu must be True or False, got {config.use_gpu!r}.")
    if config.backend not in (None, "gloo", "nccl"):
        raise ConfigError(f"backend must be 'gloo', 'nccl' or None (auto), got {config.backend!r}.")
    if not isinstance(config.resources_per_worker, Mapping):
        raise ConfigError(
            f"resources_per_worker must be a dict like {{'CPU': 2}}, got {config.resources_per_worker!r}."
        )
    for key, amount in config.resources_per_worker.items():
        if not isinstance(key, str) or isinstance(amount, bool) or not isinstance(amount, (int, float)):
            raise ConfigError(f"resources_per_worker entries must be name -> number, got {key!r}: {amount!r}.")
        if amount < 0:
            raise ConfigError(f"resources_per_worker[{key!r}] must be >= 0, got {amount}.")
    shared_gpu = config.resources_per_worker.get("GPU", 0)
    if config.use_gpu and 0 < shared_gpu < 1 and config.worker_backend == "nccl":
        raise ConfigError(
            f"resources_per_worker={{'GPU': {shared_gpu}}} puts several ranks on one GPU, which NCCL cannot "
            f"run; set backend='gloo' to share GPUs, or give each worker a whole GPU ({{'GPU': 1}})."
        )
    _require_int("checkpoint_every", config.checkpoint_every, 1)
    _require_int("keep_checkpoints", config.keep_checkpoints, 1)
    for name in (
        "wait_for_nodes_timeout_s",
        "worker_start_timeout_s",
        "abort_timeout_s",
        "cause_wait_s",
        "probe_timeout_s",
        "heartbeat_interval_s",
        "join_debounce_s",
        "replacement_wait_s",
        "initial_gather_s",
        "collective_timeout_s",
        "node_poll_interval_s",
        "drain_poll_interval_s",
        "drain_margin_s",
    ):
        _require_seconds(name, getattr(config, name))
    _require_seconds("hang_timeout_s", config.hang_timeout_s, allow_none=True)
    if config.collective_timeout_s == 0:
        raise ConfigError("collective_timeout_s must be > 0.")
    if config.hang_timeout_s == 0:
        raise ConfigError("hang_timeout_s must be > 0 (every rank would be hung at once), or None to turn the "
                          "hang watchdog off.")
    if config.probe_timeout_s == 0:
        raise ConfigError("probe_timeout_s must be > 0: it is how long a worker may stay silent before it is "
                          "declared lost (default 2).")
    if config.probe_timeout_s < 2 * config.heartbeat_interval_s:
        raise ConfigError(
            f"probe_timeout_s ({config.probe_timeout_s:g}) must be at least twice heartbeat_interval_s "
            f"({config.heartbeat_interval_s:g}): probes go out every heartbeat_interval_s, so a healthy worker "
            f"would look silent. Raise probe_timeout_s or lower heartbeat_interval_s."
        )
    if isinstance(config.warmup_modules, str) or not all(
        isinstance(m, str) and m for m in config.warmup_modules
    ):
        raise ConfigError(
            f"warmup_modules must be a list of module names like ['torch._dynamo'], got {config.warmup_modules!r}."
        )
    missing = [m for m in config.warmup_modules if _find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"warmup_modules names module(s) that cannot be imported here: {missing}; fix the names or install them."
        )
    if config.snapshot not in SNAPSHOT_MODES:
        raise ConfigError(
            f"snapshot must be 'auto' (the default: live where the loop allows it, else copy), 'copy' (copy "
            f"everything at each commit) or 'live' (keep optimizer-owned tensors by reference; commit right "
            f"after optimizer.step()), got {config.snapshot!r}."
        )
    _require_int("shard_replicas", config.shard_replicas, 0)
    _require_int("shard_replica_every", config.shard_replica_every, 1)
    if not isinstance(config.shard_replica_overlap, bool):
        raise ConfigError(f"shard_replica_overlap must be True or False, got {config.shard_replica_overlap!r}.")
    _require_int("store_port", config.store_port, 0)
    if config.store_port > 65535:
        raise ConfigError(f"store_port must be a TCP port (0-65535, 0 for a free one), got {config.store_port}.")
    if not (config.omp_num_threads.isdigit() and int(config.omp_num_threads) > 0):
        raise ConfigError(
            f"OMP_NUM_THREADS is {config.omp_num_threads!r} in the driver's environment; the workers take it, and it "
            f"must be a whole number of threads >= 1: set it to one (or unset it for 1)."
        )
    if config.resume and not config.storage_path:
        raise ConfigError("resume=True needs storage_path= where the run's checkpoints live.")
    return config

"""The systems the benchmarks compare, each behind the same small interface.

A launcher starts the shared workload (workloads/loops.py) writing step logs to a
directory, and answers `alive()`, `finish(timeout_s)` and `close()`; the Ray-based
ones run on a `local_cluster` of their own and can `add(count)` nodes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import uuid
from pathlib import Path
from typing import Any

from _common import LOOPBACK, WORKER_ENV, InThread, ProcessGroups, Record, connect, dump_stacks, torchrun_cmd

from ray_elastic.testing.ports import free_port


def _script_args(log_dir: Path, checkpoint: Path, sleep_s: float, steps: int) -> list[str]:
    return ["--log-dir", str(log_dir), "--checkpoint", str(checkpoint), "--sleep-s", str(sleep_s),
            "--steps", str(steps)]


class _OnLocalCluster:
    """Runs a driver call in a thread against a `local_cluster` it owns; SIGKILLs workers by pid."""

    name = ""

    def __init__(self, nodes: int, sleep_s: float, steps: int):
        self.nodes, self.sleep_s, self.steps = nodes, sleep_s, steps
        self._stack = contextlib.ExitStack()
        self.cluster: Any = None
        self.runner: InThread | None = None

    def _start_cluster(self) -> None:
        from ray_elastic.testing import local_cluster

        self.cluster = self._stack.enter_context(local_cluster(num_nodes=self.nodes, connect=False))
        connect(self.cluster, self.nodes)

    def add(self, count: int) -> None:
        for _ in range(count):
            self.cluster.add_node()

    def kill(self, member: Record) -> None:
        os.kill(member.pid, signal.SIGKILL)

    def alive(self) -> bool:
        return self.runner is not None and self.runner.alive()

    def close(self) -> None:
        self._stack.close()


class ElasticLauncher(_OnLocalCluster):
    """ray_elastic.run on `nodes` simulated nodes × 1 worker, between min_nodes and max_nodes."""

    name = "ray_elastic"

    def __init__(self, nodes: int, min_nodes: int, max_nodes: int, restarts: int, sleep_s: float, steps: int,
                 warmup: bool = True, snapshot: str = "auto"):
        super().__init__(nodes, sleep_s, steps)
        self.min_nodes, self.max_nodes, self.restarts, self.warmup = min_nodes, max_nodes, restarts, warmup
        self.snapshot = snapshot
        if not warmup:
            self.name = "ray_elastic, warmup_modules=()"
        if snapshot != "auto":
            self.name = f"ray_elastic, snapshot={snapshot}"

    def start(self, log_dir: Path) -> None:
        from workloads.loops import elastic_train

        import ray_elastic

        self._start_cluster()
        config = {"log_dir": str(log_dir), "sleep_s": self.sleep_s, "steps": self.steps}
        self.runner = InThread(lambda: ray_elastic.run(
            elastic_train, config=config, min_nodes=self.min_nodes, max_nodes=self.max_nodes,
            max_restarts=self.restarts, progress="none", event_log_path=str(log_dir / "events.jsonl"),
            warmup_modules=("torch._dynamo",) if self.warmup else (), snapshot=self.snapshot,
        ))

    def kill_node_of(self, member: Record) -> None:
        node = next(n for n in self.cluster.nodes if self.cluster.node_id(n) == member.extra)
        self.cluster.kill_node(node, graceful=False)

    def finish(self, timeout_s: float) -> str:
        assert self.runner is not None
        result = self.runner.join(timeout_s)
        return f"run() returned, {result.restarts} restart(s), worlds {[r.world_size for r in result.rounds]}"


class RayTrainLauncher(_OnLocalCluster):
    """Ray Train TorchTrainer checkpointing every step; `num_workers` an int, or (min, max) for v2 elastic."""

    def __init__(self, nodes: int, num_workers: int | tuple[int, int], restarts: int, sleep_s: float, steps: int,
                 storage: Path, monitor_s: float = 1.0):
        super().__init__(nodes, sleep_s, steps)
        self.num_workers, self.restarts, self.storage, self.monitor_s = num_workers, restarts, storage, monitor_s
        self.name = "Ray Train v2 elastic" if isinstance(num_workers, tuple) else "Ray Train TorchTrainer"

    def start(self, log_dir: Path) -> None:
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
        from workloads.loops import ray_train_loop

        self._start_cluster()
        elastic: dict[str, Any] = {}
        if isinstance(self.num_workers, tuple):
            elastic["elastic_resize_monitor_interval_s"] = self.monitor_s
        trainer = TorchTrainer(
            ray_train_loop,
            train_loop_config={"log_dir": str(log_dir), "sleep_s": self.sleep_s, "steps": self.steps},
            scaling_config=ScalingConfig(num_workers=self.num_workers, use_gpu=False, **elastic),  # type: ignore[arg-type]
            run_config=RunConfig(
                name=f"bench-{uuid.uuid4().hex[:6]}", storage_path=str(self.storage),
                failure_config=FailureConfig(max_failures=self.restarts),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
        )
        self.runner = InThread(trainer.fit)

    def finish(self, timeout_s: float) -> str:
        assert self.runner is not None
        result = self.runner.join(timeout_s)
        return f"fit() returned (error: {getattr(result, 'error', None)!r})"


class _Torchrun:
    """torchrun agents as process groups; the script reloads a checkpoint file that rank 0 writes every step."""

    def __init__(self, sleep_s: float, steps: int, checkpoint: Path, env: dict[str, str] | None = None):
        self.sleep_s, self.steps, self.checkpoint = sleep_s, steps, checkpoint
        self.env = {**WORKER_ENV, **(env or {})}
        self.groups = ProcessGroups()
        self.agents: list[Any] = []

    def _start_agent(self, launcher_args: list[str], log_dir: Path, log_name: str) -> None:
        cmd = torchrun_cmd(*launcher_args, script_args=_script_args(log_dir, self.checkpoint, self.sleep_s,
                                                                    self.steps))
        self.agents.append(self.groups.start(cmd, log_dir / log_name, env=self.env))

    def alive(self) -> bool:
        return any(agent.poll() is None for agent in self.agents)

    def kill(self, member: Record) -> None:
        os.kill(member.pid, signal.SIGKILL)

    def finish(self, timeout_s: float) -> str:
        return f"torchrun exited with {[agent.wait(timeout_s) for agent in self.agents]}"

    def close(self) -> None:
        for agent in self.agents:
            if agent.poll() is None:
                dump_stacks(agent.pid, "torchrun_train.py")  # where a stuck worker hangs, into its log
        self.groups.close()


# torchrun's agent shares its rendezvous TCPStore with the workers by default; a restarted worker can then
# read the dead worker's stale keys (pytorch/pytorch#135712). This variable turns the sharing off.
NO_SHARED_STORE = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


class TorchrunStandalone(_Torchrun):
    """torchrun --standalone --nproc-per-node=N --max-restarts=K (optionally with extra environment)."""

    name = "torchrun --standalone"

    def __init__(self, world: int, restarts: int, sleep_s: float, steps: int, checkpoint: Path,
                 env: dict[str, str] | None = None):
        super().__init__(sleep_s, steps, checkpoint, env)
        self.world, self.restarts = world, restarts
        if env:
            self.name = "torchrun --standalone, " + ", ".join(f"{k}={v}" for k, v in env.items())

    def start(self, log_dir: Path) -> None:
        self._start_agent(["--standalone", f"--nproc-per-node={self.world}", f"--max-restarts={self.restarts}"],
                          log_dir, "torchrun.out")


class TorchrunElastic(_Torchrun):
    """One torchrun agent per node, `--nnodes=MIN:MAX` with the c10d rendezvous on this machine."""

    def __init__(self, min_nodes: int, max_nodes: int, sleep_s: float, steps: int, checkpoint: Path):
        super().__init__(sleep_s, steps, checkpoint)
        self.min_nodes, self.max_nodes = min_nodes, max_nodes
        self.name = f"torchrun --nnodes={min_nodes}:{max_nodes} (c10d)"
        self.log_dir: Path | None = None
        self.endpoint = self.run_id = ""

    def start(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.endpoint = f"{LOOPBACK}:{free_port()}"
        self.run_id = uuid.uuid4().hex[:8]
        self.add(self.min_nodes)

    def add(self, count: int) -> None:
        assert self.log_dir is not None
        for _ in range(count):
            self._start_agent(
                [f"--nnodes={self.min_nodes}:{self.max_nodes}", "--nproc-per-node=1", "--rdzv-backend=c10d",
                 f"--rdzv-endpoint={self.endpoint}", f"--rdzv-id={self.run_id}", "--max-restarts=3",
                 f"--local-addr={LOOPBACK}"],
                self.log_dir, f"agent-{len(self.agents)}.out",
            )

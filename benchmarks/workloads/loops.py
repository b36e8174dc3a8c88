"""One DDP workload, three launchers: ray_elastic, torchrun (see torchrun_train.py) and Ray Train.

Every process appends one line per completed step to its own file in `log_dir`
(`steps-<pid>.log`), and one `enter` line each time the training function is
(re-)entered, so the benchmark can find pids by rank and time recovery from the
outside. Line format (space separated):

    step <step> <wall time> <rank> <world> <incarnation> <pid> <commit ms>
    enter <restored step> <wall time> <rank> <world> <incarnation> <pid> <node id>

A step is logged once it is complete: committed (ray_elastic), checkpointed
(torchrun, by rank 0) or reported with its checkpoint (Ray Train). The harness
stops a run by writing a step number into `<log_dir>/stop_at`.

This module imports nothing from the benchmarks package, so that ray_elastic can
pickle `elastic_train` by value and torchrun can import it as a plain script neighbour.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

DEFAULTS: dict[str, Any] = {"width": 64, "depth": 2, "batch": 32, "sleep_s": 0.02, "steps": 1_000_000}


def make_mlp(width: int, depth: int) -> torch.nn.Module:
    """`depth` Linear(width, width) layers with ReLU between them: depth * (width² + width) parameters."""
    layers: list[torch.nn.Module] = []
    for index in range(depth):
        layers.append(torch.nn.Linear(width, width))
        if index < depth - 1:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def width_for_params(params: float, depth: int = 4) -> int:
    """The MLP width giving about `params` parameters at this depth."""
    return max(4, round((params / depth) ** 0.5))


class StepLog:
    """Line-buffered per-process log of entries and completed steps (see module docstring)."""

    def __init__(self, log_dir: str, rank: int, world: int, incarnation: str):
        self.dir = Path(log_dir)
        self.rank, self.world, self.incarnation = rank, world, incarnation
        self.pid = os.getpid()
        self._file = open(self.dir / f"steps-{self.pid}.log", "a", buffering=1)  # noqa: SIM115 - lives with the process

    def enter(self, restored_step: int, node_id: str = "-") -> None:
        self._write("enter", restored_step, f"{node_id or '-'}")

    def step(self, step: int, commit_ms: float = 0.0) -> None:
        self._write("step", step, f"{commit_ms:.3f}")

    def _write(self, kind: str, step: int, extra: str) -> None:
        self._file.write(
            f"{kind} {step} {time.time():.6f} {self.rank} {self.world} {self.incarnation} {self.pid} {extra}\n"
        )

    def stop_at(self, default: int) -> int:
        """The step to stop at: `<log_dir>/stop_at` when the harness wrote one, else `default`."""
        try:
            return min(default, int((self.dir / "stop_at").read_text().strip() or default))
        except (FileNotFoundError, ValueError):
            return default


def wait_for_turn(turn_file: str | None, system: str, next_step: int, poll_s: float = 0.02) -> bool:
    """Block until `system` may take `next_step`; False when told to stop (no turn file: always True).

    The harness writes `<system> <last step allowed>` or `stop` into `turn_file`,
    so that several systems alive at once take turns (overhead_interleaved.py).
    """
    if not turn_file:
        return True
    while True:
        try:
            words = Path(turn_file).read_text().split()
        except FileNotFoundError:
            words = []
        if words == ["stop"]:
            return False
        if len(words) == 2 and words[0] == system and next_step <= int(words[1]):
            return True
        time.sleep(poll_s)


def leave_group() -> None:
    """`destroy_process_group()`, then a moment for gloo's worker thread to free the last collective's record:
    freed during interpreter shutdown it aborts the process (torch 2.13; README, "CLI")."""
    import torch.distributed as dist

    dist.destroy_process_group()
    time.sleep(0.05)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> float:
    loss = model(x).pow(2).mean()
    opt.zero_grad(set_to_none=False)
    loss.backward()
    opt.step()
    return float(loss.detach())


def _setup(config: dict[str, Any], rank: int) -> tuple[dict[str, Any], torch.nn.Module, torch.Tensor]:
    cfg = {**DEFAULTS, **config}
    torch.manual_seed(0)
    net = make_mlp(cfg["width"], cfg["depth"])
    x = torch.randn(cfg["batch"], cfg["width"], generator=torch.Generator().manual_seed(rank))
    return cfg, net, x


def elastic_train(config: dict[str, Any]) -> dict[str, Any]:
    """The workload under ray_elastic: State.commit every `commit_every` steps (default 1)."""
    import ray_elastic

    ctx = ray_elastic.get_context()
    cfg, net, x = _setup(config, ctx.rank)
    model = torch.nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    state = ray_elastic.State(model=model, optimizer=opt, step=0)
    log = StepLog(cfg["log_dir"], ctx.rank, ctx.world_size, f"r{ctx.round_id}")
    log.enter(state.step, ctx.node_id)
    commit_every = int(cfg.get("commit_every", 1))
    loss = 0.0
    while state.step < log.stop_at(cfg["steps"]):
        if not wait_for_turn(cfg.get("turn_file"), cfg.get("system", ""), state.step + 1):
            break
        loss = train_step(model, opt, x)
        state.step += 1
        commit_ms = 0.0
        if state.step % commit_every == 0:
            started = time.perf_counter()
            state.commit()
            commit_ms = (time.perf_counter() - started) * 1e3
        log.step(state.step, commit_ms)
        ray_elastic.report({"step": state.step, "loss": loss})
        if cfg["sleep_s"]:
            time.sleep(cfg["sleep_s"])
    return {"step": state.step, "loss": loss, "pid": os.getpid()}


def ray_train_loop(config: dict[str, Any]) -> None:
    """The workload under Ray Train: checkpoint by `ray.train.report` every step, reload on start."""
    import tempfile

    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg, net, x = _setup(config, rank)
    model = ray.train.torch.prepare_model(net)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            saved = torch.load(Path(directory) / "state.pt", weights_only=False)
        net.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        step = saved["step"]
    log = StepLog(cfg["log_dir"], rank, world, f"p{os.getpid()}")
    log.enter(step)
    while step < log.stop_at(cfg["steps"]):
        loss = train_step(model, opt, x)
        step += 1
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as directory:
            if rank == 0:
                torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "step": step},
                           Path(directory) / "state.pt")
                ray.train.report({"step": step, "loss": loss},
                                 checkpoint=ray.train.Checkpoint.from_directory(directory))
            else:
                ray.train.report({"step": step, "loss": loss})
        log.step(step, (time.perf_counter() - started) * 1e3)
        if cfg["sleep_s"]:
            time.sleep(cfg["sleep_s"])

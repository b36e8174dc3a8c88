"""One FSDP2 workload, three launchers: ray_elastic, torchrun (torchrun_fsdp.py) and Ray Train.

The same `depth`-layer float32 MLP, each Linear and the root wrapped with `fully_shard`
(gloo, CPU), SGD with momentum, a fixed batch per rank. Step logs as in `loops.py`
(`steps-<pid>.log`, `enter`/`step` lines). A step is logged once it is committed
(ray_elastic), or once its DCP checkpoint is written (torchrun, Ray Train): what each
system needs to come back without losing it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

try:  # imported as workloads.fsdp_loops by the harness, as a script neighbour by torchrun_fsdp.py
    from workloads.loops import StepLog, wait_for_turn
except ImportError:  # pragma: no cover - torchrun's script directory
    from loops import StepLog, wait_for_turn  # type: ignore[no-redef]

DEFAULTS: dict[str, Any] = {"width": 256, "depth": 4, "batch": 8, "sleep_s": 0.0, "steps": 1_000_000,
                            "replicate": 1}


def build(width: int, depth: int, device: torch.device | None = None, replicate: int = 1,
          init: bool = True) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The FSDP2 MLP (identical initial weights on every rank) and its optimizer.

    `replicate` > 1: HSDP, on a (replicate, world / replicate) mesh (ranks of a node share a shard group when
    nodes hold world / replicate ranks each), where the world divides; plain FSDP where it does not.
    `init=False`: built on the meta device and its shards allocated uninitialised (`to_empty`), for a caller
    that loads a checkpoint into it (or calls `init_weights`): what FSDP2 users do instead of initialising
    weights a load overwrites (here 40 ms of one core per rank).
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    mesh = None
    if replicate > 1 and dist.get_world_size() % replicate == 0:
        from torch.distributed.device_mesh import init_device_mesh

        shape = (replicate, dist.get_world_size() // replicate)
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))

    if init:
        model = _mlp(width, depth)
        if device is not None:
            model = model.to(device)
    else:
        with torch.device("meta"):
            model = _mlp(width, depth)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if not init:
        model.to_empty(device=device or torch.device("cpu"))
    return model, torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)


def _mlp(width: int, depth: int) -> torch.nn.Sequential:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for index in range(depth):
        layers.append(torch.nn.Linear(width, width))
        if index < depth - 1:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def init_weights(model: torch.nn.Module, width: int, depth: int) -> None:
    """Give a model built with `init=False` the weights `build` initialises (each rank keeps its shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, _mlp(width, depth).state_dict(), options=StateDictOptions(full_state_dict=True))


def batch(cfg: dict[str, Any], rank: int) -> torch.Tensor:
    return torch.randn(cfg["batch"], cfg["width"], generator=torch.Generator().manual_seed(rank))


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> float:
    loss = model(x).pow(2).mean()
    opt.zero_grad(set_to_none=False)
    loss.backward()
    opt.step()
    return float(loss.detach())


def fsdp_elastic_train(config: dict[str, Any]) -> dict[str, Any]:
    """Under ray_elastic: State.commit() every step (snapshot of local shards + replica refresh)."""
    import ray_elastic

    ctx = ray_elastic.get_context()
    cfg = {**DEFAULTS, **config}
    model, opt = build(cfg["width"], cfg["depth"], replicate=cfg["replicate"], init=False)
    x = batch(cfg, ctx.rank)
    state = ray_elastic.State(model=model, optimizer=opt, step=0)
    if state.restored_from == "fresh":  # nothing committed yet: initialise (else State loaded the last commit)
        init_weights(model, cfg["width"], cfg["depth"])
    log = StepLog(cfg["log_dir"], ctx.rank, ctx.world_size, f"r{ctx.round_id}")
    log.enter(state.step, ctx.node_id)
    loss = 0.0
    while state.step < log.stop_at(cfg["steps"]):
        if not wait_for_turn(cfg.get("turn_file"), cfg.get("system", ""), state.step + 1):
            break
        loss = train_step(model, opt, x)
        state.step += 1
        started = time.perf_counter()
        state.commit()
        log.step(state.step, (time.perf_counter() - started) * 1e3)
        ray_elastic.report({"step": state.step, "loss": loss})
        if cfg["sleep_s"]:
            time.sleep(cfg["sleep_s"])
    return {"step": state.step, "loss": loss, "pid": os.getpid()}


def dcp_save(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, directory: str) -> None:
    """A synchronous sharded checkpoint of model and optimizer (every rank writes its shards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd, "step": torch.tensor(step)}, checkpoint_id=directory)


def dcp_load(model: torch.nn.Module, opt: torch.optim.Optimizer, directory: str) -> int:
    """Load a `dcp_save` checkpoint into model and optimizer (resharded by DCP); return its step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    loaded = {"model": model_sd, "optim": optim_sd, "step": torch.tensor(0)}
    dcp.load(loaded, checkpoint_id=directory)
    set_state_dict(model, opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    return int(loaded["step"])


def fsdp_ray_train_loop(config: dict[str, Any]) -> None:
    """Under Ray Train: a DCP checkpoint reported every step (every rank its shards), loaded on start."""
    import tempfile

    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = {**DEFAULTS, **config}
    checkpoint = ray.train.get_checkpoint()
    model, opt = build(cfg["width"], cfg["depth"], init=checkpoint is None)
    x = batch(cfg, rank)
    step = 0
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            step = dcp_load(model, opt, directory)
    log = StepLog(cfg["log_dir"], rank, world, f"p{os.getpid()}")
    log.enter(step)
    while step < log.stop_at(cfg["steps"]):
        train_step(model, opt, x)
        step += 1
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as directory:
            dcp_save(model, opt, step, directory)
            ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(directory))
        log.step(step, (time.perf_counter() - started) * 1e3)
        if cfg["sleep_s"]:
            time.sleep(cfg["sleep_s"])


def latest_checkpoint(root: str) -> str | None:
    """The directory named in `<root>/latest` (written by rank 0 once a checkpoint is complete)."""
    try:
        name = (Path(root) / "latest").read_text().strip()
    except FileNotFoundError:
        return None
    return str(Path(root) / name) if name else None

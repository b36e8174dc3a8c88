"""An FSDP2 training function for the sharded-state cluster tests (pickled by value into workers).

Rank 0 writes, under `config["trace_dir"]`:

- `steps.log`: `step wall_time pid round_id master_port` per committed step (as `tests.workloads`);
- `members.log` (every rank): `round rank node_id pid restored_from` on entering a round;
- `digests.log`: `commit <step> <sha256>` of the gathered (full) model and optimizer state right
  after each commit, and `restore <round> <step> <sha256> <source>` right after each restore.

A restore is exact when its digest equals the digest of the commit of the same step.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

import torch

import ray_elastic


def _mlp(width: int) -> torch.nn.Sequential:
    torch.manual_seed(0)  # every rank shards the same initial model
    return torch.nn.Sequential(torch.nn.Linear(width, width - 2), torch.nn.Tanh(),
                               torch.nn.Linear(width - 2, width - 4), torch.nn.Tanh(), torch.nn.Linear(width - 4, 1))


def _tensors_digest(tensors: dict) -> Any:  # a hashlib sha256, to be updated further
    digest = hashlib.sha256()
    for key, value in sorted(tensors.items()):
        digest.update(key.encode())
        digest.update(value.detach().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest


def initial_digest(width: int) -> str:
    """sha256 of the weights `_build` initialises (computed without a group)."""
    return _tensors_digest(_mlp(width).state_dict()).hexdigest()


def model_digest(model: torch.nn.Module) -> str:
    """sha256 of the gathered model weights, as `initial_digest` (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return _tensors_digest(get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))).hexdigest()


def _build(width: int, hsdp: bool = False, meta: bool = False) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The MLP, fully_shard-ed on every rank (HSDP: on a 2 x world/2 mesh where the world is even and >= 4).

    `meta`: built on the meta device and its shards allocated uninitialised (`to_empty`), as FSDP2 users build
    models that a checkpoint will fill; `fsdp_train` initialises it only when `State` restored nothing.
    """
    from torch.distributed.fsdp import fully_shard

    mesh = None
    if hsdp:
        from torch.distributed.device_mesh import init_device_mesh

        world = ray_elastic.get_context().world_size
        shape = (2, world // 2) if world >= 4 and world % 2 == 0 else (1, world)
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
    if meta:
        with torch.device("meta"):
            model = _mlp(width)
    else:
        model = _mlp(width)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if meta:
        model.to_empty(device="cpu")
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


def _initialise(model: torch.nn.Module, width: int) -> None:
    """Load `_mlp`'s initial weights into a model built on the meta device (each rank keeps its shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, _mlp(width).state_dict(), options=StateDictOptions(full_state_dict=True))


def full_digest(model: torch.nn.Module, opt: torch.optim.Optimizer) -> str:
    """sha256 of the gathered model and optimizer state (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    digest = _tensors_digest(get_model_state_dict(model, options=options))
    state = get_optimizer_state_dict(model, opt, options=options)["state"]
    for fqn in sorted(state):
        for key, value in sorted(state[fqn].items()):
            digest.update(f"{fqn}/{key}".encode())
            if isinstance(value, torch.Tensor):
                digest.update(value.detach().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _append(path: str, line: str) -> None:
    with open(path, "a", encoding="utf-8") as out:
        out.write(line + "\n")


def _step_limit(steps: int, trace_dir: str) -> int:
    try:
        with open(os.path.join(trace_dir, "stop_at"), encoding="utf-8") as handle:
            return min(steps, int(handle.read().strip()))
    except (OSError, ValueError):
        return steps


def _log_commit(model: torch.nn.Module, opt: torch.optim.Optimizer, rank: int, trace_dir: str, step: int) -> None:
    digest = full_digest(model, opt)
    if rank == 0:
        _append(os.path.join(trace_dir, "digests.log"), f"commit {step} {digest}")


def fsdp_train(config: dict) -> dict:
    """config: steps, trace_dir, sleep_s, width, hsdp, meta_init (build on the meta device: `_build`), faults
    (FaultInjector, checked at the top of each step)."""
    ctx = ray_elastic.get_context()
    trace_dir = config["trace_dir"]
    meta = config.get("meta_init", False)
    model, opt = _build(config.get("width", 9), config.get("hsdp", False), meta)
    state = ray_elastic.State(model=model, optimizer=opt, step=0, log=[])
    if meta and state.restored_from == "fresh":  # nothing committed: initialise, as `_build` does without meta
        _initialise(model, config.get("width", 9))
        digest = model_digest(model)
        if ctx.rank == 0:
            _append(os.path.join(trace_dir, "digests.log"), f"init {ctx.round_id} {digest}")
    _append(os.path.join(trace_dir, "members.log"),
            f"{ctx.round_id} {ctx.rank} {ctx.node_id} {os.getpid()} {state.restored_from}")
    if state.restored_from != "fresh":
        digest = full_digest(model, opt)
        if ctx.rank == 0:
            _append(os.path.join(trace_dir, "digests.log"),
                    f"restore {ctx.round_id} {state.step} {digest} {state.restored_from}")
    faults = config.get("faults")
    generator = torch.Generator().manual_seed(1000 + ctx.rank)
    width = config.get("width", 9)
    while state.step < _step_limit(config["steps"], trace_dir):
        if faults is not None:
            faults.check(state.step)
        x = torch.randn(8, width, generator=generator)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        state.step += 1
        state.log.append(state.step)
        committed = state.commit_id
        try:
            state.commit()
        except BaseException as exc:
            if type(exc).__name__ == "MembershipChange":  # every rank leaves here together: the group still works
                _log_commit(model, opt, ctx.rank, trace_dir, state.step)
            raise
        finally:
            if ctx.rank == 0 and state.commit_id != committed:
                _append(os.path.join(trace_dir, "steps.log"), f"{state.step} {time.time():.6f} {os.getpid()} "
                        f"{ctx.round_id} {os.environ.get('MASTER_PORT', '-')}")
        _log_commit(model, opt, ctx.rank, trace_dir, state.step)
        ray_elastic.report({"step": state.step, "world_size": ctx.world_size})
        if config.get("sleep_s"):
            time.sleep(config["sleep_s"])
    return {"rank": ctx.rank, "log": list(state.log), "restored_from": state.restored_from, "pid": os.getpid(),
            "world_size": ctx.world_size, "digest": full_digest(model, opt)}


def read_restores(trace_dir: str) -> list[dict]:
    """Every restore rank 0 logged: round, step, source, digest, and the digest of that step's last commit before it."""
    commits: dict[int, str] = {}
    restores = []
    path = os.path.join(trace_dir, "digests.log")
    if not os.path.exists(path):
        return restores
    for line in open(path, encoding="utf-8").read().splitlines():
        parts = line.split()
        if parts[0] == "commit":
            commits[int(parts[1])] = parts[2]
        elif parts[0] == "restore":
            step = int(parts[2])
            restores.append({"round": int(parts[1]), "step": step, "digest": parts[3], "source": parts[4],
                             "committed": commits.get(step)})
    return restores


def read_inits(trace_dir: str) -> list[str]:
    """The digests rank 0 logged right after initialising a meta-built model (one per fresh start)."""
    path = os.path.join(trace_dir, "digests.log")
    if not os.path.exists(path):
        return []
    return [line.split()[2] for line in open(path, encoding="utf-8").read().splitlines() if line.startswith("init ")]


def read_members(trace_dir: str) -> list[dict]:
    """Every rank's entry into a round: round, rank, node_id, pid, restored_from."""
    path = os.path.join(trace_dir, "members.log")
    if not os.path.exists(path):
        return []
    rows = [line.split() for line in open(path, encoding="utf-8").read().splitlines() if line.strip()]
    return [{"round": int(r), "rank": int(k), "node_id": n, "pid": int(p), "source": s} for r, k, n, p, s in rows]


def checkpoint_digest(path: str) -> str:
    """`full_digest` of the state in a sharded checkpoint directory, read whole in this process (no group)."""
    import torch.distributed.checkpoint as dcp

    rest = torch.load(os.path.join(path, "rest.pt"), map_location="cpu", weights_only=False)
    full = {spec.key: torch.empty(spec.shape, dtype=spec.dtype) for spec in rest["specs"]}
    import warnings

    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(full, checkpoint_id=path, no_dist=True)
    digest = hashlib.sha256()
    for key in sorted(k for k in full if k.startswith("model/")):
        digest.update(key[len("model/"):].encode())
        digest.update(full[key].reshape(-1).view(torch.uint8).numpy().tobytes())
    state = rest["items"]["optimizer"]["state"]
    for fqn in sorted(state):
        for key in sorted(state[fqn]):
            digest.update(f"{fqn}/{key}".encode())
            value = full.get(f"optimizer/state/{fqn}/{key}", state[fqn][key])
            if isinstance(value, torch.Tensor):
                digest.update(value.detach().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()

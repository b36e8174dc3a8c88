"""Sharded (FSDP2) state on CUDA: snapshots in pinned host memory, restored resharded onto the GPU.

Skipped without CUDA. Two ranks share one GPU with the gloo backend on CUDA tensors, so one
GPU is enough. `RAY_ELASTIC_GPU_TESTS_ON_CPU=1` runs the same code on CPU (to check the tests
themselves where no GPU exists; the pinned-memory assertions are then skipped).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ON_CPU = os.environ.get("RAY_ELASTIC_GPU_TESTS_ON_CPU") == "1"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not torch.cuda.is_available() and not ON_CPU, reason="needs CUDA"),
]


def _device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def _build(device: torch.device, world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(33, 17), torch.nn.Tanh(), torch.nn.Linear(17, 5)).to(device)
    mesh = init_device_mesh(device.type, (world,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


def _gathered(value):
    """A DTensor's full value on CPU, gathered through pickled CPU copies of the local shards (gloo's
    functional all-gather of CUDA tensors, which `get_model_state_dict(full_state_dict=True)` uses,
    crashed with torch 2.11 on an H200); other tensors on CPU."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, value.to_local().detach().cpu())
        return torch.cat(parts, dim=0)  # fully_shard's Shard(0): torch.chunk pieces, in rank order
    return value.detach().cpu() if torch.is_tensor(value) else value


def _full(model, opt) -> dict:
    return {"model": {k: _gathered(v) for k, v in model.state_dict().items()},
            "optim": {name: {k: _gathered(v) for k, v in opt.state[p].items()}
                      for name, p in model.named_parameters()}}


def _same(a: dict, b: dict) -> bool:
    if isinstance(a, dict):
        return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if torch.is_tensor(a):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                          b.reshape(-1).view(torch.uint8))
    return a == b


def _proc(proc: int, port: int, tmp: str) -> None:
    from ray_elastic.sharded.capture import inspect_items
    from ray_elastic.sharded.restore import restore
    from ray_elastic.sharded.store import ShardStore

    device = _device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tcp = dist.TCPStore("127.0.0.1", port, is_master=False)
    store = ShardStore(replicas=1)
    out: dict = {}
    for name, members in (("two", [0, 1]), ("one", [0])):
        if proc not in members:
            return
        rank, world = members.index(proc), len(members)
        dist.init_process_group("gloo", store=dist.PrefixStore(name, tcp), rank=rank, world_size=world)
        model, opt = _build(device, world)
        items = inspect_items({"model": model, "optimizer": opt})
        restored = restore(store, items, rank, world, f"node{proc}", device)
        if name == "one":
            after = _full(model, opt)
            before = torch.load(Path(tmp) / "two.pt", weights_only=False)
            out.update(restored=restored.source, commit=restored.commit_id, same=_same(before, after),
                       on_device=all(p.to_local().device.type == device.type for p in model.parameters()))
            Path(tmp, "result.json").write_text(json.dumps(out))
            dist.destroy_process_group()
            return
        for step in range(1, 4):
            x = torch.randn(8, 33, device=device, generator=torch.Generator(device).manual_seed(step * 10 + rank))
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
                before_commit = torch.cuda.memory_allocated()
            store.commit(items, {"step": step}, lambda: False)
            if device.type == "cuda":
                torch.cuda.synchronize()
                out["gpu_bytes_added_by_commit"] = torch.cuda.memory_allocated() - before_commit
                out["pinned"] = store.current.own.is_pinned() and all(
                    b.is_pinned() for b in store.current.replicas.values())
        full = _full(model, opt)
        if rank == 0:
            torch.save(full, Path(tmp) / "two.pt")
            Path(tmp, "commit.json").write_text(json.dumps(out))
        dist.barrier()
        dist.destroy_process_group()


def test_cuda_shards_snapshot_to_pinned_memory_and_reshard_two_to_one(tmp_path):
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    mp.spawn(_proc, args=(store.port, str(tmp_path)), nprocs=2, join=True)
    commit = json.loads((tmp_path / "commit.json").read_text())
    result = json.loads((tmp_path / "result.json").read_text())
    assert result == {**result, "restored": "memory", "commit": 2, "same": True, "on_device": True}, result
    if torch.cuda.is_available():
        assert commit["pinned"], "snapshots and replicas live in pinned host memory"
        assert commit["gpu_bytes_added_by_commit"] <= 0, f"a commit allocated GPU memory: {commit}"


def _gpu_train(config: dict) -> dict:
    """An FSDP2 loop committing every step; `sources` (committed state) lists each entry's (round, restored_from)."""
    import ray_elastic

    ctx = ray_elastic.get_context()
    model, opt = _build(ctx.device, ctx.world_size)
    state = ray_elastic.State(model=model, optimizer=opt, step=0, log=[], sources=[])
    state.sources.append((ctx.round_id, state.restored_from))
    while state.step < config["steps"]:
        config["faults"].check(state.step)
        x = torch.randn(8, 33, device=ctx.device)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        state.step += 1
        state.log.append(state.step)
        state.commit()
    return {"rank": ctx.rank, "log": list(state.log), "restored_from": state.sources[-1][1],
            "sources": list(state.sources), "device": str(ctx.device),
            "on_device": all(p.to_local().device.type == ctx.device.type for p in model.parameters())}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Ray with use_gpu)")
def test_run_on_a_gpu_restores_sharded_state_from_memory_then_resumes_from_storage(tmp_path):
    import ray

    import ray_elastic
    from ray_elastic.testing import FaultInjector

    ray.init(num_gpus=1, num_cpus=4, include_dashboard=False)
    try:
        common = {"min_nodes": 1, "use_gpu": True, "progress": "none", "storage_path": str(tmp_path / "storage"),
                  "name": "gpu-sharded", "resources_per_worker": {"CPU": 1}}
        first = ray_elastic.run(_gpu_train, config={"steps": 6, "faults": FaultInjector().fail_at(rank=0, step=3)},
                                max_restarts=1, **common)
        assert first.restarts == 1
        assert first.return_values[0]["log"] == list(range(1, 7))
        assert first.return_values[0]["restored_from"] == "memory", "the survivor reloaded its own snapshot"
        assert first.return_values[0]["device"].startswith("cuda")
        second = ray_elastic.run(_gpu_train, config={"steps": 8, "faults": FaultInjector()}, resume=True, **common)
        assert second.return_values[0]["restored_from"] == "storage"
        assert second.return_values[0]["log"] == list(range(1, 9))
    finally:
        ray.shutdown()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Ray with use_gpu)")
def test_two_ranks_sharing_a_gpu_rebuild_a_killed_ranks_shards_from_memory(tmp_path):
    """Through Ray: 2 ranks on one GPU (gloo on CUDA tensors), rank 1 SIGKILLed after step 4's commit: the
    survivor keeps its process and rebuilds the state from its own shard and rank 1's replica; the
    replacement receives its shards from it; every step is committed once."""
    import ray

    import ray_elastic
    from ray_elastic.testing import FaultInjector

    ray.init(num_gpus=1, num_cpus=4, include_dashboard=False)
    try:
        faults = FaultInjector().kill_at(rank=1, step=4)
        result = ray_elastic.run(_gpu_train, config={"steps": 10, "faults": faults},
                                 min_nodes=1, nproc_per_node=2, use_gpu=True, backend="gloo", max_restarts=1,
                                 resources_per_worker={"CPU": 1, "GPU": 0.5}, progress="none")
        assert result.restarts == 1
        values = sorted(result.return_values, key=lambda v: v["rank"])
        assert [v["log"] for v in values] == [list(range(1, 11))] * 2
        assert all(v["device"].startswith("cuda") and v["on_device"] for v in values), values
        # `sources` is committed state: each rank ends with round 0's entry and its own for the round after the kill
        last_round = {v["sources"][-1][0] for v in values}
        assert len(last_round) == 1 and sorted(v["sources"][-1][1] for v in values) == ["memory", "peer"], values
        assert all(tuple(v["sources"][0]) == (0, "fresh") for v in values), values
    finally:
        ray.shutdown()

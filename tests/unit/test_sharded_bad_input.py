"""Sharded state that cannot work is rejected with a ConfigError before training (a world-1 gloo group here)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist

from ray_elastic.context import Session, TrainContext, set_session
from ray_elastic.errors import ConfigError
from ray_elastic.sharded.layout import LeafSpec, memory_verdict
from ray_elastic.sharded.store import ShardStore
from ray_elastic.snapshot import SnapshotHolder
from ray_elastic.state import State

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def world_of_one():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    holder = SnapshotHolder()
    context = TrainContext(rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0, num_nodes=1,
                           restart_count=0, round_id=0, run_id="t", node_id="n", device=torch.device("cpu"))
    set_session(Session(context, holder))
    yield holder
    set_session(None)
    dist.destroy_process_group()


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))


def test_an_fsdp1_module_is_rejected(world_of_one):
    from torch.distributed.fsdp import FullyShardedDataParallel

    with pytest.warns(UserWarning):  # FSDP1 says it switches to NO_SHARD in a world of one
        model = FullyShardedDataParallel(_mlp(), device_id=torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"FSDP1 module \(FullyShardedDataParallel\).*fully_shard instead"):
        State(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def test_an_optimizer_built_before_fully_shard_is_rejected(world_of_one):
    from torch.distributed.fsdp import fully_shard

    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)  # holds the parameters fully_shard is about to replace
    fully_shard(model)
    with pytest.raises(ConfigError, match="optimizer 'opt' holds 4 parameter.*build the optimizer after fully_shard"):
        State(model=model, opt=opt)


def test_a_tensor_parallel_layout_is_rejected_and_hsdp_is_accepted(world_of_one):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("replicate", "shard"))
    tp = _mlp()
    for layer in (tp[0], tp[2]):  # FSDP + tensor parallel: sharded along both mesh dims
        layer.weight = torch.nn.Parameter(distribute_tensor(layer.weight.detach(), mesh, [Shard(0), Shard(1)]))
        layer.bias = torch.nn.Parameter(distribute_tensor(layer.bias.detach(), mesh, [Shard(0), Shard(0)]))
    with pytest.raises(ConfigError, match=r"placed \(Shard\(dim=0\), Shard\(dim=1\)\) on a 2-D mesh.*HSDP"):
        State(model=tp, opt=torch.optim.SGD(tp.parameters(), lr=0.1))
    hsdp = _mlp()
    fully_shard(hsdp, mesh=mesh)
    state = State(model=hsdp, opt=torch.optim.SGD(hsdp.parameters(), lr=0.1))
    state.commit()


def test_a_world_that_cannot_hold_the_state_in_memory_is_rejected_at_the_first_commit(world_of_one):
    from torch.distributed.fsdp import fully_shard

    world_of_one.shards = ShardStore(replicas=1, available_bytes=lambda: 1 << 20)  # as if the node had 1 MiB free
    model = torch.nn.Linear(256, 256)  # 257 KiB of parameters, 771 KiB with Adam's state
    fully_shard(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    state = State(model=model, opt=opt, step=0)
    model(torch.randn(2, 256)).sum().backward()
    opt.step()
    with pytest.raises(ConfigError, match=r"world of 1 rank\(s\) cannot hold the sharded state in memory: each rank "
                                          r"needs 2.3 MiB .* has 1.0 MiB available; run with at least 4 ranks"):
        state.commit()


def test_a_sharded_state_that_fits_commits_and_restores_in_a_world_of_one(world_of_one):
    from torch.distributed.fsdp import fully_shard

    model = _mlp()
    fully_shard(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    state = State(model=model, opt=opt, step=0)
    assert state.restored_from == "fresh"
    model(torch.randn(2, 6)).sum().backward()
    opt.step()
    state.step = 1
    state.commit()
    committed = [p.detach().to_local().clone() for p in model.parameters()]
    model(torch.randn(2, 6)).sum().backward()
    opt.step()  # not committed
    again = State(model=model, opt=opt, step=0)
    assert again.restored_from == "memory" and again.step == 1 and again.commit_id == 0
    assert all(torch.equal(p.detach().to_local(), c) for p, c in zip(model.parameters(), committed))


def test_memory_verdict_names_the_smallest_world_that_fits():
    specs = [LeafSpec("w", (1000, 250), 0, torch.float32)]  # 1 MB
    assert memory_verdict(specs, 4, 1, available=10 << 20) is None
    verdict = memory_verdict(specs, 2, 1, available=1_000_000)
    assert verdict is not None and "a world of 2 rank(s)" in verdict and "at least 5 ranks" in verdict  # 5 MB / N
    assert "shard_replicas=1" in verdict


@pytest.mark.parametrize("field,value,message", [
    ("shard_replicas", -1, "shard_replicas must be >= 0"),
    ("shard_replicas", 1.0, "shard_replicas must be an int"),
    ("shard_replica_every", 0, "shard_replica_every must be >= 1"),
    ("shard_replica_overlap", "yes", "shard_replica_overlap must be True or False"),
])
def test_run_rejects_bad_shard_settings_before_any_actor_starts(field, value, message):
    import ray_elastic

    with pytest.raises(ConfigError, match=message):
        ray_elastic.run(lambda: None, **{field: value})

"""A new round's FSDP2 parameters carry the new round's device mesh, not one cached from an earlier round.

DTensor caches sharding decisions keyed by device meshes that compare equal across process
groups; without `forget_cached_dtensor_specs` (run by `GroupHandle`) a parameter built on round
2's mesh came back carrying round 1's (its coordinates, its destroyed sub-groups). One real
process forming two rounds of one rank with a 2-D (replicate x shard) mesh, no Ray.
"""

from __future__ import annotations

import multiprocessing as mp

import pytest

pytestmark = pytest.mark.timeout(90)


def _two_rounds(out: mp.Queue) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ray_elastic.worker.process_group import GroupHandle

    store = dist.TCPStore("127.0.0.1", 0, 1, True)
    seen = []
    for round_id in range(2):
        group = GroupHandle("gloo", dist.PrefixStore(f"secret/round{round_id}", store), 0, 1, 30.0)
        mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("replicate", "shard"))
        torch.manual_seed(round_id)
        model = torch.nn.Linear(4, 3)
        expected = model.weight.detach().clone()
        fully_shard(model, mesh=mesh)
        weight = model.weight
        seen.append((weight.device_mesh is mesh, torch.equal(weight.full_tensor(), expected)))
        group.destroy()
    out.put(seen)


def test_a_second_round_builds_its_parameters_on_its_own_mesh():
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_two_rounds, args=(out,))
    proc.start()
    seen = out.get(timeout=75)
    proc.join(10)
    assert seen == [(True, True), (True, True)], seen

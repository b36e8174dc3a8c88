"""Real NCCL on real GPUs: skipped where CUDA is absent (CI), run on a GPU machine."""

from __future__ import annotations

import pytest
import torch

import ray_elastic
from ray_elastic.testing import FaultInjector

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                       reason="needs 2 CUDA devices"),
]


def _nccl_train(config):
    import torch.distributed as dist

    ctx = ray_elastic.get_context()
    assert dist.get_backend() == "nccl"
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(64, 64).to(ctx.device),
                                                      device_ids=[ctx.device.index])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    state = ray_elastic.State(model=model, optimizer=opt, step=0, log=[])
    while state.step < config["steps"]:
        config["faults"].check(state.step)
        loss = model(torch.randn(32, 64, device=ctx.device)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        state.step += 1
        state.log.append(state.step)
        state.commit()
    weights = [float(p.detach().double().sum()) for p in model.parameters()]
    return {"rank": ctx.rank, "device": str(ctx.device), "log": list(state.log), "weights": weights}


def test_nccl_group_recovers_from_a_crash_by_abort(tmp_path):
    import ray

    ray.init(num_gpus=torch.cuda.device_count(), num_cpus=4, include_dashboard=False)
    try:
        n = min(4, torch.cuda.device_count())
        faults = FaultInjector().kill_at(rank=n - 1, step=10)
        result = ray_elastic.run(_nccl_train, config={"steps": 30, "faults": faults}, min_nodes=1,
                                 nproc_per_node=n, use_gpu=True, max_restarts=2, progress="none",
                                 resources_per_worker={"CPU": 1})
        assert result.restarts == 1
        values = result.return_values
        assert sorted(v["device"] for v in values) == [f"cuda:{i}" for i in range(len(values))]
        for v in values:
            assert v["log"] == list(range(1, 31))
            assert v["weights"] == values[0]["weights"]
    finally:
        ray.shutdown()

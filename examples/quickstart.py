"""Quickstart: train a small DDP model with ray_elastic on a local Ray, surviving an injected crash.

    python examples/quickstart.py

Starts Ray on this machine (or joins the cluster in RAY_ADDRESS, e.g. under
`ray job submit`), runs 2 workers, makes rank 1 raise at step 10, and shows
the run resume from its last in-memory commit without restarting survivors.
"""

from __future__ import annotations

import torch

import ray_elastic
from ray_elastic.testing import FaultInjector


def train_fn(config):
    ctx = ray_elastic.get_context()
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"])
    state = ray_elastic.State(model=model, optimizer=opt, step=0)
    data = torch.Generator().manual_seed(ctx.rank)
    loss = torch.zeros(())
    while state.step < config["steps"]:
        config["faults"].check(state.step)
        x = torch.randn(32, 16, generator=data)
        loss = (model(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        state.step += 1
        state.commit()
        ray_elastic.report({"step": state.step, "loss": loss.item()})
    return {"rank": ctx.rank, "loss": loss.item()}


def main() -> None:
    result = ray_elastic.run(
        train_fn,
        config={"lr": 0.01, "steps": 40, "faults": FaultInjector().fail_at(rank=1, step=10)},
        min_nodes=1,
        nproc_per_node=2,
        max_restarts=3,
    )
    print(f"final loss {result.metrics['loss']:.4f} after {result.metrics['step']} steps; "
          f"restarts spent: {result.restarts}; rounds: {[(r.round_id, r.world_size, r.cause) for r in result.rounds]}")


if __name__ == "__main__":
    main()

"""A plain torchrun-style DDP script: runs unchanged under `torchrun` and `ray-elastic run`.

    ray-elastic run --nnodes=1:2 --nproc-per-node=2 --max-restarts=3 \
        examples/torchrun_script.py --snapshot-dir /tmp/snap --steps 50

It forms its group with `init_process_group("env://")`, saves a snapshot file
(model, optimizer, step) every step from rank 0, and loads it on start, so after
a restart it resumes where it stopped. Each start appends one line to
`<snapshot-dir>/starts.jsonl` (rank, pid, restart count, world size, resumed step)
and rank 0 appends every completed step to `<snapshot-dir>/steps.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record


def append_line(path: str, record_: dict) -> None:
    with open(path, "a") as fp:
        fp.write(json.dumps(record_) + "\n")


def save_snapshot(path: str, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    tmp = f"{path}.tmp"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}, tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves a partial snapshot


@record
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--snapshot-dir", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds per step (to leave time for faults)")
    parser.add_argument("--fail-rank", type=int, default=-1, help="this rank raises at --fail-step")
    parser.add_argument("--fail-step", type=int, default=-1)
    args = parser.parse_args()

    dist.init_process_group("gloo", init_method="env://")
    rank, world = dist.get_rank(), dist.get_world_size()
    os.makedirs(args.snapshot_dir, exist_ok=True)
    snapshot = os.path.join(args.snapshot_dir, "snapshot.pt")

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    step = 0
    if os.path.exists(snapshot):
        saved = torch.load(snapshot, weights_only=True)
        net.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        step = saved["step"]
    model = torch.nn.parallel.DistributedDataParallel(net)
    append_line(os.path.join(args.snapshot_dir, "starts.jsonl"), {
        "rank": rank, "pid": os.getpid(), "world_size": world, "resumed_step": step,
        "restart_count": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
    })
    generator = torch.Generator().manual_seed(rank)
    while step < args.steps:
        if rank == args.fail_rank and step == args.fail_step:
            raise ValueError(f"rank {rank} cannot handle step {step}")
        loss = model(torch.randn(16, 8, dtype=torch.float64, generator=generator)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if rank == 0:
            save_snapshot(snapshot, net, opt, step)
            append_line(os.path.join(args.snapshot_dir, "steps.jsonl"), {"step": step, "loss": loss.item()})
            print(f"step {step} loss {loss.item():.5f} world {world}", flush=True)
        dist.barrier()  # nobody runs ahead of the snapshot: a restart redoes at most one step
        time.sleep(args.sleep)
    dist.destroy_process_group()
    # torch 2.13: gloo's worker thread frees a collective's record a moment after the collective returns;
    # freed while the interpreter shuts down, it aborts the process (SIGABRT, "terminate called without an
    # active exception"), and the launcher sees a failed script. Give it that moment before exiting.
    time.sleep(0.05)


if __name__ == "__main__":
    main()

"""What `State.commit()` adds to a DDP step, measured inside the same two processes (no Ray, no launcher).

overhead.py compares whole runs (torchrun vs ray_elastic), and on a shared
2-core machine the run-to-run spread of one system alone is larger than 5%.
This isolates the commit: two gloo processes run one DDP loop and alternate
blocks of steps without a commit, with `snapshot="copy"` and with
`snapshot="live"` (the order of the three reverses every block), so that
machine drift hits all three alike. Step time is forward + backward + optimizer
step (+ commit), median over every measured step on rank 0.

    .venv/bin/python benchmarks/commit_cost.py --params 10 --blocks 16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine_line, table  # noqa: E402
from workloads.loops import width_for_params  # noqa: E402

from ray_elastic.testing.ports import free_port  # noqa: E402

VARIANTS = ("no commit", "copy", "live")
DEPTH, BATCH, STEPS_PER_BLOCK, SKIP_PER_BLOCK = 4, 32, 10, 2


def _states(model: torch.nn.Module, opt: torch.optim.Optimizer, rank: int) -> dict[str, object]:
    """One State per snapshot mode over the same model and optimizer, each with its own session."""
    from ray_elastic.context import Session, TrainContext, set_session
    from ray_elastic.snapshot import SnapshotHolder
    from ray_elastic.state import State

    states = {}
    for mode in ("copy", "live"):
        ctx = TrainContext(rank=rank, local_rank=rank, world_size=2, local_world_size=2, node_rank=0, num_nodes=1,
                           restart_count=0, round_id=0, run_id="commit-cost", node_id="local",
                           device=torch.device("cpu"))
        set_session(Session(ctx, SnapshotHolder(mode)))
        states[mode] = State(model=model, optimizer=opt, step=0)
    set_session(None)
    return states


def worker(rank: int, port: int, params_m: float, blocks: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    width = width_for_params(params_m * 1e6, DEPTH)
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(DEPTH)])
    model = torch.nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    states = _states(model, opt, rank)
    live_holder = states["live"]._session.snapshots  # type: ignore[attr-defined]
    x = torch.randn(BATCH, width)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for block in range(blocks):
        for variant in VARIANTS if block % 2 == 0 else VARIANTS[::-1]:
            for i in range(STEPS_PER_BLOCK):
                started = time.perf_counter()
                loss = model(x).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                if variant != "no commit":
                    states[variant].commit()  # type: ignore[attr-defined]
                elapsed_ms = (time.perf_counter() - started) * 1e3
                if variant != "live":
                    live_holder.begin_interval()  # steps outside the live State are not its loop
                if i >= SKIP_PER_BLOCK:
                    times[variant].append(elapsed_ms)
            for mode in ("copy", "live"):  # no agreement left in flight across variants
                states[mode]._session.finish_agreement()  # type: ignore[attr-defined]
    if rank == 0:
        with open(out, "w", encoding="utf-8") as handle:
            for variant, values in times.items():
                handle.write(variant + "\t" + ",".join(f"{v:.3f}" for v in values) + "\n")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=10.0, help="model size in millions of parameters")
    parser.add_argument("--blocks", type=int, default=16, help=f"blocks of {STEPS_PER_BLOCK} steps per variant")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    started = time.monotonic()
    header = machine_line()
    out = f"/tmp/commit-cost-{os.getpid()}.tsv"
    mp.spawn(worker, args=(free_port(), args.params, args.blocks, out), nprocs=2)
    times = {}
    with open(out, encoding="utf-8") as handle:
        for line in handle:
            variant, values = line.rstrip("\n").split("\t")
            times[variant] = [float(v) for v in values.split(",")]
    os.unlink(out)
    base = statistics.median(times["no commit"])
    rows = [[variant, f"{statistics.median(values):.1f}", f"{statistics.median(values) / base:.3f}", len(values)]
            for variant, values in times.items()]
    print(f"## Commit cost inside one DDP loop\n\n{header}\n\n"
          f"`{' '.join(['python', *sys.argv])}` ({time.monotonic() - started:.0f} s)\n\n"
          f"2 gloo processes, {args.params:g} M-parameter {DEPTH}-layer MLP, batch {BATCH}, SGD + momentum; "
          f"{args.blocks} blocks of {STEPS_PER_BLOCK} steps per variant (first {SKIP_PER_BLOCK} of each block "
          f"not counted), order reversed every block.\n")
    print(table(["variant", "step (ms, median)", "step / no commit's", "steps"], rows))


if __name__ == "__main__":
    main()

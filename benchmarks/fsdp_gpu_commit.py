"""What a commit of sharded (FSDP2) state costs a GPU training step.

One rank on one GPU (a world of one keeps no replicas, so this is the snapshot alone: every
parameter and optimizer-state shard copied to pinned host memory on a side stream), an FSDP2 MLP
trained with Adam in float32. Blocks of steps without and with a commit after every step
alternate, so drift in the machine's speed hits both alike; the ratio is per pair of blocks.

    python benchmarks/fsdp_gpu_commit.py --width 4096 --layers 8 --batch 8192 --blocks 6 --steps 15

Needs CUDA; ray_elastic's sharded store is used directly (no Ray).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--blocks", type=int, default=6, help="pairs of blocks (without, with commits)")
    parser.add_argument("--steps", type=int, default=15, help="steps per block")
    args = parser.parse_args()

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ray_elastic.sharded.capture import inspect_items
    from ray_elastic.sharded.restore import restore
    from ray_elastic.sharded.store import ShardStore

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    model = torch.nn.Sequential(*[torch.nn.Linear(args.width, args.width) for _ in range(args.layers)]).to(device)
    mesh = init_device_mesh("cuda", (1,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    items = inspect_items({"model": model, "optimizer": opt})
    shards = ShardStore(replicas=1)
    restore(shards, items, 0, 1, "node0", device)
    x = torch.randn(args.batch, args.width, device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(x).pow(2).mean().backward()
        opt.step()

    for i in range(5):  # warm-up: kernels, Adam state, the pinned buffers
        step()
        shards.commit(items, {"step": i}, lambda: False)
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {"without": [], "with": []}
    for block in range(args.blocks):
        for mode in ("without", "with") if block % 2 == 0 else ("with", "without"):
            torch.cuda.synchronize()
            started = time.perf_counter()
            for i in range(args.steps):
                step()
                if mode == "with":
                    shards.commit(items, {"step": i}, lambda: False)
            torch.cuda.synchronize()
            times[mode].append((time.perf_counter() - started) / args.steps * 1000)
    ratios = [w / wo for w, wo in zip(times["with"], times["without"])]
    params = sum(p.numel() for p in model.parameters())
    report = {
        "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "params_M": round(params / 1e6, 1),
        "state_MB": round(3 * params * 4 / 2**20), "batch": args.batch,
        "step_ms_without": round(statistics.median(times["without"]), 2),
        "step_ms_with_commit": round(statistics.median(times["with"]), 2),
        "commit_ms": round(statistics.median(times["with"]) - statistics.median(times["without"]), 2),
        "ratio_median": round(statistics.median(ratios), 3), "ratios": [round(r, 3) for r in ratios],
        "pinned": bool(shards.current is not None and shards.current.own.is_pinned()),
        "gpu_bytes_peak_MB": round(torch.cuda.max_memory_allocated() / 2**20),
    }
    print(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""What forming a round's gloo group costs with and without the arrival wait + short form timeout.

Four processes form the round's default group (`GroupHandle`) again and again on one store, alternating per
round between the way rounds form now (every rank waits on the store for the others, then connects under
`form_timeout_s`, then the group gets the collective timeout) and plain `init_process_group` under the
collective timeout. Prints the median time per variant from the first rank's start of the round to the last
rank's group formed.

    python benchmarks/group_forming.py --ranks 4 --rounds 40
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from datetime import timedelta

import torch.distributed as dist
import torch.multiprocessing as mp

VARIANTS = ("arrival wait + form timeout", "plain init_process_group")


def _rank(rank: int, world: int, port: int, rounds: int, results) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from ray_elastic.worker import process_group

    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
    times = []
    for r in range(rounds):
        variant = r % 2
        process_group.can_set_group_timeout = (lambda: True) if variant == 0 else (lambda: False)  # type: ignore
        round_store = dist.PrefixStore(f"round{r}", store)
        round_store.add("start", 1)
        round_store.wait(["go"]) if rank else _start_when_all_in(round_store, world)
        started = time.time()
        group = process_group.GroupHandle("gloo", round_store, rank, world, 1800.0)
        times.append((variant, started, time.time()))
        group.destroy()
        round_store.add("done", 1)
        while int(round_store.add("done", 0)) < world:  # next round only once every rank destroyed this one
            time.sleep(0.001)
    results.put((rank, times))


def _start_when_all_in(store: dist.Store, world: int) -> None:
    while int(store.add("start", 0)) < world:
        time.sleep(0.001)
    store.set("go", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, args.ranks, server.port, args.rounds, results))
             for r in range(args.ranks)]
    for p in procs:
        p.start()
    by_rank = dict(results.get(timeout=600) for _ in procs)
    for p in procs:
        p.join()
    spans: dict[int, list[float]] = {0: [], 1: []}
    for r in range(2, args.rounds):  # the first two rounds warm up
        entries = [by_rank[k][r] for k in range(args.ranks)]
        spans[entries[0][0]].append(max(e[2] for e in entries) - min(e[1] for e in entries))
    print(f"{args.ranks} ranks, {args.rounds - 2} measured rounds, alternating")
    print("| variant | rounds | formed, median (ms) | p90 (ms) |")
    print("| --- | --- | --- | --- |")
    for variant, name in enumerate(VARIANTS):
        values = sorted(spans[variant])
        p90 = values[int(0.9 * (len(values) - 1))]
        print(f"| {name} | {len(values)} | {1000 * statistics.median(values):.1f} | {1000 * p90:.1f} |")


if __name__ == "__main__":
    main()

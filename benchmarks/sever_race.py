"""How often a sever leaves a collective waiting out its timeout: ray_elastic's sever vs shutting sockets at once.

Two processes form a gloo group (`GroupHandle`) and run all-gathers back to back; 0-20 ms in, rank 0 severs
the group from another thread, as the coordinator's abort does. Every collective in progress should then
fail at once, on both ranks. A collective still waiting after `--timeout` s (the group's collective timeout)
is counted as stuck. Variants, one per trial in turn:

- `ray_elastic`: `GroupHandle.sever()` (the read side at once, the peer's end-of-file later, see
  `sever.shutdown_gloo_connections`);
- `both_sides`: `shutdown(SHUT_RDWR)` of every gloo connection at once (ray_elastic's sever until 2026-12-06);
- `read_side`: `shutdown(SHUT_RD)` only (gloo closes the connection when it reads end-of-file).

    python benchmarks/sever_race.py --trials 300 --numel 1000
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

VARIANTS = ("ray_elastic", "both_sides", "read_side")


def _shut_at_once(group, how: int) -> None:
    from ray_elastic.worker.sever import gloo_connections

    for conn in gloo_connections(group._round_listeners(), group._peers):
        sock = socket.socket(fileno=conn.fd)
        try:
            sock.shutdown(how)
        except OSError:
            pass
        finally:
            sock.detach()


def _sever(group, variant: str) -> None:
    from ray_elastic.worker.sever import fail_later_gloo_ops

    if variant == "ray_elastic":
        group.sever()
    else:  # as GroupHandle.sever, but for the shutdown
        fail_later_gloo_ops()
        _shut_at_once(group, socket.SHUT_RDWR if variant == "both_sides" else socket.SHUT_RD)


def _rank(rank: int, port: int, trials: int, numel: int, timeout_s: float, results) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from ray_elastic.worker.process_group import GroupHandle

    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
    x = torch.ones(numel)
    gathered = [torch.empty_like(x) for _ in range(2)]
    for trial in range(trials):
        variant = VARIANTS[trial % len(VARIANTS)]
        group = GroupHandle("gloo", dist.PrefixStore(f"trial{trial}", store), rank, 2, timeout_s)
        dist.all_gather(gathered, x)
        if rank == 0:
            threading.Timer(random.uniform(0.0, 0.02), _sever, args=(group, variant)).start()
        started = time.monotonic()
        try:
            for _ in range(10_000_000):
                dist.all_gather(gathered, x)
        except Exception:  # noqa: BLE001 - every trial ends in an error; how long it took is the point
            pass
        results.put((variant, rank, time.monotonic() - started))
        group.destroy()
        store.set(f"done{trial}/{rank}", "1")
        store.wait([f"done{trial}/{1 - rank}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=300, help="trials in all, the variants in turn")
    parser.add_argument("--numel", type=int, default=1000, help="floats each rank contributes to an all-gather")
    parser.add_argument("--timeout", type=float, default=2.0, help="the group's collective timeout (s)")
    args = parser.parse_args()
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, store.port, args.trials, args.numel, args.timeout, results))
             for r in range(2)]
    for proc in procs:
        proc.start()
    stuck = {(v, r): 0 for v in VARIANTS for r in range(2)}
    count = {v: 0 for v in VARIANTS}
    for _ in range(2 * args.trials):
        variant, rank, took = results.get(timeout=120)
        count[variant] += rank == 0
        stuck[variant, rank] += took > 0.9 * args.timeout
    for proc in procs:
        proc.join(30)
    print(f"{args.trials} trials, {args.numel} floats per rank, collective timeout {args.timeout:g} s\n")
    print("| sever | trials | rank 0 (severs) stuck | rank 1 (its peer) stuck |")
    print("| --- | --- | --- | --- |")
    for v in VARIANTS:
        print(f"| {v} | {count[v]} | {stuck[v, 0]} | {stuck[v, 1]} |")


if __name__ == "__main__":
    main()

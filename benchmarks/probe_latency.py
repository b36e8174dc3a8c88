"""How long a worker actor takes to answer a liveness probe while its training thread is busy.

A threaded actor like `ElasticWorker` (max_concurrency=4) runs one kind of work in
one of its threads while the driver sends it a trivial probe every `--every` seconds
and records how long each takes to come back. The question it answers: which kinds
of "busy" delay a probe answered by a Python thread, and by how much, so that
`probe_timeout_s` is chosen from figures rather than hope (README, "Timeouts").

Kinds of work (each runs `--seconds`):

- idle: nothing (the baseline: Ray's round trip);
- python_loop: a pure-Python loop (holds the GIL between switch intervals);
- matmul: repeated 2048×2048 float32 matmuls (torch releases the GIL inside ops);
- gil_c_call: `sum(range(n))`, one C call that never gives the GIL up, sized to last `--seconds`;
- pickle_dumps: `pickle.dumps` of a big list of ints (the C pickler, GIL held);
- torch_save: `torch.save` of a `--save-mb` MB state dict to a temporary file, then fsync;
- deepcopy: `copy.deepcopy` of the same state dict (what a "copy" commit does, unbuffered);
- allreduce_wait: blocked in a gloo all_reduce that a peer joins only after `--seconds`;
- contention: python_loop while 4 other processes spin on the 2 cores.

    .venv/bin/python benchmarks/probe_latency.py
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_line, table  # noqa: E402

KINDS = ("idle", "python_loop", "matmul", "gil_c_call", "pickle_dumps", "torch_save", "deepcopy",
         "allreduce_wait", "contention")


class Busy:
    """A threaded actor: `work(kind)` in one thread, `probe()` answered by another."""

    def __init__(self) -> None:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch  # noqa: F401

        self._calibration: float | None = None

    def probe(self) -> float:
        return time.time()

    def pid(self) -> int:
        return os.getpid()

    def _sum_range_n(self, seconds: float) -> int:
        if self._calibration is None:
            started = time.perf_counter()
            sum(range(2_000_000))
            self._calibration = 2_000_000 / max(time.perf_counter() - started, 1e-6)
        return int(self._calibration * seconds)

    def prepare(self, seconds: float) -> None:
        self._sum_range_n(seconds)

    def work(self, kind: str, seconds: float, save_mb: int, store_port: int) -> dict[str, Any]:
        import copy
        import pickle
        import tempfile

        import torch

        started = time.perf_counter()
        end = time.monotonic() + seconds
        calls = 0
        if kind == "idle":
            time.sleep(seconds)
        elif kind in ("python_loop", "contention"):
            x = 0
            while time.monotonic() < end:
                x += 1
        elif kind == "matmul":
            a = torch.randn(2048, 2048)
            while time.monotonic() < end:
                a @ a
                calls += 1
        elif kind == "gil_c_call":
            sum(range(self._sum_range_n(seconds)))
            calls = 1
        elif kind == "pickle_dumps":
            data = list(range(4_000_000))
            while time.monotonic() < end:
                pickle.dumps(data)
                calls += 1
        elif kind in ("torch_save", "deepcopy"):
            n = save_mb * 1024 * 1024 // 4 // 8
            state = {f"w{i}": torch.randn(n) for i in range(8)}
            while time.monotonic() < end:
                if kind == "deepcopy":
                    copy.deepcopy(state)
                else:
                    with tempfile.NamedTemporaryFile(dir="/tmp") as handle:
                        torch.save(state, handle)
                        handle.flush()
                        os.fsync(handle.fileno())
                calls += 1
        elif kind == "allreduce_wait":
            import datetime

            import torch.distributed as dist

            store = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=datetime.timedelta(seconds=60))
            dist.init_process_group("gloo", store=store, rank=0, world_size=2)
            dist.all_reduce(torch.ones(4))
            dist.destroy_process_group()
            calls = 1
        return {"elapsed_s": time.perf_counter() - started, "calls": calls}


def _late_peer(port: int, delay_s: float) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=1, world_size=2)
    time.sleep(delay_s)
    dist.all_reduce(torch.ones(4))
    dist.destroy_process_group()


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def measure(actor: Any, kind: str, args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from ray_elastic.testing.ports import free_port

    port = free_port()
    helpers: list[multiprocessing.Process] = []
    if kind == "allreduce_wait":
        helpers.append(multiprocessing.Process(target=_late_peer, args=(port, args.seconds)))
    if kind == "contention":
        helpers += [multiprocessing.Process(target=_spin, args=(args.seconds + 1,)) for _ in range(4)]
    for proc in helpers:
        proc.start()
    ray.get(actor.prepare.remote(args.seconds))
    work = actor.work.remote(kind, args.seconds, args.save_mb, port)
    time.sleep(0.3)  # let the work start
    latencies = []
    while True:
        done, _ = ray.wait([work], timeout=0)
        if done:
            break
        sent = time.monotonic()
        ray.get(actor.probe.remote())
        latencies.append(time.monotonic() - sent)
        time.sleep(args.every)
    info = ray.get(work)
    for proc in helpers:
        proc.join(30)
    return {"kind": kind, "latencies": latencies, **info}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0, help="how long each kind of work runs")
    parser.add_argument("--every", type=float, default=0.05, help="probe interval (s)")
    parser.add_argument("--save-mb", type=int, default=400, help="state size for torch_save/deepcopy (MB)")
    parser.add_argument("--kinds", default=",".join(KINDS))
    args = parser.parse_args()
    import ray

    header = machine_line()
    ray.init(include_dashboard=False, num_cpus=2, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        actor = ray.remote(Busy).options(max_concurrency=4, num_cpus=0).remote()
        ray.get(actor.pid.remote())
        rows = []
        for kind in args.kinds.split(","):
            result = measure(actor, kind, args)
            lat = sorted(result["latencies"])
            if not lat:
                rows.append([kind, 0, "—", "—", "—", f"{result['elapsed_s']:.1f}", result["calls"]])
                continue
            p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
            rows.append([kind, len(lat), f"{statistics.median(lat) * 1e3:.1f}", f"{p99 * 1e3:.1f}",
                         f"{lat[-1] * 1e3:.0f}", f"{result['elapsed_s']:.1f}", result["calls"]])
            print(f"{kind}: {rows[-1]}", file=sys.stderr, flush=True)
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
    print(f"## Probe latency while the training thread is busy\n\n{header}\n\n`{' '.join(['python', *sys.argv])}`\n")
    print(table(["work in the training thread", "probes", "median (ms)", "p99 (ms)", "max (ms)",
                 "work ran (s)", "calls"], rows))


if __name__ == "__main__":
    threading.current_thread().name = "main"
    main()

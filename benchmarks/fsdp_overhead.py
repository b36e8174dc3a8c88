"""Step-time overhead of sharded commits (local shards + replica refresh) vs the same FSDP2 loop under torchrun.

Interleaved as overhead_interleaved.py does (same `Turns` and block timing): every system is
alive at once and takes turns in blocks of `--warm + --measured` steps, order rotating each
round; a system's figure is the median over rounds of its block step time over torchrun's
in the same round. The workload is `workloads/fsdp_loops.py` (`--params` M parameters,
4 float32 layers, SGD + momentum, gloo, CPU) on 4 ranks: torchrun --nproc-per-node=4 without
checkpoints; ray_elastic on 2 simulated nodes × 2 ranks, `State.commit()` every step, with one
replica on the other node (the default), the same with the transfer overlapped with the next step
(`shard_replica_overlap=True`), with none, and with replicas refreshed every 10th commit.
With `--hsdp` both sides train HSDP on a 2 x 2 (replicate x shard) mesh, a replica group per
node, and ray_elastic commits every step with no replica sent (the other group holds the copy).

A commit costs about the same whatever the step computes, so the ratio depends on the step's
length: `--batch` sets it (at the default 8 a step here is almost all FSDP2's own gloo traffic;
256 adds a few hundred ms of matmuls). The report gives both the ratio and the milliseconds.

    .venv/bin/python benchmarks/fsdp_overhead.py --params 10 --rounds 10
    .venv/bin/python benchmarks/fsdp_overhead.py --params 10 --rounds 10 --batch 256
    .venv/bin/python benchmarks/fsdp_overhead.py --params 10 --rounds 10 --hsdp
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    WORKER_ENV,
    InThread,
    ProcessGroups,
    StealMeter,
    connect,
    exit_on_sigterm,
    log,
    machine_line,
    table,
    torchrun_cmd,
    workdir,
)
from overhead_interleaved import Turns, block_ms  # noqa: E402
from workloads.loops import width_for_params  # noqa: E402

HERE = Path(__file__).resolve().parent
DEPTH = 4


@dataclass(frozen=True)
class System:
    name: str
    elastic: bool = False
    replicas: int = 1
    every: int = 1
    overlap: bool = False


HSDP_SYSTEMS = (
    System("torchrun"),
    System("ray_elastic, HSDP, commit every step (the replica groups are the copies)", True, 1, 1),
)
SYSTEMS = (
    System("torchrun"),
    System("ray_elastic, replica every commit", True, 1, 1),
    System("ray_elastic, replica every commit, overlapped", True, 1, 1, True),
    System("ray_elastic, no replica", True, 0, 1),
    System("ray_elastic, replica every 10th commit", True, 1, 10),
)


def start_systems(stack: contextlib.ExitStack, turns: Turns, shape: dict[str, Any],
                  systems: tuple[System, ...]) -> list[Any]:
    from ray import cloudpickle
    from workloads import loops
    from workloads.fsdp_loops import fsdp_elastic_train

    import ray_elastic
    from ray_elastic.testing import local_cluster

    cloudpickle.register_pickle_by_value(loops)
    groups = ProcessGroups()
    stack.callback(groups.close)
    waits: list[Any] = []
    elastic = [s for s in systems if s.elastic]
    cluster = stack.enter_context(local_cluster(num_nodes=2, cpus_per_node=2 * len(elastic), connect=False))
    connect(cluster, 2)
    for system in systems:
        log_dir = turns.dirs[system.name]
        if not system.elastic:
            args = ["--log-dir", str(log_dir), "--steps", "1000000", "--turn-file", str(turns.path),
                    "--system", turns.tag(system.name), *[f"--{k}={v}" for k, v in shape.items()]]
            cmd = torchrun_cmd("--standalone", "--nproc-per-node=4", script_args=args)
            cmd[cmd.index(str(HERE / "workloads" / "torchrun_train.py"))] = str(HERE / "workloads" / "torchrun_fsdp.py")
            waits.append(groups.start(cmd, log_dir / "torchrun.out", env=WORKER_ENV))
            continue
        config = {**shape, "log_dir": str(log_dir), "steps": 1_000_000, "turn_file": str(turns.path),
                  "system": turns.tag(system.name)}
        run = functools.partial(
            ray_elastic.run, fsdp_elastic_train, config=config, min_nodes=2, max_nodes=2, nproc_per_node=2,
            max_restarts=0, progress="none", shard_replicas=system.replicas, shard_replica_every=system.every,
            shard_replica_overlap=system.overlap,
            name=f"fsdp-overhead-{turns.tag(system.name)}-{time.time_ns()}")
        waits.append(InThread(run))
    deadline = time.monotonic() + 600
    while not all(turns.entered(s.name) for s in systems):
        if time.monotonic() > deadline:
            raise TimeoutError("not every system reached its training loop within 600 s")
        time.sleep(0.5)
    return waits


def measure(args: argparse.Namespace, root: Path) -> tuple[dict[str, list[float]], list[float]]:
    shape = {"width": width_for_params(args.params * 1e6, DEPTH), "depth": DEPTH, "batch": args.batch,
             "replicate": 2 if args.hsdp else 1}
    systems = _systems(args)
    turns = Turns(root, systems)  # type: ignore[arg-type]
    blocks: dict[str, list[float]] = {s.name: [] for s in systems}
    steals: list[float] = []
    with contextlib.ExitStack() as stack:
        waits = start_systems(stack, turns, shape, systems)
        log(f"every system is in its loop; {args.rounds} rounds of {args.warm}+{args.measured} steps each")
        try:
            for round_index in range(args.rounds + 1):  # round 0 warms up and is not counted
                shift = round_index % len(systems)
                order = systems[shift:] + systems[:shift]
                steal = StealMeter()
                for system in order:
                    walls = turns.run_block(system.name, args.warm + args.measured, timeout_s=900)
                    if round_index:
                        blocks[system.name].append(block_ms(walls, args.warm, args.measured))
                percent = steal.percent()
                if round_index and percent is not None:
                    steals.append(percent)
                if round_index:
                    log(f"round {round_index}: " + ", ".join(f"{n} {b[-1]:.0f}" for n, b in blocks.items()) + " ms")
        finally:
            turns.stop()
            for wait in waits:
                with contextlib.suppress(Exception):
                    wait.join(120) if isinstance(wait, InThread) else wait.wait(120)
    return blocks, steals


def _systems(args: argparse.Namespace) -> tuple[System, ...]:
    return HSDP_SYSTEMS if args.hsdp else SYSTEMS


def report(blocks: dict[str, list[float]], steals: list[float], args: argparse.Namespace) -> str:
    base = blocks["torchrun"]
    rows, verdicts = [], []
    for system in _systems(args):
        ratios = [m / b for m, b in zip(blocks[system.name], base)]
        extra = statistics.median(m - b for m, b in zip(blocks[system.name], base))
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        paired = statistics.median(ratios)
        rows.append([system.name, f"{statistics.median(blocks[system.name]):.0f}", f"{extra:+.0f}", f"{paired:.3f}",
                     f"{quartiles[0]:.3f}–{quartiles[2]:.3f}", len(ratios)])
        if system.elastic and args.hsdp:
            verdict = "within" if paired <= 1.05 else "over"
            verdicts.append(f"HSDP commit every step: {paired:.3f} of torchrun's step ({verdict} the 1.05× target "
                            f"set for FSDP2's commit + replica).")
        elif system.elastic and system.replicas and system.every == 1:
            verdict = "met" if paired <= 1.05 else f"missed by {100 * (paired - 1.05):.1f} points"
            how = "overlapped with the next step" if system.overlap else "inside commit()"
            verdicts.append(f"Target: commit + replica refresh every step ≤ 1.05× torchrun's step, transfer {how}: "
                            f"{paired:.3f} ({verdict}).")
    steal_line = (f"CPU steal per round: median {statistics.median(steals):.0f}%." if steals else "")
    return "\n".join([
        f"4 ranks per system{', HSDP on a 2 x 2 mesh' if args.hsdp else ''}, FSDP2 MLP {DEPTH} float32 layers "
        f"(~{args.params:g} M parameters), batch {args.batch}, "
        f"SGD + momentum; {args.rounds} rounds, each system {args.warm} + {args.measured} measured steps per round.",
        "", table(["system", "block step (ms, median)", "ms over torchrun's step, same round (median)",
                   "step / torchrun's, same round (median)",
                   "interquartile range", "rounds"], rows), "", steal_line, "", *verdicts, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warm", type=int, default=2)
    parser.add_argument("--measured", type=int, default=10)
    parser.add_argument("--hsdp", action="store_true", help="both sides HSDP on a 2 x 2 mesh (see above)")
    args = parser.parse_args()
    exit_on_sigterm()
    started = time.monotonic()
    header = machine_line()
    with workdir("ray_elastic-fsdp-overhead-", False) as tmp:
        blocks, steals = measure(args, Path(tmp))
    print(f"## FSDP2 step-time overhead, systems interleaved\n\n{header}\n\n"
          f"`{' '.join(['python', *sys.argv])}` ({time.monotonic() - started:.0f} s)\n")
    print(report(blocks, steals, args))


if __name__ == "__main__":
    main()

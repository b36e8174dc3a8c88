"""Steady-state overhead with every system alive at once, taking turns in short blocks of steps.

overhead.py compares whole runs one after another; on a shared virtual machine
whose speed swings by 2× over minutes (CPU steal), a run-to-run spread that
large hides a 5% target. Here torchrun and the ray_elastic variants start
together, each on the same DDP loop as overhead.py (2 workers, gloo, 4-layer
float32 MLP at `--params` M, SGD + momentum, batch 32), and wait in their
loops until the harness gives them the turn (`loops.wait_for_turn`, a file
polled every 20 ms). Each round gives every system one block of
`--warm + --measured` steps, in an order that rotates every round; a block's
time is (wall time of its last step − wall time of its first measured step) /
`--measured` on rank 0, so commits that fall in it count in full. A system's
ratio is the median over rounds of its block time over torchrun's block time
in the same round: drift slower than a round (~20 s) cancels.

    .venv/bin/python benchmarks/overhead_interleaved.py --params 10 --rounds 30
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
    StepLogs,
    connect,
    exit_on_sigterm,
    log,
    machine_line,
    table,
    torchrun_cmd,
    workdir,
)
from workloads.loops import width_for_params  # noqa: E402

DEPTH, BATCH = 4, 32


@dataclass(frozen=True)
class System:
    name: str
    snapshot: str = ""  # "" for torchrun
    commit_every: int = 1


SYSTEMS = (
    System("torchrun"),
    System("ray_elastic", "copy"),
    System("ray_elastic, snapshot=live", "live"),
    System("ray_elastic, commit every 10", "copy", 10),
)


class Turns:
    """The turn file the workers poll, and each system's step logs."""

    def __init__(self, root: Path, systems: tuple[System, ...]):
        self.path = root / "turn"
        self.path.write_text("")
        self.dirs = {s.name: root / f"system-{i}" for i, s in enumerate(systems)}
        for path in self.dirs.values():
            path.mkdir()
        self.logs = {name: StepLogs(path) for name, path in self.dirs.items()}
        self.done = {s.name: 0 for s in systems}  # steps each system has completed

    def tag(self, name: str) -> str:
        return f"s{list(self.dirs).index(name)}"  # one word: the turn file is split on spaces

    def entered(self, name: str) -> bool:
        return {r.rank for r in self.logs[name].records() if r.kind == "enter"} >= {0, 1}

    def run_block(self, name: str, steps: int, timeout_s: float) -> dict[int, float]:
        """Let `name` take `steps` more steps; the rank-0 wall time of each, by step."""
        last = self.done[name] + steps
        self.path.write_text(f"{self.tag(name)} {last}")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            done = [r for r in self.logs[name].records() if r.kind == "step" and r.step > self.done[name]]
            if {r.rank for r in done if r.step == last} >= {0, 1}:
                self.done[name] = last
                return {r.step: r.wall for r in done if r.rank == 0}
            time.sleep(0.01)
        raise TimeoutError(f"{name} did not finish steps up to {last} within {timeout_s:g}s")

    def stop(self) -> None:
        self.path.write_text("stop")


def start_systems(stack: contextlib.ExitStack, turns: Turns, width: int) -> list[Any]:
    """Start every system; each waits in its loop for its first turn. Returns what to wait on at the end."""
    from workloads.loops import elastic_train

    import ray_elastic
    from ray_elastic.testing import local_cluster

    groups = ProcessGroups()
    stack.callback(groups.close)
    waits: list[Any] = []
    elastic = [s for s in SYSTEMS if s.snapshot]
    cluster = stack.enter_context(local_cluster(num_nodes=2, cpus_per_node=len(elastic), connect=False))
    connect(cluster, 2)
    for system in SYSTEMS:
        log_dir = turns.dirs[system.name]
        shape = {"width": width, "depth": DEPTH, "batch": BATCH, "sleep_s": 0.0}
        if not system.snapshot:
            args = ["--log-dir", str(log_dir), "--steps", "1000000", "--turn-file", str(turns.path),
                    "--system", turns.tag(system.name), *[f"--{k.replace('_', '-')}={v}" for k, v in shape.items()]]
            proc = groups.start(torchrun_cmd("--standalone", "--nproc-per-node=2", script_args=args),
                                log_dir / "torchrun.out", env=WORKER_ENV)
            waits.append(proc)
            continue
        config = {**shape, "log_dir": str(log_dir), "steps": 1_000_000, "commit_every": system.commit_every,
                  "turn_file": str(turns.path), "system": turns.tag(system.name)}
        run = functools.partial(
            ray_elastic.run, elastic_train, config=config, min_nodes=2, max_nodes=2, max_restarts=0,
            progress="none", snapshot=system.snapshot, name=f"interleaved-{turns.tag(system.name)}-{time.time_ns()}")
        waits.append(InThread(run))
    deadline = time.monotonic() + 300
    while not all(turns.entered(s.name) for s in SYSTEMS):
        if time.monotonic() > deadline:
            raise TimeoutError("not every system reached its training loop within 300 s")
        time.sleep(0.2)
    return waits


def block_ms(walls: dict[int, float], warm: int, measured: int) -> float:
    """Mean step time (ms) over the block's last `measured` steps (rank 0)."""
    steps = sorted(walls)
    first, last = steps[warm - 1], steps[-1]  # the interval from the last warm step on
    return (walls[last] - walls[first]) * 1e3 / measured


def measure(args: argparse.Namespace, root: Path) -> tuple[dict[str, list[float]], list[float]]:
    width = width_for_params(args.params * 1e6, DEPTH)
    turns = Turns(root, SYSTEMS)
    blocks: dict[str, list[float]] = {s.name: [] for s in SYSTEMS}
    steals: list[float] = []
    with contextlib.ExitStack() as stack:
        waits = start_systems(stack, turns, width)
        log(f"every system is in its loop; {args.rounds} rounds of {args.warm}+{args.measured} steps each")
        try:
            for round_index in range(args.rounds + 1):  # round 0 warms up and is not counted
                shift = round_index % len(SYSTEMS)
                order = SYSTEMS[shift:] + SYSTEMS[:shift]
                steal = StealMeter()
                for system in order:
                    walls = turns.run_block(system.name, args.warm + args.measured, timeout_s=600)
                    if round_index:
                        blocks[system.name].append(block_ms(walls, args.warm, args.measured))
                percent = steal.percent()
                if round_index and percent is not None:
                    steals.append(percent)
                if round_index:
                    log(f"round {round_index}: " + ", ".join(f"{n} {b[-1]:.0f}" for n, b in blocks.items())
                        + (f" ms; steal {percent:.0f}%" if percent is not None else " ms"))
        finally:
            turns.stop()
            for wait in waits:
                with contextlib.suppress(Exception):
                    wait.join(120) if isinstance(wait, InThread) else wait.wait(120)
    return blocks, steals


def report(blocks: dict[str, list[float]], steals: list[float], args: argparse.Namespace) -> str:
    base = blocks["torchrun"]
    rows = []
    verdicts = []
    for system in SYSTEMS:
        mine = blocks[system.name]
        ratios = [m / b for m, b in zip(mine, base)]
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        paired = statistics.median(ratios)
        rows.append([system.name, f"{statistics.median(mine):.1f}", f"{paired:.3f}",
                     f"{quartiles[0]:.3f}–{quartiles[2]:.3f}", len(mine)])
        if system.name != "torchrun" and system.commit_every == 1:
            verdict = "met" if paired <= 1.05 else f"missed by {100 * (paired - 1.05):.1f} points"
            verdicts.append(f"Target: step-time ratio ≤ 1.05 at ~{args.params:g} M parameters, commit every "
                            f"step, {system.name}: {paired:.3f} ({verdict}).")
    steal_line = (f"CPU steal per round: median {statistics.median(steals):.0f}%, "
                  f"{min(steals):.0f}–{max(steals):.0f}%." if steals else "")
    return "\n".join([
        f"2 workers per system, 4-layer float32 MLP ({args.params:g} M parameters), batch {BATCH}, SGD + momentum; "
        f"{args.rounds} rounds, each system one block of {args.warm} + {args.measured} measured steps per round, "
        "order rotating.", "",
        table(["system", "block step (ms, median)", "step / torchrun's in the same round (median)",
               "interquartile range of that ratio", "rounds"], rows),
        "", steal_line, "", *verdicts, "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=10.0, help="model size in millions of parameters")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warm", type=int, default=2, help="steps at the start of a block not measured")
    parser.add_argument("--measured", type=int, default=20, help="steps measured per block (a multiple of 10)")
    args = parser.parse_args()
    if args.rounds < 1 or args.warm < 1 or args.measured < 1:
        parser.error("--rounds, --warm and --measured must be at least 1")
    exit_on_sigterm()
    started = time.monotonic()
    header = machine_line()
    with workdir("ray_elastic-interleaved-", False) as tmp:
        blocks, steals = measure(args, Path(tmp))
    print(f"## Steady-state overhead, systems interleaved\n\n{header}\n\n"
          f"`{' '.join(['python', *sys.argv])}` ({time.monotonic() - started:.0f} s)\n")
    print(report(blocks, steals, args))


if __name__ == "__main__":
    main()

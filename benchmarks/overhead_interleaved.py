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

The ray_elastic runs (and their Ray cluster, probing them) stay up while
torchrun takes its turns; torchrun is also measured alone, with no Ray running,
in `--alone-rounds` blocks before Ray starts and as many after it stopped.
ray_elastic runs with the defaults (snapshot="auto"), with snapshot="copy",
and with the defaults committing every 10 steps, whose commit-bearing steps are
reported apart (a block's mean counts them in full; a median would drop them).

    .venv/bin/python benchmarks/overhead_interleaved.py --params 10 --rounds 10
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
    System("ray_elastic (defaults)", "auto"),
    System("ray_elastic, snapshot=copy", "copy"),
    System("ray_elastic (defaults), commit every 10", "auto", 10),
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


def start_torchrun(stack: contextlib.ExitStack, turns: Turns, width: int) -> Any:
    """Start torchrun (no Ray needed); it waits in its loop for its first turn. Returns its process."""
    groups = ProcessGroups()
    stack.callback(groups.close)
    system = SYSTEMS[0]
    shape = {"width": width, "depth": DEPTH, "batch": BATCH, "sleep_s": 0.0}
    args = ["--log-dir", str(turns.dirs[system.name]), "--steps", "1000000", "--turn-file", str(turns.path),
            "--system", turns.tag(system.name), *[f"--{k.replace('_', '-')}={v}" for k, v in shape.items()]]
    proc = groups.start(torchrun_cmd("--standalone", "--nproc-per-node=2", script_args=args),
                        turns.dirs[system.name] / "torchrun.out", env=WORKER_ENV)
    _wait_entered(turns, [system])
    return proc


def start_elastic(stack: contextlib.ExitStack, turns: Turns, width: int) -> dict[str, InThread]:
    """Start a Ray cluster and every ray_elastic system on it; each waits in its loop for its first turn."""
    from workloads.loops import elastic_train

    import ray_elastic
    from ray_elastic.testing import local_cluster

    elastic = [s for s in SYSTEMS if s.snapshot]
    cluster = stack.enter_context(local_cluster(num_nodes=2, cpus_per_node=len(elastic), connect=False))
    connect(cluster, 2)
    runs = {}
    for system in elastic:
        shape = {"width": width, "depth": DEPTH, "batch": BATCH, "sleep_s": 0.0}
        config = {**shape, "log_dir": str(turns.dirs[system.name]), "steps": 1_000_000,
                  "commit_every": system.commit_every, "turn_file": str(turns.path), "system": turns.tag(system.name)}
        run = functools.partial(
            ray_elastic.run, elastic_train, config=config, min_nodes=2, max_nodes=2, max_restarts=0,
            progress="none", snapshot=system.snapshot, name=f"interleaved-{turns.tag(system.name)}-{time.time_ns()}")
        runs[system.name] = InThread(run)
    _wait_entered(turns, elastic)
    return runs


def stop_elastic(turns: Turns, runs: dict[str, InThread]) -> dict[str, Any]:
    """End every ray_elastic run after one more step; their RunResults by system name."""
    results = {}
    for name, run in runs.items():
        turns.logs[name].write_stop_at(turns.done[name] + 1)
        turns.run_block(name, 1, timeout_s=120)
        results[name] = run.join(120)
    return results


def _wait_entered(turns: Turns, systems: list[System], timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(turns.entered(s.name) for s in systems):
        if time.monotonic() > deadline:
            raise TimeoutError(f"not every system reached its training loop within {timeout_s:g} s")
        time.sleep(0.2)


def block_ms(walls: dict[int, float], warm: int, measured: int) -> float:
    """Mean step time (ms) over the block's last `measured` steps (rank 0)."""
    steps = sorted(walls)
    first, last = steps[warm - 1], steps[-1]  # the interval from the last warm step on
    return (walls[last] - walls[first]) * 1e3 / measured


@dataclass
class Measured:
    blocks: dict[str, list[float]]  # per system: block step times (ms) of the interleaved rounds
    alone: list[float]  # torchrun's block step times (ms) with no Ray running
    steals: list[float]
    commit_steps: dict[str, tuple[list[float], list[float]]]  # per system: steps with / without a commit (ms)
    commit_ms: dict[str, list[float]]  # per system: the commits' own time (ms, rank 0)
    snapshot: dict[str, str]  # per ray_elastic system: RunResult.snapshot


def measure(args: argparse.Namespace, root: Path) -> Measured:
    width = width_for_params(args.params * 1e6, DEPTH)
    turns = Turns(root, SYSTEMS)
    blocks: dict[str, list[float]] = {s.name: [] for s in SYSTEMS}
    steps: dict[str, list[tuple[float, float]]] = {s.name: [] for s in SYSTEMS}  # (step ms, commit ms), rank 0
    alone: list[float] = []
    steals: list[float] = []
    torchrun = SYSTEMS[0].name

    def block(name: str) -> float:
        walls = turns.run_block(name, args.warm + args.measured, timeout_s=600)
        commits = {r.step: r.commit_ms for r in turns.logs[name].records() if r.kind == "step" and r.rank == 0}
        ordered = sorted(walls)
        steps[name] += [((walls[b] - walls[a]) * 1e3, commits.get(b, 0.0))
                        for a, b in zip(ordered[args.warm - 1:], ordered[args.warm:])]
        return block_ms(walls, args.warm, args.measured)

    with contextlib.ExitStack() as stack:
        start_torchrun(stack, turns, width)
        try:
            for index in range(args.alone_rounds + 1):  # the first warms up
                ms = block(torchrun)
                if index:
                    alone.append(ms)
            log(f"torchrun alone, no Ray: {', '.join(f'{b:.0f}' for b in alone)} ms")
            with contextlib.ExitStack() as ray_stack:
                runs = start_elastic(ray_stack, turns, width)
                log(f"every system is in its loop; {args.rounds} rounds of {args.warm}+{args.measured} steps each")
                for round_index in range(args.rounds + 1):  # round 0 warms up and is not counted
                    shift = round_index % len(SYSTEMS)
                    order = SYSTEMS[shift:] + SYSTEMS[:shift]
                    steal = StealMeter()
                    for system in order:
                        if not round_index:
                            turns.run_block(system.name, args.warm + args.measured, timeout_s=600)
                            continue
                        blocks[system.name].append(block(system.name))
                    percent = steal.percent()
                    if round_index and percent is not None:
                        steals.append(percent)
                    if round_index:
                        log(f"round {round_index}: " + ", ".join(f"{n} {b[-1]:.0f}" for n, b in blocks.items())
                            + (f" ms; steal {percent:.0f}%" if percent is not None else " ms"))
                results = stop_elastic(turns, runs)
            for _ in range(args.alone_rounds):
                alone.append(block(torchrun))
            log(f"torchrun alone again, Ray stopped: {', '.join(f'{b:.0f}' for b in alone[args.alone_rounds:])} ms")
        finally:
            turns.stop()
    with_commit = {n: ([ms for ms, c in v if c > 0], [ms for ms, c in v if c == 0]) for n, v in steps.items()}
    commit_ms = {n: [c for _, c in v if c > 0] for n, v in steps.items()}
    return Measured(blocks, alone, steals, with_commit, commit_ms,
                    {name: result.snapshot for name, result in results.items()})


def report(m: Measured, args: argparse.Namespace) -> str:
    base = m.blocks["torchrun"]
    alone = statistics.median(m.alone) if m.alone else float("nan")
    rows = []
    verdicts = []
    for system in SYSTEMS:
        mine = m.blocks[system.name]
        ratios = [a / b for a, b in zip(mine, base)]
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        paired = statistics.median(ratios)
        with_commit, without = m.commit_steps[system.name]
        every = system.commit_every if system.snapshot else 0
        commit_cell = (f"{statistics.median(m.commit_ms[system.name]):.1f}"
                       if system.snapshot and m.commit_ms[system.name] else "—")
        split = (f"{statistics.median(with_commit):.0f} / {statistics.median(without):.0f}"
                 if every > 1 and with_commit and without else "—")
        rows.append([system.name, m.snapshot.get(system.name, "—"), f"{statistics.median(mine):.1f}",
                     f"{paired:.3f}", f"{quartiles[0]:.3f}–{quartiles[2]:.3f}",
                     f"{statistics.median(mine) / alone:.3f}", commit_cell, split, len(mine)])
        if system.snapshot == "auto" and system.commit_every == 1:
            verdict = "met" if paired <= 1.03 else f"missed by {100 * (paired - 1.03):.1f} points"
            verdicts.append(f"Target (issue 14): the defaults at ~{args.params:g} M parameters, a commit every step, "
                            f"≤ 1.03× torchrun's step: {paired:.3f} paired with torchrun under Ray, "
                            f"{statistics.median(mine) / alone:.3f} against torchrun alone ({verdict}).")
    steal_line = (f"CPU steal per round: median {statistics.median(m.steals):.0f}%, "
                  f"{min(m.steals):.0f}–{max(m.steals):.0f}%." if m.steals else "")
    alone_line = (f"torchrun alone (no Ray running; {len(m.alone)} blocks before Ray started and after it "
                  f"stopped): median {alone:.1f} ms, {min(m.alone):.1f}–{max(m.alone):.1f}; while Ray ran: median "
                  f"{statistics.median(base):.1f} ms.") if m.alone else ""
    return "\n".join([
        f"2 workers per system, 4-layer float32 MLP ({args.params:g} M parameters), batch {BATCH}, SGD + momentum; "
        f"{args.rounds} rounds, each system one block of {args.warm} + {args.measured} measured steps per round, "
        "order rotating.", "",
        table(["system", "snapshot used", "block step (ms, median)", "step / torchrun's in the same round (median)",
               "interquartile range of that ratio", "step / torchrun alone's (medians)", "commit (ms, median)",
               "steps with / without a commit (ms, median)", "rounds"], rows),
        "", alone_line, steal_line, "", *verdicts, "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=10.0, help="model size in millions of parameters")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--alone-rounds", type=int, default=5,
                        help="torchrun blocks with no Ray running, before Ray starts and again after it stopped")
    parser.add_argument("--warm", type=int, default=2, help="steps at the start of a block not measured")
    parser.add_argument("--measured", type=int, default=20, help="steps measured per block (a multiple of 10)")
    args = parser.parse_args()
    if args.rounds < 1 or args.warm < 1 or args.measured < 1:
        parser.error("--rounds, --warm and --measured must be at least 1")
    exit_on_sigterm()
    started = time.monotonic()
    header = machine_line()
    with workdir("ray_elastic-interleaved-", False) as tmp:
        measured = measure(args, Path(tmp))
    print(f"## Steady-state overhead, systems interleaved\n\n{header}\n\n"
          f"`{' '.join(['python', *sys.argv])}` ({time.monotonic() - started:.0f} s)\n")
    print(report(measured, args))


if __name__ == "__main__":
    main()

"""Steady-state cost of ray_elastic: the same DDP loop under torchrun and under ray_elastic (State.commit).

Two workers (gloo, CPU, OMP_NUM_THREADS=1, no sleep), a 4-layer float32 MLP
with SGD + momentum, batch 32. For each model size the loop runs under plain
`torchrun --standalone --nproc-per-node=2` (no checkpointing) and under
`ray_elastic.run` on a simulated 2-node cluster with `State.commit()` every
step (plus `report()`), interleaved `--repeats` times, once with the default
`snapshot="copy"` and once with `snapshot="live"` (optimizer state not copied).
The order of the systems rotates by one place every repeat, so that each runs
first, second, ... equally often. Step time is the median interval between
rank 0's completed steps after `--warmup` steps; commit time is measured
around `state.commit()` on rank 0. The target is judged on the paired ratio:
the median over repeats of (system's step / torchrun's step in the same
repeat), which cancels drift slower than one repeat. At the size
named by `--ratio-size`, ray_elastic also runs with a commit every
`--commit-every` steps (a user-loop choice: at most that many steps redone).

    .venv/bin/python benchmarks/overhead.py
    .venv/bin/python benchmarks/overhead.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    WORKER_ENV,
    ProcessGroups,
    StealMeter,
    StepLogs,
    connect,
    exit_on_sigterm,
    log,
    machine_line,
    median,
    table,
    torchrun_cmd,
    workdir,
)
from workloads.loops import width_for_params  # noqa: E402

DEPTH = 4
BATCH = 32
LIVE = "ray_elastic, snapshot=live"


@dataclass
class Timing:
    system: str
    params_m: float
    repeat: int
    step_ms: float
    commit_ms: float
    steps: int
    steal_pct: float | None = None


def step_timing(log_dir: Path, warmup: int) -> tuple[float, float, int]:
    """Median rank-0 step interval and median commit time (ms) after `warmup` steps."""
    steps = [r for r in StepLogs(log_dir).records() if r.kind == "step" and r.rank == 0 and r.step > warmup]
    intervals = [(b.wall - a.wall) * 1e3 for a, b in zip(steps, steps[1:])]
    commits = [r.commit_ms for r in steps if r.commit_ms > 0]
    return median(intervals), (median(commits) if commits else 0.0), len(intervals)


def run_torchrun(groups: ProcessGroups, log_dir: Path, width: int, steps: int, sleep_s: float) -> None:
    cmd = torchrun_cmd(
        "--standalone", "--nproc-per-node=2",
        script_args=["--log-dir", str(log_dir), "--steps", str(steps), "--width", str(width),
                     "--depth", str(DEPTH), "--batch", str(BATCH), "--sleep-s", str(sleep_s)],
    )
    proc = groups.start(cmd, log_dir / "torchrun.out", env=WORKER_ENV)
    try:
        rc = proc.wait(600)
    finally:
        groups.kill(proc)
    if rc != 0:
        raise RuntimeError(f"torchrun failed with {rc}; see {log_dir / 'torchrun.out'}")


def run_elastic(log_dir: Path, width: int, steps: int, sleep_s: float, commit_every: int, snapshot: str) -> None:
    from workloads.loops import elastic_train

    import ray_elastic

    config = {"log_dir": str(log_dir), "steps": steps, "width": width, "depth": DEPTH, "batch": BATCH,
              "sleep_s": sleep_s, "commit_every": commit_every}
    result = ray_elastic.run(elastic_train, config=config, min_nodes=2, max_nodes=2, max_restarts=0,
                             progress="none", snapshot=snapshot)
    settle(result.worker_pids)


def settle(pids: Sequence[int] = (), quiet_s: float = 3.0) -> None:
    """Wait for a run's processes to be gone, then a little more: teardown must not load the next run."""
    import psutil

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(psutil.pid_exists(pid) for pid in pids):
        time.sleep(0.1)
    time.sleep(quiet_s)


def steps_for(size_m: float, args: argparse.Namespace) -> tuple[int, int]:
    """(steps, warm-up steps): small models get more steps, so every run measures several seconds."""
    steps = min(400, max(args.steps, int(args.steps * 10 / size_m)))
    return steps, max(args.warmup, steps // 6)


def measure_all(args: argparse.Namespace, root: Path) -> list[Timing]:
    from ray_elastic.testing import local_cluster

    timings: list[Timing] = []
    groups = ProcessGroups()
    counter = 0

    def fresh_dir() -> Path:
        nonlocal counter
        counter += 1
        path = root / f"run-{counter}"
        path.mkdir()
        return path

    with contextlib.ExitStack() as stack:
        stack.callback(groups.close)
        cluster = stack.enter_context(local_cluster(num_nodes=2, connect=False))
        connect(cluster, 2)
        for size in args.sizes:
            width = width_for_params(size * 1e6, DEPTH)
            params_m = DEPTH * (width * width + width) / 1e6
            variants: list[tuple[str, int, str]] = [("ray_elastic", 1, "copy"), (LIVE, 1, "live")]
            if size == args.ratio_size and args.commit_every > 1:
                variants.append((f"ray_elastic, commit every {args.commit_every}", args.commit_every, "copy"))
            steps, warmup = steps_for(size, args)
            for repeat in range(args.repeats if size == args.ratio_size else 1):
                runs: list[tuple[str, int, str]] = [("torchrun", 0, ""), *variants]
                shift = repeat % len(runs)  # rotate: every system takes every place in the order
                runs = runs[shift:] + runs[:shift]
                for name, every, snapshot in runs:
                    log(f"{params_m:.2f} M params (width {width}), {steps} steps, repeat {repeat + 1}: {name}")
                    run_dir = fresh_dir()
                    steal = StealMeter()
                    if name == "torchrun":
                        run_torchrun(groups, run_dir, width, steps, args.sleep_s)
                        settle()
                    else:
                        run_elastic(run_dir, width, steps, args.sleep_s, every, snapshot)
                    timings.append(Timing(name, params_m, repeat, *step_timing(run_dir, warmup), steal.percent()))
                log(f"  {timings[-len(runs):]}")
    return timings


def paired_ratio(timings: list[Timing], system: str, params_m: float) -> float:
    """Median over repeats of this system's step time over torchrun's in the same repeat."""
    base = {t.repeat: t.step_ms for t in timings if t.params_m == params_m and t.system == "torchrun"}
    return median([t.step_ms / base[t.repeat] for t in timings
                   if t.params_m == params_m and t.system == system and t.repeat in base])


def steal_range(timings: list[Timing]) -> str:
    steals = [t.steal_pct for t in timings if t.steal_pct is not None]
    return f"{min(steals):.0f}–{max(steals):.0f}" if steals else "—"


def report(timings: list[Timing], args: argparse.Namespace) -> str:
    sizes = sorted({t.params_m for t in timings})
    systems = list(dict.fromkeys(t.system for t in timings))
    rows = []
    ratio_line = ""
    for params_m in sizes:
        base = median([t.step_ms for t in timings if t.params_m == params_m and t.system == "torchrun"])
        for system in systems:
            mine = [t for t in timings if t.params_m == params_m and t.system == system]
            if not mine:
                continue
            step_ms = median([t.step_ms for t in mine])
            commit_ms = median([t.commit_ms for t in mine])
            ratio = step_ms / base
            paired = paired_ratio(timings, system, params_m)
            every = args.commit_every if "every" in system else 1
            runs_ms = [t.step_ms for t in mine]
            spread = f" ({min(runs_ms):.0f}–{max(runs_ms):.0f})" if len(mine) > 1 else ""
            rows.append([f"{params_m:.2f}", system, f"{step_ms:.1f}{spread}",
                         f"{commit_ms:.1f}" if system != "torchrun" else "—",
                         f"{100 * commit_ms / every / step_ms:.1f}%" if system != "torchrun" else "—",
                         f"{ratio:.3f}", f"{paired:.3f}", steal_range(mine), len(mine)])
            if system in ("ray_elastic", LIVE) and abs(params_m - args.ratio_size) / args.ratio_size < 0.1:
                verdict = "met" if paired <= 1.05 else f"missed by {100 * (paired - 1.05):.1f} points"
                ratio_line += (f"Target: paired step-time ratio ≤ 1.05 at ~{args.ratio_size:g} M parameters, "
                               f"{system}: {paired:.3f} ({verdict}).\n")
    headers = ["params (M)", "system", "step (ms, median of runs (min–max))", "commit (ms, median)",
               "commit share of step", "step / torchrun's", "paired ratio (median)", "CPU steal (min–max %)",
               "runs"]
    return "\n".join([
        f"2 workers, 4-layer float32 MLP, batch {BATCH}, sleep {args.sleep_s:g}s; per run "
        f"min(400, max({args.steps}, {args.steps}×10/size in M)) steps, the first sixth (at least {args.warmup}) "
        f"excluded.", "", table(headers, rows), "", ratio_line,
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--sizes", default="0.1,1,10,30", help="model sizes in millions of parameters")
    parser.add_argument("--ratio-size", type=float, default=10.0, help="the size the 1.05 target is judged at")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs at --ratio-size (order rotates)")
    parser.add_argument("--commit-every", type=int, default=10, help="extra ray_elastic run committing every N")
    parser.add_argument("--sleep-s", type=float, default=0.0)
    parser.add_argument("--keep", action="store_true", help="keep the step logs (path printed at the end)")
    parser.add_argument("--quick", action="store_true", help="sizes 0.1 and 10 M, 30 steps, one repeat")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.steps, args.warmup, args.repeats = "0.1,10", 30, 5, 1
    args.sizes = [float(s) for s in args.sizes.split(",")]
    exit_on_sigterm()
    started = time.monotonic()
    header = machine_line()
    with workdir("ray_elastic-overhead-", args.keep) as tmp:
        timings = measure_all(args, Path(tmp))
    print(f"## Steady-state overhead\n\n{header}\n\n"
          f"`{' '.join(['python', *sys.argv])}` ({time.monotonic() - started:.0f} s)\n")
    if args.keep:
        print(f"\nStep logs kept in {tmp}")
    print(report(timings, args))


if __name__ == "__main__":
    main()

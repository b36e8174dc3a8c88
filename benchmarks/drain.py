"""A node leaves with notice (Ray drains it) vs without (it is killed): the pause in training, in one run.

One ray_elastic run on 3 simulated nodes × 1 worker (min_nodes=1, max_nodes=3, unlimited
restarts), the small DDP MLP of workloads/loops.py (gloo, CPU, 20 ms sleep a step, commit
every step). Once every rank steps, events alternate on the node of the highest rank:

- drain: Ray's `DrainNode` (reason preemption, deadline --deadline-s, the call `ray drain-node`,
  autoscaler v2 and KubeRay make); the run leaves the node at a commit; whatever is left of
  the node is killed at its deadline, as the provider would;
- kill: the node is killed without notice (its raylet and workers SIGKILLed,
  `LocalCluster.kill_node(graceful=False)`), today's crash path;

after each event a fresh node is added and the run grows back to 3 nodes before the next.
Measured per event from the step logs of every rank:

- pause: the longest interval in which no rank completed a step, from the last step before
  the event to the third step at the smaller world (training on while the notice is handled
  is no pause);
- event -> first step at world 2; steps redone (completed twice); restarts charged (events).

    .venv/bin/python benchmarks/drain.py
    .venv/bin/python benchmarks/drain.py --pairs 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import StepLogs, exit_on_sigterm, fmt_s, log, machine_line, median, table, wait_until, workdir  # noqa: E402
from launchers import ElasticLauncher  # noqa: E402

NODES = 3
TARGET_PAUSE_S = 0.3


@dataclass
class Leave:
    how: str  # "drain" or "kill"
    ok: bool
    pause_s: float | None = None
    to_smaller_s: float | None = None
    redone: int | None = None
    restarts: int | None = None
    note: str = ""


def _events(log_dir: Path) -> list[dict[str, Any]]:
    path = log_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def leave_once(how: str, launcher: ElasticLauncher, logs: StepLogs, log_dir: Path, args: argparse.Namespace) -> Leave:
    cluster = launcher.cluster
    member = logs.members()[NODES - 1]
    node = next(n for n in cluster.nodes if cluster.node_id(n) == member.extra)
    raylet = node.all_processes["raylet"][0].process
    t0 = time.time()
    if how == "drain":
        accepted, why = cluster.drain_node(node, deadline_s=args.deadline_s, message="benchmark preemption")
        if not accepted:
            return Leave(how, False, note=f"drain rejected: {why}")
    else:
        cluster.kill_node(node, graceful=False)

    def third_step_at_smaller_world() -> Any:
        steps = [r for r in logs.records() if r.kind == "step" and r.wall > t0 and r.world == NODES - 1]
        return steps[2] if len(steps) >= 3 else None

    third = wait_until(third_step_at_smaller_world, args.timeout, alive=launcher.alive)
    if how == "drain":  # the provider kills what is left at the deadline (the node normally exited already)
        while raylet.poll() is None and time.time() < t0 + args.deadline_s:
            time.sleep(0.05)
        exited_early = raylet.poll() is not None
        cluster.kill_node(node, graceful=False)
    if third is None:
        return Leave(how, False, note=f"no 3 steps at world {NODES - 1} within {args.timeout:g}s")
    steps = [r for r in logs.records() if r.kind == "step"]
    before = [r for r in steps if r.wall <= t0]
    window = [before[-1].wall] + [r.wall for r in steps if t0 < r.wall <= third.wall]
    first_smaller = next(r for r in steps if r.wall > t0 and r.world == NODES - 1)
    restarts = sum(1 for e in _events(log_dir) if e["kind"] == "restart" and e["time"] > t0)
    result = Leave(how, True, pause_s=max(b - a for a, b in zip(window, window[1:])),
                   to_smaller_s=first_smaller.wall - t0, redone=max(0, before[-1].step - (first_smaller.step - 1)),
                   restarts=restarts)
    if how == "drain" and not exited_early:
        result.note = "the drained node was still up at its deadline"
    return result


def report(results: list[Leave], args: argparse.Namespace) -> str:
    rows = []
    for how in ("drain", "kill"):
        mine = [r for r in results if r.how == how]
        ok = [r for r in mine if r.ok]
        pauses = [r.pause_s for r in ok if r.pause_s is not None]
        rows.append([
            how, f"{len(ok)}/{len(mine)}", fmt_s(median(pauses), 3), fmt_s(max(pauses) if pauses else None, 3),
            fmt_s(median([r.to_smaller_s for r in ok if r.to_smaller_s is not None]), 3),
            max((r.redone or 0 for r in ok), default="—"), sum(r.restarts or 0 for r in ok),
            "; ".join(sorted({r.note for r in mine if r.note})),
        ])
    headers = ["node leaves by", "ok", "pause median (s)", "pause max (s)", "event → first step at world 2, median (s)",
               "steps redone max", "restarts charged", "note"]
    drains = [r.pause_s for r in results if r.how == "drain" and r.pause_s is not None]
    verdict = ""
    if drains:
        verdict = (f"Target: drain pause ≤ {TARGET_PAUSE_S} s: max {max(drains):.3f} s "
                   f"({'met' if max(drains) <= TARGET_PAUSE_S else 'missed'}).")
    return "\n".join([
        f"{NODES} nodes × 1 worker, min_nodes=1; step sleep {args.sleep_s:g}s; drain deadline {args.deadline_s:g}s; "
        f"{args.pairs} drain/kill pair(s) in one run.", "", table(headers, rows), "", verdict,
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3, help="drain + kill pairs, alternating, in one run")
    parser.add_argument("--deadline-s", type=float, default=20.0)
    parser.add_argument("--sleep-s", type=float, default=0.02)
    parser.add_argument("--timeout", type=float, default=120.0, help="limit for each phase (s)")
    parser.add_argument("--keep", action="store_true", help="keep the step logs (path printed at the end)")
    args = parser.parse_args()
    exit_on_sigterm()
    started = time.monotonic()
    header = machine_line()
    results: list[Leave] = []
    with workdir("ray_elastic-drain-", args.keep) as tmp:
        log_dir = Path(tmp)
        launcher = ElasticLauncher(NODES, 1, NODES, -1, args.sleep_s, 1_000_000)
        logs = StepLogs(log_dir)
        try:
            launcher.start(log_dir)
            for index in range(2 * args.pairs):
                if not wait_until(lambda: logs.steady(NODES, 10), args.timeout, alive=launcher.alive):
                    log(f"not steady at {NODES} ranks; stopping")
                    break
                how = ("drain", "kill")[index % 2]
                result = leave_once(how, launcher, logs, log_dir, args)
                log(f"{how}: {result}")
                results.append(result)
                if not result.ok:
                    break
                launcher.cluster.add_node()
            logs.write_stop_at(logs.max_step() + 10)
            log(launcher.finish(args.timeout))
        finally:
            launcher.close()
        print(f"## A node leaves: drain notice vs killed without notice\n\n{header}\n\n"
              f"`{' '.join(['python', *sys.argv])}` ({time.monotonic() - started:.0f} s)\n")
        if args.keep:
            print(f"\nStep logs kept in {tmp}")
    print(report(results, args))


if __name__ == "__main__":
    main()

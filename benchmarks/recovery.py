"""Recovery after a SIGKILLed worker: ray_elastic vs torchrun --standalone vs Ray Train TorchTrainer.

The same small DDP MLP (gloo, CPU, OMP_NUM_THREADS=1, 20 ms sleep a step) runs
with N workers under each launcher. Once every rank is stepping, one worker
process is SIGKILLed by pid; measured from the outside through the workloads'
step logs:

- recovery: kill -> the first step completed by a process/round that did not
  exist before the kill (a survivor in its new round, or a restarted rank);
- redone: the newest step completed before the kill minus the step training
  resumed from (steps completed twice);
- full world: kill -> all N ranks stepping again (ray_elastic first re-forms
  without the dead rank; a replacement joins at a later commit), and the
  longest gap between completed steps on the way there.

Ray Train reports (with a checkpoint) every step; RAY_TRAIN_HEALTH_CHECK_INTERVAL_S
is lowered to --ray-train-poll-s (see _common.tune_ray_train), which favours it.

ray_elastic runs twice, with the defaults (snapshot="auto") and with "live"
(`--systems` picks). torchrun --standalone runs twice too: as is, and with
TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, which keeps its workers off the agent's
rendezvous store (the stale keys of pytorch/pytorch#135712), so that the
comparison measures the designs rather than that bug. ray_elastic also loses
whole nodes (`LocalCluster.kill_node(node, graceful=False)`).
A launcher that has not recovered within --timeout counts as a failure and is
started afresh (from its checkpoint) for the remaining kills.

    .venv/bin/python benchmarks/recovery.py --kills 3 --node-kills 2
    .venv/bin/python benchmarks/recovery.py --quick
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    Record,
    StepLogs,
    exit_on_sigterm,
    fmt_s,
    log,
    machine_line,
    median,
    table,
    tune_ray_train,
    wait_until,
    workdir,
)
from launchers import NO_SHARED_STORE, ElasticLauncher, RayTrainLauncher, TorchrunStandalone  # noqa: E402

STEADY_STEPS = 5


@dataclass
class KillResult:
    system: str
    what: str
    recovered: bool
    recovery_s: float | None = None
    redone: int | None = None
    full_world_s: float | None = None
    rejoin_pause_s: float | None = None  # longest step gap between recovery and all N ranks stepping
    step_ms: float | None = None  # median step interval before the kill
    note: str = ""


# -- measuring ------------------------------------------------------------------------------------
def measure(logs: StepLogs, launcher: Any, what: str, do_kill: Any, world: int, timeout_s: float) -> KillResult:
    """Kill, then wait for the first step by a process/round that did not exist before the kill."""
    pre_keys = {r.key for r in logs.records()}
    recent = [r for r in logs.records() if r.kind == "step" and r.rank == 0][-20:]
    step_ms = median([(b.wall - a.wall) * 1e3 for a, b in zip(recent, recent[1:])])
    t_kill = time.time()
    do_kill()
    kill_call_s = time.time() - t_kill

    def first_new_step() -> Record | None:
        records = logs.records()
        index = len(records)
        while index > 0 and records[index - 1].wall > t_kill:
            index -= 1
        return next((r for r in records[index:] if r.kind == "step" and r.key not in pre_keys), None)

    found = wait_until(first_new_step, timeout_s, alive=launcher.alive)
    if found is None:
        why = "launcher exited" if not launcher.alive() else f"no step within {timeout_s:g}s"
        return KillResult(launcher.name, what, False, note=why)
    last_before = max((r.step for r in logs.records() if r.kind == "step" and r.key in pre_keys), default=0)
    result = KillResult(launcher.name, what, True, found.wall - t_kill, max(0, last_before - (found.step - 1)),
                        step_ms=step_ms)
    if kill_call_s > 0.05:
        result.note = f"the kill call itself took {kill_call_s:.2f}s"
    if found.incarnation.startswith("t"):  # torchrun: t<TORCHELASTIC_RESTART_COUNT>
        attempts = int(found.incarnation[1:]) - max(int(inc[1:]) for _, inc in pre_keys)
        if attempts > 1:
            result.note = f"{attempts - 1} failed restart attempt(s) first"
    if wait_until(lambda: logs.steady(world, 1), timeout_s, alive=launcher.alive):
        entered = [r.wall for r in logs.members().values()]
        full = min(r.wall for r in logs.records() if r.kind == "step" and r.wall >= max(entered))
        result.full_world_s = full - t_kill
        walls = [r.wall for r in logs.records() if r.kind == "step" and found.wall <= r.wall <= full]
        if full > found.wall:  # else training resumed at full size: no second pause
            result.rejoin_pause_s = max((b - a for a, b in zip(walls, walls[1:])), default=0.0)
    else:
        result.note += f"; not back to {world} ranks within {timeout_s:g}s"
    return result


def run_kills(launcher: Any, args: argparse.Namespace, root: Path, victims: list[int],
              node_kills: int = 0) -> tuple[list[KillResult], list[KillResult]]:
    """SIGKILL workers (rotating through `victims`), then whole nodes; restart the launcher after a failure."""
    results: list[KillResult] = []
    node_results: list[KillResult] = []
    attempt = 0
    while len(results) < args.kills:
        attempt += 1
        log_dir = root / f"{re.sub(r'[^A-Za-z0-9]+', '_', launcher.name).strip('_')}-{attempt}"
        log_dir.mkdir()
        log(f"{launcher.name}: starting (attempt {attempt})")
        try:
            launcher.start(log_dir)
            one_launch(launcher, args, StepLogs(log_dir), victims, node_kills, results, node_results)
        finally:
            launcher.close()
    return results, node_results


def one_launch(launcher: Any, args: argparse.Namespace, logs: StepLogs, victims: list[int], node_kills: int,
               results: list[KillResult], node_results: list[KillResult]) -> None:
    """Kills within one launch, until the kills are done or one recovery fails."""

    def steady() -> bool:
        return bool(wait_until(lambda: logs.steady(args.workers, STEADY_STEPS), args.timeout, alive=launcher.alive))

    if not steady():
        results.append(KillResult(launcher.name, "start", False, note="never reached steady state"))
        return
    while len(results) < args.kills:
        rank = victims[len(results) % len(victims)]
        member = logs.members()[rank]
        what = f"SIGKILL rank {rank}"
        result = measure(logs, launcher, what, lambda m=member: launcher.kill(m), args.workers, args.timeout)
        log(f"{launcher.name}: {what}: {result}")
        results.append(result)
        if not result.recovered or result.full_world_s is None or not steady():
            return
    for index in range(node_kills):
        member = logs.members()[victims[index % len(victims)]]
        what = f"kill_node (rank {member.rank}), graceful=False"
        result = measure(logs, launcher, what, lambda m=member: launcher.kill_node_of(m),
                         args.workers - 1, args.timeout)
        result.full_world_s = None  # the node is gone; N-1 ranks is the full world now
        log(f"{launcher.name}: {what}: {result}")
        node_results.append(result)
        if not result.recovered:
            break
        launcher.cluster.add_node()
        if not steady():
            break
    logs.write_stop_at(logs.max_step() + 10)
    log(f"{launcher.name}: {launcher.finish(args.timeout)}")


# -- report ---------------------------------------------------------------------------------------
def summary_row(name: str, results: list[KillResult]) -> list[str]:
    ok = [r for r in results if r.recovered]
    rec = [r.recovery_s for r in ok if r.recovery_s is not None]
    redone = [r.redone for r in ok if r.redone is not None]
    full = [r.full_world_s for r in ok if r.full_world_s is not None]
    return [
        name, str(len(results)), str(len(results) - len(ok)),
        fmt_s(median(rec), 3), fmt_s(max(rec) if rec else None, 3),
        f"{fmt_s(median(redone), 1)} / {max(redone) if redone else '—'}",
        fmt_s(median(full), 2), fmt_s(median([r.rejoin_pause_s for r in ok if r.rejoin_pause_s is not None]), 2),
        fmt_s(median([r.step_ms for r in results if r.step_ms is not None]), 0),
    ]


def report(all_results: dict[str, list[KillResult]], node_results: list[KillResult], args: argparse.Namespace) -> str:
    headers = ["system", "kills", "failed to recover", "recovery median (s)", "recovery max (s)",
               "steps redone median / max", "all N ranks again, median (s)", "longest pause on the way (s)",
               "step before (ms)"]
    rows = [summary_row(name, results) for name, results in all_results.items()]
    out = [f"Workers: {args.workers} (1 per node for the Ray systems), steps sleep {args.sleep_s:g}s; "
           f"recovery limit {args.timeout:g}s.", "", table(headers, rows)]
    base_name = next((n for n in ("ray_elastic", *all_results) if n.startswith("ray_elastic") and n in all_results),
                     None)
    elastic = [r.recovery_s for r in all_results.get(base_name or "", []) if r.recovery_s is not None]
    if elastic:
        base = median(elastic)
        ratios = []
        for name, results in all_results.items():
            rec = [r.recovery_s for r in results if r.recovery_s is not None]
            if not name.startswith("ray_elastic") and rec:
                ratios.append([name, f"{median(rec) / base:.1f}×"])
        out += ["", table(["baseline", f"median recovery / {base_name}'s"], ratios)]
        out.append("")
        for name, results in all_results.items():
            rec = [r.recovery_s for r in results if r.recovery_s is not None]
            if name.startswith("ray_elastic") and rec:
                redone = max((r.redone or 0) for r in results)
                out.append(f"Targets, {name}: median {median(rec):.3f}s (target ≤ 0.25s), max {max(rec):.3f}s "
                           f"(≤ 0.5s), steps redone max {redone} (≤ 1), {len(results) - len(rec)} not recovered.")
    if node_results:
        rec = [r.recovery_s for r in node_results if r.recovery_s is not None]
        out += ["", table(["ray_elastic node death", "kills", "failed", "recovery median (s)", "max (s)"],
                          [["kill_node(graceful=False) → next committed step", len(node_results),
                            len(node_results) - len(rec), fmt_s(median(rec), 3),
                            fmt_s(max(rec) if rec else None, 3)]]),
                f"Target ≤ 2 s: {'met' if rec and max(rec) <= 2 else 'missed'}."]
    rows = [[r.system, r.what, "yes" if r.recovered else "NO", fmt_s(r.recovery_s, 3),
             "—" if r.redone is None else str(r.redone), fmt_s(r.full_world_s, 2), fmt_s(r.rejoin_pause_s, 2), r.note]
            for results in [*all_results.values(), node_results] for r in results]
    out += ["", "<details><summary>every kill</summary>", "",
            table(["system", "fault", "recovered", "recovery (s)", "redone", "all ranks (s)", "pause on the way (s)",
                   "note"], rows),
            "", "</details>"]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=3, help="worker SIGKILLs per system (default 3)")
    parser.add_argument("--node-kills", type=int, default=2, help="ray_elastic node deaths (default 2)")
    parser.add_argument("--workers", type=int, default=3, help="world size (default 3)")
    parser.add_argument("--steps", type=int, default=1_000_000, help="step budget (runs end after the kills)")
    parser.add_argument("--sleep-s", type=float, default=0.02)
    parser.add_argument("--timeout", type=float, default=90.0, help="recovery limit per kill (s)")
    parser.add_argument("--ray-train-poll-s", type=float, default=0.2,
                        help="RAY_TRAIN_HEALTH_CHECK_INTERVAL_S for Ray Train (Ray's default: 2.0)")
    parser.add_argument("--systems", default="ray_elastic,ray_elastic_live,torchrun,torchrun_noshare,ray_train")
    parser.add_argument("--quick", action="store_true", help="1 kill per system, 1 node kill, 60 s limit")
    parser.add_argument("--keep", action="store_true", help="keep the step logs (path printed at the end)")
    args = parser.parse_args()
    if args.quick:
        args.kills, args.node_kills, args.timeout = 1, 1, 60.0
    exit_on_sigterm()
    tune_ray_train(args.ray_train_poll_s)
    victims = [1, 0, 2, 3][: args.workers] if args.workers > 2 else [1, 0]
    restarts = args.kills + args.node_kills + 2
    started = time.monotonic()
    header = machine_line()
    with workdir("ray_elastic-recovery-", args.keep) as tmp:
        root = Path(tmp)
        # ray_elastic: min_nodes=world-1, so survivors re-form without the dead rank at once and its
        # replacement joins at a later commit.
        launchers: dict[str, Any] = {
            "ray_elastic": lambda: ElasticLauncher(args.workers, max(1, args.workers - 1), args.workers, restarts,
                                                   args.sleep_s, args.steps),
            "ray_elastic_live": lambda: ElasticLauncher(args.workers, max(1, args.workers - 1), args.workers,
                                                        restarts, args.sleep_s, args.steps, snapshot="live"),
            "torchrun": lambda: TorchrunStandalone(args.workers, restarts, args.sleep_s, args.steps,
                                                   root / "torchrun-ckpt.pt"),
            "torchrun_noshare": lambda: TorchrunStandalone(args.workers, restarts, args.sleep_s, args.steps,
                                                           root / "torchrun-noshare-ckpt.pt", env=NO_SHARED_STORE),
            "ray_train": lambda: RayTrainLauncher(args.workers, args.workers, restarts, args.sleep_s, args.steps,
                                                  root / "ray-train-storage"),
        }
        all_results: dict[str, list[KillResult]] = {}
        node_results: list[KillResult] = []
        for key in args.systems.split(","):
            launcher = launchers[key]()
            results, nodes = run_kills(launcher, args, root, victims, args.node_kills if key == "ray_elastic" else 0)
            all_results[launcher.name] = results
            node_results += nodes
    print(f"## Recovery after a SIGKILLed worker\n\n{header}\n\n"
          f"`{' '.join(['python', *sys.argv])}` ({time.monotonic() - started:.0f} s)\n")
    print(report(all_results, node_results, args))
    if args.keep:
        print(f"\nStep logs kept in {tmp}")


if __name__ == "__main__":
    main()

"""Scale-up from 2 to 4 nodes mid-run: ray_elastic vs torchrun c10d elastic vs Ray Train v2 elastic.

The same small DDP MLP (gloo, CPU, OMP_NUM_THREADS=1, 20 ms sleep a step) runs on
2 nodes × 1 worker; once it steps, 2 more nodes are added and we measure, from
the workloads' step logs:

- add → first step at the new world: from the moment the first node is added
  to the first completed step at world size 4 (and at any larger world);
- pause: the longest interval in which no rank completed a step, between the
  add and the first step at world 4 (survivors training on while newcomers
  start is no pause);
- steps redone (completed twice) and the number of re-formations on the way.

Launchers:
- ray_elastic: `local_cluster(num_nodes=2)`, `run(min_nodes=2, max_nodes=4)` in a
  thread, `cluster.add_node()` twice from the main thread.
- torchrun: two agents `--nnodes=2:4 --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:PORT`
  (default rendezvous settings), then two more agents; workers reload a
  checkpoint file that rank 0 writes every step.
- Ray Train v2: `ScalingConfig(num_workers=(2, 4), elastic_resize_monitor_interval_s=S)`,
  checkpoint every step through `ray.train.report`, `cluster.add_node()` twice;
  RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=--ray-train-poll-s (see _common.tune_ray_train).
- ray_elastic_no_warmup: ray_elastic with `warmup_modules=()`, the behaviour before
  workers imported `torch._dynamo` ahead of joining: DDP's constructor then imports
  it (1.5-2 s here) inside the newcomer's first round while survivors wait.

    .venv/bin/python benchmarks/scaleup.py
    .venv/bin/python benchmarks/scaleup.py --quick
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
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
from launchers import ElasticLauncher, RayTrainLauncher, TorchrunElastic  # noqa: E402

START_NODES = 2


@dataclass
class ScaleResult:
    system: str
    ok: bool
    to_new_world_s: float | None = None
    to_any_larger_s: float | None = None
    add_call_s: float = 0.0
    pause_s: float | None = None
    step_ms: float | None = None
    redone: int | None = None
    worlds: str = ""
    note: str = ""


def measure(launcher: Any, logs: StepLogs, adds: int, timeout_s: float) -> ScaleResult:
    final = START_NODES + adds
    if not wait_until(lambda: logs.steady(START_NODES, 10), timeout_s, alive=launcher.alive):
        return ScaleResult(launcher.name, False, note=f"never stepped at {START_NODES} ranks")
    t_add = time.time()
    launcher.add(adds)
    add_call_s = time.time() - t_add
    reached = wait_until(lambda: logs.steady(final, 3), timeout_s, alive=launcher.alive)
    records = logs.records()
    steps = [r for r in records if r.kind == "step"]
    before = [r for r in steps if r.wall <= t_add and r.rank == 0]
    recent = before[-20:]
    step_ms = median([(b.wall - a.wall) * 1e3 for a, b in zip(recent, recent[1:])])
    if not reached:
        why = "the launcher exited" if not launcher.alive() else f"still running after {timeout_s:g}s"
        return ScaleResult(launcher.name, False, add_call_s=add_call_s, step_ms=step_ms,
                           note=f"never stepped at {final} ranks: {why} ({time.time() - t_add:.0f}s after the add)")
    first_final = next(r for r in steps if r.world == final and r.wall > t_add)
    first_larger = next(r for r in steps if r.world > START_NODES and r.wall > t_add)
    last_before = max(r.wall for r in steps if r.wall <= t_add)
    window = [last_before] + [r.wall for r in steps if t_add < r.wall <= first_final.wall]
    pause = max(b - a for a, b in zip(window, window[1:]))
    done_before = max(r.step for r in steps if r.wall < first_final.wall and r.world != final)
    worlds = [START_NODES]
    for record in records:
        if record.kind == "enter" and record.wall > t_add and record.world != worlds[-1]:
            worlds.append(record.world)
    return ScaleResult(
        launcher.name, True, to_new_world_s=first_final.wall - t_add, to_any_larger_s=first_larger.wall - t_add,
        add_call_s=add_call_s, pause_s=pause, step_ms=step_ms,
        redone=max(0, done_before - (first_final.step - 1)), worlds=" → ".join(map(str, worlds)),
    )


def run_one(launcher: Any, args: argparse.Namespace, log_dir: Path) -> ScaleResult:
    logs = StepLogs(log_dir)
    log(f"{launcher.name}: starting")
    try:
        launcher.start(log_dir)
        result = measure(launcher, logs, args.adds, args.timeout)
        log(f"{launcher.name}: {result}")
        if result.ok:
            logs.write_stop_at(logs.max_step() + 10)
            log(f"{launcher.name}: {launcher.finish(args.timeout)}")
        return result
    except BaseException:
        log(f"{launcher.name}: failed:\n{traceback.format_exc()}")
        raise
    finally:
        launcher.close()


def make_launcher(key: str, args: argparse.Namespace, run_dir: Path) -> Any:
    final = START_NODES + args.adds
    if key in ("ray_elastic", "ray_elastic_no_warmup"):
        return ElasticLauncher(START_NODES, START_NODES, final, 0, args.sleep_s, args.steps,
                               warmup=not key.endswith("no_warmup"))
    if key == "torchrun":
        return TorchrunElastic(START_NODES, final, args.sleep_s, args.steps, run_dir / "ckpt.pt")
    if key == "ray_train":
        return RayTrainLauncher(START_NODES, (START_NODES, final), 3, args.sleep_s, args.steps, run_dir / "storage",
                                args.ray_train_monitor_s)
    raise SystemExit(f"unknown system {key!r}; choose from ray_elastic, ray_elastic_no_warmup, torchrun, ray_train")


def report(results: list[ScaleResult], args: argparse.Namespace) -> str:
    rows = []
    for name in dict.fromkeys(r.system for r in results):
        mine = [r for r in results if r.system == name]
        ok = [r for r in mine if r.ok]

        def med(attr: str, rs: list[ScaleResult] = ok) -> float:
            return median([getattr(r, attr) for r in rs if getattr(r, attr) is not None])

        rows.append([
            name, f"{len(ok)}/{len(mine)}", fmt_s(med("add_call_s", mine), 2), fmt_s(med("to_any_larger_s"), 2),
            fmt_s(med("to_new_world_s"), 2), fmt_s(med("pause_s"), 3),
            fmt_s(max((r.pause_s for r in ok if r.pause_s is not None), default=None), 3),
            fmt_s(med("step_ms", mine), 1), "; ".join(sorted({r.worlds for r in ok})) or "—",
            max((r.redone or 0 for r in ok), default="—"),
            "; ".join(sorted({r.note for r in mine if r.note})),
        ])
    headers = ["system", "reached 4", "add call (s)", "add → first step at a larger world (s)",
               "add → first step at world 4 (s)", "pause median (s)", "pause max (s)",
               "step before (ms)", "worlds", "steps redone max", "note"]
    elastic = [r.pause_s for r in results if r.system == "ray_elastic" and r.pause_s is not None]
    verdict = ""
    if elastic:
        verdict = (f"Target: ray_elastic pause ≤ 0.5 s: max {max(elastic):.3f} s "
                   f"({'met' if max(elastic) <= 0.5 else 'missed'}).")
    return "\n".join([
        f"Start {START_NODES} nodes × 1 worker, add {args.adds}; step sleep {args.sleep_s:g}s; "
        f"Ray Train elastic_resize_monitor_interval_s={args.ray_train_monitor_s:g}; limit {args.timeout:g}s.",
        "", table(headers, rows), "", verdict,
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adds", type=int, default=2, help="nodes added mid-run (default 2)")
    parser.add_argument("--repeats", type=int, default=2, help="ray_elastic scale-ups (fresh cluster each)")
    parser.add_argument("--baseline-repeats", type=int, default=1, help="torchrun and Ray Train scale-ups")
    parser.add_argument("--steps", type=int, default=1_000_000, help="step budget (runs end after the resize)")
    parser.add_argument("--sleep-s", type=float, default=0.02)
    parser.add_argument("--timeout", type=float, default=150.0, help="limit for each phase (s)")
    parser.add_argument("--ray-train-monitor-s", type=float, default=1.0,
                        help="Ray Train elastic_resize_monitor_interval_s (Ray's default: 60)")
    parser.add_argument("--ray-train-poll-s", type=float, default=0.2,
                        help="RAY_TRAIN_HEALTH_CHECK_INTERVAL_S for Ray Train (Ray's default: 2.0)")
    parser.add_argument("--systems", default="ray_elastic,ray_elastic_no_warmup,torchrun,ray_train",
                        help="ray_elastic_no_warmup: warmup_modules=(), DDP imports torch._dynamo inside the round")
    parser.add_argument("--keep", action="store_true", help="keep the step logs (path printed at the end)")
    parser.add_argument("--quick", action="store_true", help="one scale-up per system, 90 s limit")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.baseline_repeats, args.timeout = 1, 1, 90.0
    exit_on_sigterm()
    tune_ray_train(args.ray_train_poll_s)
    started = time.monotonic()
    header = machine_line()
    final = START_NODES + args.adds
    results: list[ScaleResult] = []
    with workdir("ray_elastic-scaleup-", args.keep) as tmp:
        root = Path(tmp)
        for key in args.systems.split(","):
            for repeat in range(args.repeats if key.startswith("ray_elastic") else args.baseline_repeats):
                run_dir = root / f"{key}-{repeat}"
                run_dir.mkdir()
                results.append(run_one(make_launcher(key, args, run_dir), args, run_dir))
    print(f"## Scale-up 2 → {final} nodes mid-run\n\n{header}\n\n"
          f"`{' '.join(['python', *sys.argv])}` ({time.monotonic() - started:.0f} s)\n")
    if args.keep:
        print(f"\nStep logs kept in {tmp}")
    print(report(results, args))


if __name__ == "__main__":
    main()

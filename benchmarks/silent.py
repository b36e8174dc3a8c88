"""A silent node and a killed node -> next committed step: ray_elastic vs Ray Train TorchTrainer vs torchrun.

The same small DDP MLP as `recovery.py` (gloo, CPU, OMP_NUM_THREADS=1, 20 ms sleep a
step), 3 workers. Faults, timed from the outside through the workloads' step logs
(kill -> the first step by a process/round that did not exist before, as in recovery.py):

- freeze: SIGSTOP the raylet of the node that runs rank 1 and every process under it
  (`LocalCluster.freeze_node`): no connection is reset, as in a partition or a hung host.
  torchrun has no nodes here (`--standalone`, one machine): its rank-1 process is
  SIGSTOPped, the same silence seen from its peers. The frozen node is thawed after
  the measurement; ray_elastic's stale worker must then die (fenced, Ray's kill).
- kill_node: `LocalCluster.kill_node(node, graceful=False)`: the raylet and every process
  of the node SIGKILLed, connections reset (ray_elastic only).

ray_elastic runs with its defaults (probe_timeout_s=2, heartbeat_interval_s=0.5) on 3
simulated nodes × 1 CPU, min_nodes=2, max_nodes=3; Ray Train on 4 nodes with 3 workers
(a spare node to restart on), checkpointing every step through `ray.train.report`, with
RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=--ray-train-poll-s (favours it). A system that has not
recovered within --timeout is recorded as "> timeout" (a lower bound) and started afresh.

    pip install "ray[train]"    # the bench extra
    .venv/bin/python benchmarks/silent.py
    .venv/bin/python benchmarks/silent.py --quick
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
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
from launchers import ElasticLauncher, RayTrainLauncher, TorchrunStandalone  # noqa: E402
from recovery import STEADY_STEPS, KillResult, measure  # noqa: E402

WORKERS = 3
VICTIM_RANK = 1


def _node_of_pid(cluster: Any, pid: int) -> Any:
    return next((n for n in cluster.nodes if pid in {p.pid for p in cluster.processes_of(n)}), None)


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def one_fault(launcher: Any, logs: StepLogs, fault: str, timeout_s: float) -> tuple[KillResult, str]:
    """Inject one fault on rank 1's node (or process) and measure; restore the cluster; (result, extra note)."""
    member = logs.members()[VICTIM_RANK]
    cluster = getattr(launcher, "cluster", None)
    node = _node_of_pid(cluster, member.pid) if cluster is not None else None
    note = ""

    def inject() -> None:
        if fault == "kill_node":
            cluster.kill_node(node, graceful=False)
        elif node is not None:
            cluster.freeze_node(node)
        else:  # torchrun: one process
            os.kill(member.pid, signal.SIGSTOP)

    world = WORKERS - 1 if isinstance(launcher, ElasticLauncher) else WORKERS
    result = measure(logs, launcher, f"{fault} (rank {VICTIM_RANK})", inject, world, timeout_s)
    result.full_world_s = None
    if fault == "freeze":
        woken = time.time()
        if node is not None:
            cluster.thaw_node(node)
        else:
            os.kill(member.pid, signal.SIGCONT)
        if isinstance(launcher, ElasticLauncher):
            died = wait_until(lambda: _gone(member.pid), 20)
            late = [r for r in logs.records() if r.pid == member.pid and r.wall > woken]
            note = (f"woken worker {'gone' if died else 'STILL ALIVE'} {time.time() - woken:.1f}s after thaw; "
                    f"{len(late)} step(s) logged by it after waking")
    if cluster is not None and node is not None:
        if node in cluster.nodes:
            cluster.kill_node(node, graceful=False)
        cluster.add_node()
    return result, note


def run_system(make: Any, faults: list[str], args: argparse.Namespace, root: Path) -> list[KillResult]:
    """Faults in order; a launch that does not recover is closed and a fresh one takes the next fault."""
    results: list[KillResult] = []
    attempt = 0
    while len(results) < len(faults):
        attempt += 1
        launcher = make()
        log_dir = root / f"{launcher.name.split()[0]}-{attempt}"
        log_dir.mkdir()
        log(f"{launcher.name}: starting (attempt {attempt})")
        try:
            launcher.start(log_dir)
            logs = StepLogs(log_dir)
            while len(results) < len(faults):
                if not wait_until(lambda logs=logs: logs.steady(WORKERS, STEADY_STEPS), args.timeout,
                                  alive=launcher.alive):
                    results.append(KillResult(launcher.name, faults[len(results)], False,
                                              note="never steady at full size"))
                    break
                result, note = one_fault(launcher, logs, faults[len(results)], args.timeout)
                result.note = "; ".join(n for n in (result.note, note) if n)
                log(f"{launcher.name}: {result}")
                results.append(result)
                if not result.recovered:
                    break
            else:
                logs.write_stop_at(logs.max_step() + 10)
                log(f"{launcher.name}: {launcher.finish(args.timeout)}")
        finally:
            launcher.close()
    return results


def report(results: list[KillResult], args: argparse.Namespace) -> str:
    groups: dict[tuple[str, str], list[KillResult]] = {}
    for r in results:
        groups.setdefault((r.system, r.what.split()[0]), []).append(r)
    rows = []
    for (system, fault), rs in groups.items():
        rec = [r.recovery_s for r in rs if r.recovered and r.recovery_s is not None]
        failed = len(rs) - len(rec)
        if not rec:
            shown_median = f"> {args.timeout:g} (lower bound)"
        else:
            shown_median = fmt_s(median(rec), 3) + (f" ({failed} > {args.timeout:g})" if failed else "")
        rows.append([system, fault, len(rs), failed, shown_median, fmt_s(max(rec) if rec else None, 3),
                     fmt_s(median([r.redone for r in rs if r.redone is not None]), 1)])
    out = [f"Workers: {WORKERS}; fault on rank {VICTIM_RANK}'s node; recovery limit {args.timeout:g}s.", "",
           table(["system", "fault", "faults", "not recovered in the limit", "next committed step, median (s)",
                  "max (s)", "steps redone, median"], rows)]
    elastic = {f: [r.recovery_s for r in rs if r.recovered and r.recovery_s is not None]
               for (s, f), rs in groups.items() if s == "ray_elastic"}
    if elastic.get("freeze"):
        out.append(f"\nTargets, ray_elastic: silent node median {median(elastic['freeze']):.3f}s (≤ 3 s), "
                   f"killed node median {median(elastic.get('kill_node') or [float('nan')]):.3f}s (≤ 0.5 s).")
    rows = [[r.system, r.what, "yes" if r.recovered else "NO", fmt_s(r.recovery_s, 3),
             "—" if r.redone is None else str(r.redone), r.note] for r in results]
    out += ["", "<details><summary>every fault</summary>", "",
            table(["system", "fault", "recovered", "next committed step (s)", "redone", "note"], rows),
            "", "</details>"]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--freezes", type=int, default=5, help="ray_elastic silent nodes (default 5)")
    parser.add_argument("--node-kills", type=int, default=5, help="ray_elastic killed nodes (default 5)")
    parser.add_argument("--baseline-freezes", type=int, default=1, help="per baseline (default 1)")
    parser.add_argument("--timeout", type=float, default=90.0, help="recovery limit per fault (s)")
    parser.add_argument("--sleep-s", type=float, default=0.02)
    parser.add_argument("--ray-train-poll-s", type=float, default=0.2)
    parser.add_argument("--systems", default="ray_elastic,ray_train,torchrun")
    parser.add_argument("--quick", action="store_true", help="2 + 2 faults for ray_elastic, 1 per baseline, 60 s")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.freezes, args.node_kills, args.baseline_freezes, args.timeout = 2, 2, 1, 60.0
    exit_on_sigterm()
    tune_ray_train(args.ray_train_poll_s)
    # A run left stuck in its thread must not reconnect to the cluster being shut down under it.
    os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"
    header = machine_line()
    started = time.monotonic()
    restarts = args.freezes + args.node_kills + 2
    results: list[KillResult] = []
    with workdir("ray_elastic-silent-", args.keep) as tmp:
        root = Path(tmp)
        makers = {
            "ray_elastic": (lambda: ElasticLauncher(WORKERS, WORKERS - 1, WORKERS, restarts, args.sleep_s,
                                                    1_000_000),
                            ["freeze"] * args.freezes + ["kill_node"] * args.node_kills),
            "ray_train": (lambda: RayTrainLauncher(WORKERS + 1, WORKERS, restarts, args.sleep_s, 1_000_000,
                                                   root / "ray-train-storage"),
                          ["freeze"] * args.baseline_freezes),
            "torchrun": (lambda: TorchrunStandalone(WORKERS, restarts, args.sleep_s, 1_000_000,
                                                    root / "torchrun-ckpt.pt"),
                         ["freeze"] * args.baseline_freezes),
        }
        for key in args.systems.split(","):
            make, faults = makers[key]
            results += run_system(make, faults, args, root)
    print(f"## Silent and killed nodes\n\n{header}\n\n`{' '.join(['python', *sys.argv])}` "
          f"({time.monotonic() - started:.0f} s)\n")
    print(report(results, args))


if __name__ == "__main__":
    main()

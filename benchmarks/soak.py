"""Soak: one long run with max_restarts=-1 and a random fault every U(10, 40) s (docs RELIABILITY.md).

Faults are drawn (seeded, so a run can be replayed) from the matrix rows 1-5 and 10:
`raise` (train_fn raises on a random rank), `sigkill` / `sigstop` (a random worker
process, from outside), `node_crash` (a simulated node removed ungracefully, only while
more than min_nodes remain), `node_join` (a node added, only below max_nodes) and
`coordinator` (the coordinator actor killed; the run is started again with
resume=True and continues from its durable checkpoint). Each fault is injected only
once the run is steady again (every node in the round, a step committed since).

Reported per fault kind: detection (fault -> the coordinator knows: `worker_lost`,
`node_ready`, or run() raising CoordinatorLostError) and recovery (fault -> the first
step committed by a new round or process), p50/p95/max, and steps redone (committed
twice). Sampled over time: the coordinator's RSS and open files, live ray_elastic actors
and placement groups. At the end the four checks of every row: (a) every step committed
exactly once in order, (b) identical weights, (c) one restart per failure injected,
(d) nothing left behind.

    .venv/bin/python benchmarks/soak.py --minutes 20 --seed 1
    .venv/bin/python benchmarks/soak.py --minutes 2 --seed 7 --json /tmp/soak.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]

import ray  # noqa: E402
from _common import connect, exit_on_sigterm, fmt_s, log, machine_line, table, wait_until, workdir  # noqa: E402

import ray_elastic  # noqa: E402
from ray_elastic.api import coordinator_name  # noqa: E402
from ray_elastic.testing import FaultInjector, local_cluster, request_fault  # noqa: E402
from ray_elastic.testing.cluster import WORKER_NODE_RESOURCE  # noqa: E402
from ray_elastic.testing.leaks import _titled_processes, find_leaks, live_run_actors, live_run_placement_groups  # noqa: E402
from tests.faults.matrix import Trace, read_events  # noqa: E402
from tests.workloads import ddp_train  # noqa: E402

ROWS = {"raise": 1, "sigkill": 2, "sigstop": 3, "node_crash": 4, "node_join": 5, "coordinator": 10}
FAILURES = {"raise", "sigkill", "sigstop", "node_crash"}  # each must cost exactly one restart
DETECTED_BY = {"node_join": "node_ready"}  # the others: worker_lost (coordinator: run() raising)


@dataclass
class Injection:
    kind: str
    at: float  # wall time of the fault
    detail: str
    detection_s: float | None = None
    recovery_s: float | None = None
    redone: int = 0


class Trainer:
    """`ray_elastic.run(..., resume=True)` in a thread, started again whenever its coordinator is lost."""

    def __init__(self, **kwargs: Any):
        self.kwargs = kwargs
        self.lost_at: list[float] = []
        self.attempt_started = time.time()  # events before this belong to a lost coordinator
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._target, daemon=True)
        self.thread.start()

    def _target(self) -> None:
        while True:
            self.attempt_started = time.time()
            try:
                self.result = ray_elastic.run(ddp_train, resume=True, **self.kwargs)
                return
            except ray_elastic.CoordinatorLostError:
                self.lost_at.append(time.time())
            except ray_elastic.ConfigError as exc:  # the lost coordinator's name is not released yet
                if "already running" not in str(exc):
                    self.error = exc
                    return
                time.sleep(0.5)
            except BaseException as exc:  # noqa: BLE001 - reported at the end
                self.error = exc
                return


class Soak:
    def __init__(self, args: argparse.Namespace, cluster: Any, root: Path):
        self.args, self.cluster = args, cluster
        self.rng = random.Random(args.seed)
        self.trace = Trace(root / "trace")
        self.events_path = root / "events.jsonl"
        self.triggers = root / "triggers"
        self.triggers.mkdir()
        self.name = f"soak-{args.seed}-{os.getpid()}"
        self.samples: list[dict[str, Any]] = []
        self.worker_pids: set[int] = set()
        self.last_fault_at = 0.0
        self._sampling = threading.Event()
        faults = FaultInjector(log_path=self.trace.faults_log, trigger_dir=str(self.triggers))
        self.trainer = Trainer(
            config={"steps": 10**9, "sleep_s": args.sleep_s, "trace_dir": str(self.trace.dir), "faults": faults},
            name=self.name, min_nodes=args.min_nodes, max_nodes=args.nodes, max_restarts=-1,
            hang_timeout_s=args.hang_timeout_s, storage_path=str(root / "storage"), checkpoint_every=20,
            event_log_path=str(self.events_path), progress="none",
        )

    # -- state of the run ----------------------------------------------------------------------------------
    def alive_nodes(self) -> int:
        return sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get(WORKER_NODE_RESOURCE))

    def steady(self) -> dict[str, Any] | None:
        """The current round once every alive node is in it and it went past every step committed before; else None."""
        events = [e for e in read_events(self.events_path) if e["kind"] in ("round_formed", "worker_lost", "scale_up")
                  and e["time"] >= self.trainer.attempt_started]
        if not self.trainer.thread.is_alive() or not events or events[-1]["kind"] != "round_formed":
            return None
        formed = events[-1]
        if formed["data"]["world_size"] != self.alive_nodes():  # one worker per node
            return None
        commits = self.trace.commits()
        if not commits or commits[-1].wall <= max(formed["time"], self.last_fault_at):
            return None  # (a hang stops commits before the coordinator can see it)
        done_before = max((c.step for c in commits if c.wall <= formed["time"]), default=0)
        return formed if commits[-1].step > done_before else None

    def workers(self) -> list[int]:
        pids = [p for p in _titled_processes(self.cluster.raylet_pids()) if _is_running_worker(p)]
        self.worker_pids.update(pids)
        return pids

    # -- faults ------------------------------------------------------------------------------------------------
    def eligible(self) -> list[str]:
        kinds = ["raise", "sigkill", "sigstop", "coordinator"]
        if len(self.cluster.nodes) > self.args.min_nodes:
            kinds.append("node_crash")
        if len(self.cluster.nodes) < self.args.nodes:
            kinds.append("node_join")
        return [k for k in kinds if k in self.args.faults] or ["raise"]

    def inject(self, formed: dict[str, Any]) -> Injection:
        kind = self.rng.choice(self.eligible())
        if kind == "raise":
            rank = self.rng.randrange(formed["data"]["world_size"])
            requested = time.time()
            request_fault(str(self.triggers), "raise", rank)
            fired = wait_until(lambda: [f for f in self.trace.fired() if f.wall >= requested], 30)
            return Injection(kind, fired[0].wall if fired else requested, f"rank {rank}")
        if kind in ("sigkill", "sigstop"):
            pid = self.rng.choice(sorted(self.workers()))
            at = time.time()
            os.kill(pid, signal.SIGKILL if kind == "sigkill" else signal.SIGSTOP)
            return Injection(kind, at, f"pid {pid}")
        if kind == "node_crash":
            node = self.rng.choice(self.cluster.nodes)
            at = time.time()
            self.cluster.kill_node(node, graceful=False)
            return Injection(kind, at, f"node {node.node_id[:8]}")
        if kind == "node_join":
            at = time.time()
            node = self.cluster.add_node()
            return Injection(kind, at, f"node {node.node_id[:8]}")
        at = time.time()
        ray.kill(ray.get_actor(coordinator_name(self.name)), no_restart=True)
        return Injection(kind, at, self.name)

    # -- sampling ----------------------------------------------------------------------------------------------
    def _sample_loop(self) -> None:
        while not self._sampling.wait(self.args.sample_s):
            sample: dict[str, Any] = {"time": time.time(), "actors": len(live_run_actors()),
                                      "placement_groups": len(live_run_placement_groups())}
            for pid in _titled_processes(self.cluster.raylet_pids()):
                try:
                    proc = psutil.Process(pid)
                    if " ".join(proc.cmdline()).startswith("ray::Coordinator"):
                        sample.update(coordinator_pid=pid, rss_mb=proc.memory_info().rss / 2**20,
                                      open_files=proc.num_fds())
                except psutil.Error:
                    continue
            self.workers()
            self.samples.append(sample)

    def run(self) -> list[Injection]:
        sampler = threading.Thread(target=self._sample_loop, daemon=True)
        sampler.start()
        deadline = time.monotonic() + self.args.minutes * 60
        injections: list[Injection] = []
        while True:
            pause = self.rng.uniform(*self.args.interval)
            if time.monotonic() + pause >= deadline:
                break
            time.sleep(pause)
            formed = wait_until(self.steady, 180, poll_s=0.2)
            if formed is None:
                log(f"not steady within 180 s (trainer error: {self.trainer.error!r}); stopping the faults")
                break
            injections.append(self.inject(formed))
            self.last_fault_at = injections[-1].at + 1.0  # a step in flight may still commit just after it
            log(f"injected {injections[-1].kind} ({injections[-1].detail})")
        if wait_until(self.steady, 180, poll_s=0.2) is not None:
            self.trace.stop_at(max(c.step for c in self.trace.commits()) + 20)
        self.trainer.thread.join(300)
        self._sampling.set()
        sampler.join()
        return injections


def _is_running_worker(pid: int) -> bool:
    try:
        proc = psutil.Process(pid)
        return " ".join(proc.cmdline()).startswith("ray::ElasticWorker") and proc.status() != psutil.STATUS_STOPPED
    except psutil.Error:
        return False


def measure(soak: Soak, injections: list[Injection]) -> None:
    """Fill each injection's detection, recovery and redone steps from the events, trace and driver."""
    events = read_events(soak.events_path)
    commits = soak.trace.commits()
    ends = [i.at for i in injections[1:]] + [float("inf")]
    committed: set[int] = set()
    redo_times = []  # when a step was committed again
    for commit in commits:
        if commit.step in committed:
            redo_times.append(commit.wall)
        committed.add(commit.step)
    for injection, end in zip(injections, ends):
        if injection.kind == "coordinator":
            seen = [t for t in soak.trainer.lost_at if injection.at <= t < end]
        else:
            kind = DETECTED_BY.get(injection.kind, "worker_lost")
            seen = [e["time"] for e in events if e["kind"] == kind and injection.at <= e["time"] < end]
        injection.detection_s = seen[0] - injection.at if seen else None
        before = [c for c in commits if c.wall <= injection.at]
        after = [c for c in commits if injection.at < c.wall < end]
        last = (before[-1].pid, before[-1].round_id) if before else None
        recovered = next((c for c in after if (c.pid, c.round_id) != last), None)
        injection.recovery_s = recovered.wall - injection.at if recovered else None
        injection.redone = sum(1 for t in redo_times if injection.at < t < end)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..1)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else None


def checks(soak: Soak, injections: list[Injection]) -> dict[str, str]:
    result, out = soak.trainer.result, {}
    if result is None:
        return {"run": f"FAIL: did not finish ({soak.trainer.error!r})"}
    steps = max(c.step for c in soak.trace.commits())
    logs_ok = all(v["log"] == list(range(1, steps + 1)) for v in result.return_values)
    out["(a) every step exactly once, in order"] = "pass" if logs_ok else "FAIL"
    same = all(v["weights"] == result.return_values[0]["weights"] for v in result.return_values)
    out["(b) identical weights on all ranks"] = "pass" if same else "FAIL"
    restarts = sum(1 for e in read_events(soak.events_path) if e["kind"] == "restart")
    failures = sum(1 for i in injections if i.kind in FAILURES)
    out["(c) one restart per failure"] = f"{'pass' if restarts == failures else 'FAIL'}: {restarts} for {failures}"
    soak.worker_pids.update(result.worker_pids)
    leaks = find_leaks(sorted(soak.worker_pids), 15, soak.cluster.raylet_pids(), ports=soak.trace.ports())
    out["(d) nothing left behind"] = "pass" if not leaks else f"FAIL: {', '.join(leaks)}"
    return out


def report(soak: Soak, injections: list[Injection], verdicts: dict[str, str]) -> str:
    rows = []
    for kind, row in ROWS.items():
        done = [i for i in injections if i.kind == kind]
        det = [i.detection_s for i in done if i.detection_s is not None]
        rec = [i.recovery_s for i in done if i.recovery_s is not None]
        rows.append([kind, row, len(done), *(fmt_s(percentile(det, q)) for q in (0.5, 0.95, 1.0)),
                     *(fmt_s(percentile(rec, q)) for q in (0.5, 0.95, 1.0)), sum(i.redone for i in done)])
    faults = table(["fault", "row", "n", "detect p50", "p95", "max", "recover p50", "p95", "max", "steps redone"],
                   rows)
    samples = soak.samples
    picks = sorted({round(f * (len(samples) - 1)) for f in (0, 0.25, 0.5, 0.75, 1)}) if samples else []
    start = samples[0]["time"] if samples else 0.0
    over_time = table(
        ["t (s)", "coordinator pid", "RSS (MB)", "open files", "live actors", "placement groups"],
        [[f"{samples[i]['time'] - start:.0f}", samples[i].get("coordinator_pid", "—"),
          fmt_s(samples[i].get("rss_mb"), 1), samples[i].get("open_files", "—"), samples[i]["actors"],
          samples[i]["placement_groups"]] for i in picks],
    )
    peak = {k: max((s.get(k, 0) for s in samples), default=0) for k in ("rss_mb", "open_files", "actors")}
    verdict = table(["check", "result"], verdicts.items())
    return (f"{faults}\n\nCoordinator and cluster over time (peaks: RSS {peak['rss_mb']:.1f} MB, "
            f"{peak['open_files']} open files, {peak['actors']} actors):\n\n{over_time}\n\n{verdict}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--nodes", type=int, default=4, help="simulated nodes, and max_nodes (default 4)")
    parser.add_argument("--min-nodes", type=int, default=2)
    parser.add_argument("--interval", type=float, nargs=2, default=(10.0, 40.0), metavar=("LOW", "HIGH"),
                        help="seconds between faults, uniform (default 10 40)")
    parser.add_argument("--faults", type=lambda text: text.split(","), default=list(ROWS),
                        help=f"comma-separated kinds to draw from (default: all of {','.join(ROWS)})")
    parser.add_argument("--hang-timeout-s", type=float, default=10.0)
    parser.add_argument("--sleep-s", type=float, default=0.05, help="sleep per training step")
    parser.add_argument("--sample-s", type=float, default=5.0, help="resource sampling period")
    parser.add_argument("--json", type=Path, help="also write every injection and sample here")
    parser.add_argument("--keep", action="store_true", help="keep the trace, events and checkpoints")
    args = parser.parse_args()
    exit_on_sigterm()
    header, started = machine_line(), time.monotonic()
    with workdir("ray_elastic-soak-", args.keep) as tmp, local_cluster(args.nodes, connect=False) as cluster:
        connect(cluster, args.nodes)
        soak = Soak(args, cluster, Path(tmp))
        injections = soak.run()
        measure(soak, injections)
        verdicts = checks(soak, injections)
        text = report(soak, injections, verdicts)
        if args.json:
            args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                             "injections": [asdict(i) for i in injections],
                                             "samples": soak.samples, "checks": verdicts}, indent=1))
    print(f"## Soak\n\n{header}\n\n`{' '.join(['python', *sys.argv])}` ({time.monotonic() - started:.0f} s, "
          f"{len(injections)} faults)\n\n{text}")
    if args.keep:
        print(f"Trace, events and checkpoints kept in {tmp}")
    sys.exit(0 if all(v.startswith("pass") for v in verdicts.values()) else 1)


if __name__ == "__main__":
    main()

"""Coordinator scale: the controller's own cost at 1,024 workers, with the fake worker group (no Ray).

The real `Controller` is driven by `ray_elastic.testing.fake_group.FakeWorkerGroup`
on a fake clock, so every figure is CPU time spent deciding (controller, policies
and the fake group's bookkeeping, which is O(N) and small), not waiting:

- form: all nodes ready -> `start_round` issued (WAITING -> FORMING -> RUNNING);
- running step: one controller step while every member is probed and reports a
  metric (as every rank calling `ray_elastic.report` does), median over the run;
- storm: 10% of the workers lost at once -> the next round's `start_round`, which
  must be ONE restart. "nodes": whole nodes removed; "scattered": single worker
  processes die on as many nodes as possible (those nodes re-form without them).

It also times two per-worker lookups outside the controller that grow with N on
every probe/start: `RayWorkerGroup._slot` (a linear scan, called once per member)
and `RoundPlan.assignments()`.

    .venv/bin/python benchmarks/coordinator_scale.py            # 128 x 8 and 1024 x 1
    .venv/bin/python benchmarks/coordinator_scale.py --repeat 5 --layouts 128x8 1024x1 16x64
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_line, table  # noqa: E402

from ray_elastic.config import RunConfig  # noqa: E402
from ray_elastic.coordinator.controller import Controller, Running  # noqa: E402
from ray_elastic.events import EventLog  # noqa: E402
from ray_elastic.testing.fake_group import FakeWorkerGroup  # noqa: E402

TARGET_S = 1.0


def _controller(nodes: int, nproc: int) -> tuple[Controller, FakeWorkerGroup]:
    group = FakeWorkerGroup(nproc_per_node=nproc)
    for _ in range(nodes):
        group.add_node()
    config = RunConfig(run_id="scale", min_nodes=1, max_nodes=nodes, nproc_per_node=nproc, max_restarts=-1)
    return Controller(config, group, EventLog("scale"), clock=group.clock, poll_s=0.05), group


def _step_until(controller: Controller, done: Callable[[], bool], limit: int = 100_000) -> int:
    for steps in range(limit):
        if done():
            return steps
        controller.step()
    raise RuntimeError(f"not reached in {limit} steps; state {controller.state}")


class Timer:
    """Wall and CPU time (this process) of a block: the CPU figure is what load from others cannot inflate."""

    def __enter__(self) -> Timer:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def measure(nodes: int, nproc: int, storm: str, seed: int) -> dict[str, float]:
    """One run: form, a stretch of running with reports, a 10% failure storm, the next round."""
    controller, group = _controller(nodes, nproc)
    with Timer() as form:
        _step_until(controller, lambda: len(group.plans) == 1)

    members = list(group.members)
    step_times, step_cpu = [], []
    for step in range(1, 41):  # 2 simulated seconds: 4 probe rounds of every member
        for worker_id in members:
            group.progress(worker_id, step=step, metrics={"step": step, "loss": 1.0 / step})
        with Timer() as one:
            controller.step()
        step_times.append(one.wall)
        step_cpu.append(one.cpu)
    assert isinstance(controller.state, Running), controller.state

    rng = random.Random(seed)
    tenth = max(1, round(len(members) * 0.10))
    if storm == "nodes":
        doomed_nodes = rng.sample(sorted(group.nodes), max(1, round(tenth / nproc)))
        lost = len(doomed_nodes) * nproc
    else:  # one worker on each of `tenth` nodes where there are that many nodes
        hit = rng.sample(sorted(group.nodes), min(tenth, nodes))
        doomed = [group.nodes[n][rng.randrange(nproc)].worker_id for n in hit]
        doomed += rng.sample(sorted(set(members) - set(doomed)), tenth - len(doomed))
        lost = len(doomed)
    with Timer() as recovery:
        if storm == "nodes":
            for node_id in doomed_nodes:
                group.remove_node(node_id)
        else:
            for worker_id in doomed:
                group.die(worker_id)
        steps = _step_until(controller, lambda: len(group.plans) == 2)
    if controller.restarts != 1:
        raise RuntimeError(f"a {storm} storm cost {controller.restarts} restarts, expected exactly 1")
    return {
        "form_s": form.wall,
        "form_cpu_s": form.cpu,
        "step_ms": statistics.median(step_times) * 1e3,
        "probe_step_ms": max(step_cpu) * 1e3,
        "storm_s": recovery.wall,
        "storm_cpu_s": recovery.cpu,
        "storm_steps": steps,
        "lost": lost,
        "causes": len(controller.failures),
        "next_world": group.plans[1].world_size,
    }


def lookup_costs(nodes: int, nproc: int) -> dict[str, float]:
    """Time per-worker lookups outside the controller: `RayWorkerGroup._slot` and `RoundPlan.assignments()`."""
    from ray_elastic.coordinator.ray_group import RayWorkerGroup, _Node, _Slot  # imports ray; starts nothing

    group = RayWorkerGroup.__new__(RayWorkerGroup)  # only the lookup tables are used
    group.nodes = {}
    for n in range(nodes):
        node_id = f"node-{n:05d}"
        slots: list[_Slot | None] = [_Slot(f"{node_id}-{i}", i, None, None) for i in range(nproc)]
        group.nodes[node_id] = _Node(node_id, None, None, placed=True, slots=slots)  # type: ignore[arg-type]
    group._slots = {s.worker_id: s for node in group.nodes.values() for s in node.slots if s is not None}
    workers = list(group._slots)
    with Timer() as slots:
        for worker_id in workers:  # what one probe round / start_round / request_stop does
            group._slot(worker_id)

    controller, fake = _controller(nodes, nproc)
    _step_until(controller, lambda: len(fake.plans) == 1)
    with Timer() as assignments:
        fake.plans[0].assignments()
    return {"slot": slots.wall, "slot_cpu": slots.cpu, "assign": assignments.wall, "assign_cpu": assignments.cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", nargs="+", default=["128x8", "1024x1"], help="NODESxNPROC, e.g. 128x8")
    parser.add_argument("--repeat", type=int, default=3, help="runs per row; the median is shown")
    args = parser.parse_args()
    logging.getLogger("ray_elastic").setLevel(logging.WARNING)  # 1,000+ node_ready lines are not the point

    rows, lookups = [], []
    worst = 0.0
    for layout in args.layouts:
        nodes, nproc = (int(x) for x in layout.split("x"))
        for storm in ("nodes", "scattered"):
            runs = [measure(nodes, nproc, storm, seed) for seed in range(args.repeat)]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            worst = max(worst, med["form_s"], med["storm_s"])
            rows.append([
                f"{nodes} x {nproc}", nodes * nproc, f"{med['form_s'] * 1e3:.1f} ({med['form_cpu_s'] * 1e3:.1f})",
                f"{med['step_ms']:.2f}", f"{med['probe_step_ms']:.2f}", storm,
                f"{int(med['lost'])} -> {int(med['causes'])}",
                f"{med['storm_s'] * 1e3:.1f} ({med['storm_cpu_s'] * 1e3:.1f})",
                f"{int(med['storm_steps'])}", "1", int(med["next_world"]),
            ])
        costs = lookup_costs(nodes, nproc)
        lookups.append([f"{nodes} x {nproc}", f"{costs['slot'] * 1e3:.1f} ({costs['slot_cpu'] * 1e3:.1f})",
                        f"{costs['assign'] * 1e3:.1f} ({costs['assign_cpu'] * 1e3:.1f})"])

    print(f"Coordinator scale ({machine_line()}); median of {args.repeat} run(s) per row.\n")
    print(table(
        ["nodes x nproc", "workers", "form, ms wall (cpu)", "running step (ms)", "step with probes (ms cpu, max)",
         "storm", "workers lost -> blamed", "storm -> next round, ms wall (cpu)", "steps", "restarts", "next world"],
        rows,
    ))
    print()
    print(table(["nodes x nproc", "RayWorkerGroup._slot for every member, ms wall (cpu)",
                 "RoundPlan.assignments(), ms wall (cpu)"], lookups))
    verdict = "within" if worst <= TARGET_S else "OVER"
    print(f"\nslowest median form or storm: {worst * 1e3:.1f} ms wall ({verdict} the {TARGET_S:g} s target)")


if __name__ == "__main__":
    main()

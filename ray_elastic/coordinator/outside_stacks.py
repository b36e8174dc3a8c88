"""Stacks of workers whose Python cannot answer, read from outside the process with py-spy.

A worker answers `stacks()` from its own Python, so one inside a C call that holds
the GIL (or blocked on a lock with the GIL taken) answers nothing. Its native pulse
still says it is alive; then a task on its node runs `py-spy dump --native` on its
pid, and the thread holding the GIL is what keeps it there. py-spy needs ptrace
rights on that node (root, CAP_SYS_PTRACE, or kernel.yama.ptrace_scope=0);
without them the note says why there is no stack.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ray_elastic.coordinator.types import StackReport
from ray_elastic.diagnostics import gil_holder, py_spy_dump

# How long a read from outside may take: a task's worker process starts on the node (no torch), then py-spy.
OUTSIDE_READ_S = 5.0


@ray.remote(num_cpus=0, max_retries=0)
def _dump_on_node(pid: int) -> tuple[str, str]:
    stack, note = py_spy_dump(pid, native=True, who=f"worker pid {pid}")
    if not stack:
        return "", note
    held = gil_holder(stack)
    what = "the thread holding the GIL" if held != stack else "every thread (none held the GIL)"
    return held, f"its Python did not answer: read from outside by py-spy on its node (pid {pid}), {what}"


def read_from_outside(targets: dict[str, tuple[str, int]], round_id: int,
                      timeout_s: float = OUTSIDE_READ_S) -> dict[str, StackReport]:
    """Stacks of workers given as worker id -> (node id, pid), read by py-spy on their nodes, that came within
    `timeout_s`; each holds the thread that has the GIL (every thread if none has)."""
    refs: dict[Any, tuple[str, int]] = {}
    for worker_id, (node_id, pid) in targets.items():
        if pid > 0 and node_id:
            on_node = NodeAffinitySchedulingStrategy(node_id, soft=False)
            refs[_dump_on_node.options(scheduling_strategy=on_node).remote(pid)] = (worker_id, pid)
    if not refs:
        return {}
    done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    reports = {}
    for ref in done:
        worker_id, pid = refs[ref]
        try:
            stack, note = ray.get(ref)
        except ray.exceptions.RayError as exc:
            stack, note = "", f"py-spy on its node failed: {str(exc).splitlines()[0][:200]}"
        reports[worker_id] = StackReport(worker_id, round_id, pid, stack, note=note)
    return reports

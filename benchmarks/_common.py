"""Shared helpers of the benchmarks: step logs, subprocess groups, runs in a thread, tables."""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TORCHRUN_SCRIPT = HERE / "workloads" / "torchrun_train.py"
LOOPBACK = "127.0.0.1"


# -- step logs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Record:
    """One line of a workload's step log (see workloads/loops.py)."""

    kind: str  # "enter" | "step"
    step: int
    wall: float
    rank: int
    world: int
    incarnation: str
    pid: int
    extra: str

    @property
    def key(self) -> tuple[int, str]:
        """One process in one round (ray_elastic survivors keep their pid across rounds)."""
        return (self.pid, self.incarnation)

    @property
    def commit_ms(self) -> float:
        return float(self.extra) if self.kind == "step" else 0.0


class StepLogs:
    """Reads the workloads' step logs incrementally; all records, ordered by wall time."""

    def __init__(self, log_dir: Path):
        self.dir = log_dir
        self._offsets: dict[Path, int] = {}
        self._records: list[Record] = []

    def records(self) -> list[Record]:
        fresh = []
        for path in sorted(self.dir.glob("steps-*.log")):
            with open(path) as handle:
                handle.seek(self._offsets.get(path, 0))
                chunk = handle.read()
            complete = chunk[: chunk.rfind("\n") + 1]
            self._offsets[path] = self._offsets.get(path, 0) + len(complete)
            for line in complete.splitlines():
                parts = line.split()
                if len(parts) == 8:
                    kind, step, wall, rank, world, inc, pid, extra = parts
                    fresh.append(Record(kind, int(step), float(wall), int(rank), int(world), inc, int(pid), extra))
        if fresh:
            self._records = sorted(self._records + fresh, key=lambda r: r.wall)
        return self._records

    def members(self) -> dict[int, Record]:
        """The newest `enter` record per rank among those of the newest world size entered."""
        enters = [r for r in self.records() if r.kind == "enter"]
        if not enters:
            return {}
        newest: dict[int, Record] = {}
        for record in enters:
            newest[record.rank] = record
        world = enters[-1].world
        return {rank: r for rank, r in newest.items() if r.world == world and rank < world}

    def steady(self, world: int, min_steps: int) -> bool:
        """All `world` ranks entered at this world size and each logged `min_steps` steps since."""
        members = self.members()
        if sorted(members) != list(range(world)):
            return False
        counts = {r.key: 0 for r in members.values()}
        for record in self.records():
            if record.kind == "step" and record.key in counts:
                counts[record.key] += 1
        return all(n >= min_steps for n in counts.values())

    def max_step(self) -> int:
        return max((r.step for r in self.records() if r.kind == "step"), default=0)

    def write_stop_at(self, step: int) -> None:
        partial = self.dir / "stop_at.tmp"
        partial.write_text(str(step))
        os.replace(partial, self.dir / "stop_at")


def wait_until(predicate: Callable[[], Any], timeout_s: float, poll_s: float = 0.02,
               alive: Callable[[], bool] | None = None) -> Any:
    """Poll `predicate` until it returns a truthy value; None on timeout or when `alive()` turns False."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if alive is not None and not alive():
            return predicate() or None
        time.sleep(poll_s)
    return None


# -- processes ------------------------------------------------------------------------------------
class ProcessGroups:
    """Subprocesses each started in a new session, so that their whole tree can be killed at once."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, cmd: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                list(cmd), stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                start_new_session=True, cwd=HERE.parent,
            )
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes], grace_s: float = 3.0) -> None:
        """SIGTERM the process group, SIGKILL it after `grace_s`."""
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                continue
            break
        try:  # a group member may outlive its leader
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        for proc in self.procs:
            self.kill(proc)
        self.procs.clear()


def dump_stacks(root_pid: int, marker: str, wait_s: float = 1.0) -> None:
    """SIGUSR1 the descendants of `root_pid` whose command line has `marker` (the workload prints its stacks)."""
    import psutil

    try:
        children = psutil.Process(root_pid).children(recursive=True)
    except psutil.Error:
        return
    hit = False
    for child in children:
        try:
            if any(marker in part for part in child.cmdline()):
                child.send_signal(signal.SIGUSR1)
                hit = True
        except psutil.Error:
            continue
    if hit:
        time.sleep(wait_s)


def torchrun_cmd(*launcher_args: str, script_args: Iterable[str] = ()) -> list[str]:
    """`torchrun` from this interpreter's environment, on the benchmark workload script."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    return [torchrun, *launcher_args, str(TORCHRUN_SCRIPT), *script_args]


WORKER_ENV = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": LOOPBACK}
# The simulated clusters' processes (Ray Train's workers and ray_elastic's alike) inherit it from this one:
# a job runtime_env instead would start every Ray worker through Ray's setup process (~1.4 s more CPU each).
os.environ.update(WORKER_ENV)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so that `finally` blocks tear clusters and process groups down."""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


class InThread:
    """Call `fn()` in a daemon thread; keep its result or exception."""

    def __init__(self, fn: Callable[[], Any]):
        self.result: Any = None
        self.error: BaseException | None = None
        self._fn = fn
        self.thread = threading.Thread(target=self._target, daemon=True)
        self.thread.start()

    def _target(self) -> None:
        try:
            self.result = self._fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            self.error = exc

    def alive(self) -> bool:
        return self.thread.is_alive()

    def join(self, timeout_s: float) -> Any:
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            raise TimeoutError(f"still running after {timeout_s:g}s")
        if self.error is not None:
            raise self.error
        return self.result


# -- reporting ------------------------------------------------------------------------------------
def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fmt_s(value: float | None, digits: int = 2) -> str:
    return "—" if value is None or value != value else f"{value:.{digits}f}"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line() -> str:
    import ray
    import torch

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (
        f"{stamp}; {os.cpu_count()} cores, CPU only, gloo; torch {torch.__version__}, ray {ray.__version__}, "
        f"Python {platform.python_version()}; load average (1/5/15 min) {load}"
    )


class StealMeter:
    """Share of CPU time the hypervisor gave to other guests (Linux "steal") since this meter was made.

    On a shared virtual machine this is the noise no interleaving removes; a run
    with a high share measured a slower machine.
    """

    def __init__(self) -> None:
        self._start = self._read()

    @staticmethod
    def _read() -> tuple[int, int] | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])

    def percent(self) -> float | None:
        end = self._read()
        if self._start is None or end is None or end[1] == self._start[1]:
            return None
        return 100.0 * (end[0] - self._start[0]) / (end[1] - self._start[1])


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def connect(cluster: Any, num_nodes: int, timeout_s: float = 60.0) -> None:
    """Connect this driver to a `local_cluster(connect=False)`, quietly, and wait for its worker nodes."""
    import ray

    from ray_elastic.testing.cluster import WORKER_NODE_RESOURCE

    ray.init(address=cluster.address, log_to_driver=False)

    def alive_nodes() -> bool:
        nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get(WORKER_NODE_RESOURCE)]
        return len(nodes) >= num_nodes

    if not wait_until(alive_nodes, timeout_s, poll_s=0.1):
        raise TimeoutError(f"{num_nodes} simulated node(s) did not come up within {timeout_s:g}s")


def workdir(prefix: str, keep: bool) -> Any:
    """A temporary directory (context manager yielding its path); with `keep`, left in place."""
    import contextlib
    import tempfile

    if keep:
        return contextlib.nullcontext(tempfile.mkdtemp(prefix=prefix))
    return tempfile.TemporaryDirectory(prefix=prefix)


def tune_ray_train(poll_s: float) -> None:
    """Set Ray Train's controller poll (health check) interval; its controller inherits RAY_TRAIN_* variables.

    Each `ray.train.report` waits until the controller has consumed the previous one, and
    the controller polls workers every `RAY_TRAIN_HEALTH_CHECK_INTERVAL_S` (default 2 s): a
    report every step would throttle the loop to one step per poll. A short poll also makes
    Ray Train detect a dead worker sooner, so this favours the baseline.
    """
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(poll_s)

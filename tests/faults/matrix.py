"""Measuring one row of the fault matrix (docs RELIABILITY.md): traces, fault times and the checks.

`tests.workloads.ddp_train` with `config["trace_dir"]` makes rank 0 append one
line per committed step (`step wall_time pid round_id master_port`), every
rank one line per commit it took to a file of its process (`commits-<pid>.log`,
outside the State: check (a)), and a `FaultInjector(log_path=...)` one line per
fault fired. From these and the run's events (`worker_lost` = the coordinator
knows) a row's figures follow:

- detection: fault -> the first `worker_lost` event after it (its `detected` time);
- recovery: fault -> the first step committed in a later round;
- steps redone: trace lines minus distinct steps (a step committed twice).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

TRACE_FILE = "steps.log"


@dataclass(frozen=True)
class Commit:
    """One line of the trace: a step rank 0 committed."""

    step: int
    wall: float
    pid: int
    round_id: int
    master_port: int | None


@dataclass(frozen=True)
class FiredFault:
    """One line of a FaultInjector log."""

    kind: str
    rank: int
    step: int
    wall: float
    pid: int
    round_id: int


def _time_and_round(fault: float | FiredFault) -> tuple[float, int]:
    """When a fault fired, and the round it hit (-1 when only its time is known)."""
    return (fault.wall, fault.round_id) if isinstance(fault, FiredFault) else (fault, -1)


class Trace:
    """The committed-step trace of one run (see module docstring)."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def faults_log(self) -> str:
        """Where a FaultInjector of this run logs the faults it fires."""
        return str(self.dir / "faults.log")

    def commits(self) -> list[Commit]:
        path = self.dir / TRACE_FILE
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 5:
                step, wall, pid, round_id, port = parts
                master_port = int(port) if port.isdigit() else None
                out.append(Commit(int(step), float(wall), int(pid), int(round_id), master_port))
        return out

    def fired(self) -> list[FiredFault]:
        path = Path(self.faults_log)
        if not path.exists():
            return []
        rows = (line.split() for line in path.read_text().splitlines() if line.strip())
        return [FiredFault(k, int(r), int(s), float(w), int(p), int(i)) for k, r, s, w, p, i in rows]

    def wait_for_step(self, step: int, timeout_s: float = 120.0, alive: Any = None) -> Commit:
        """Block until rank 0 committed `step` (or later); `alive()` False ends the wait early."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            done = [c for c in self.commits() if c.step >= step]
            if done:
                return done[0]
            if alive is not None and not alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"step {step} was not committed within {timeout_s}s; trace: {self.commits()[-3:]}")

    def wait_for_round_commits(self, round_id: int, steps: int = 3, timeout_s: float = 90.0,
                               alive: Any = None) -> Commit:
        """Rank 0's commit after `steps` commits of round `round_id`: every rank has formed the round's group by
        then (a rank lost while a newcomer still connects its group is left behind only by the abort timeout)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            done = [c for c in self.commits() if c.round_id == round_id][steps - 1:]
            if done:
                return done[0]
            if alive is not None and not alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"round {round_id} did not commit {steps} steps within {timeout_s}s; "
                             f"trace: {self.commits()[-3:]}")

    def wait_for_commit_after(self, fault_time: float, timeout_s: float = 120.0, alive: Any = None) -> Commit:
        """Block until a step was committed in a round later than the one `fault_time` hit."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            commit = self.first_commit_after(fault_time)
            if commit is not None:
                return commit
            if alive is not None and not alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"nothing committed after the fault within {timeout_s}s; trace: {self.commits()[-3:]}")

    def stop_at(self, step: int) -> int:
        """Make the run end after `step` (ddp_train reads `stop_at` each step; keep it ahead of every rank)."""
        tmp = self.dir / "stop_at.tmp"
        tmp.write_text(str(step))
        os.replace(tmp, self.dir / "stop_at")
        return step

    def commits_by_process(self) -> dict[int, list[int]]:
        """The steps each worker process committed, in order (every rank's own log, kept outside the State)."""
        out = {}
        for path in sorted(self.dir.glob("commits-*.log")):
            out[int(path.stem.split("-")[1])] = [int(line.split()[0]) for line in path.read_text().splitlines()
                                                 if line.strip()]
        return out

    def check_committed(self, steps: int, every: int = 1) -> None:
        """Check (a) from outside the State: no process committed a step twice or went back to an
        earlier one (a committed step lost, restored from an older commit and redone), and the
        processes together committed every step from 1 to `steps` (every `every`-th) and none beyond."""
        by_process = self.commits_by_process()
        assert by_process, "no process logged a commit"
        for pid, log in by_process.items():
            assert all(b > a for a, b in zip(log, log[1:])), f"(a) process {pid} committed a step again: {log}"
        done = sorted({step for log in by_process.values() for step in log})
        assert done == list(range(every, steps + 1, every)), f"(a) steps committed by all processes: {done}"

    def redone(self) -> int:
        commits = self.commits()
        return len(commits) - len({c.step for c in commits})

    def describe_redone(self) -> str:
        """Each step committed more than once, with the process and round of each commit (for failure messages)."""
        commits = self.commits()
        counts = Counter(c.step for c in commits)
        twice = {step for step, count in counts.items() if count > 1}
        lines = [f"step {c.step} at {c.wall:.3f} by pid {c.pid} in round {c.round_id}"
                 for c in commits if c.step in twice]
        spans = {pid: f"{log[0]}..{log[-1]} ({len(log)})" for pid, log in self.commits_by_process().items() if log}
        return "\n".join(lines + [f"commits by process: {spans}"])

    def first_commit_after(self, fault: float | FiredFault) -> Commit | None:
        """The first step committed after a fault (its time, or a fired fault) in a round later than the one it hit.

        From a time alone, the round hit is the newest that committed before it; a fault in a round's first step
        comes before that round's first commit, so a fired fault, which knows its round, is the safer argument
        (the survivors of a rank killed between its step and its commit still commit that step in its round).
        """
        fault_time, fault_round = _time_and_round(fault)
        commits = self.commits()
        before = [c.round_id for c in commits if c.wall <= fault_time]
        fault_round = max([fault_round, *before])
        return next((c for c in commits if c.wall > fault_time and c.round_id > fault_round), None)

    def recovery_s(self, fault: float | FiredFault) -> float | None:
        commit = self.first_commit_after(fault)
        return None if commit is None else commit.wall - _time_and_round(fault)[0]

    def ports(self) -> set[int]:
        """Every store port (MASTER_PORT) the run's rounds used."""
        return {c.master_port for c in self.commits() if c.master_port is not None}

    def ports_by_round(self) -> dict[int, int]:
        return {c.round_id: c.master_port for c in self.commits() if c.master_port is not None}


def event_fields(event: Any) -> tuple[str, float, dict[str, Any], str]:
    """(kind, time, data, message) of an `Event` or of its JSON-lines form."""
    if isinstance(event, dict):
        return event["kind"], float(event["time"]), event.get("data", {}), event.get("message", "")
    return event.kind, float(event.time), event.data, event.message


def read_events(path: Path) -> list[dict[str, Any]]:
    """The events of a run's JSON-lines event log (`run(..., event_log_path=path)`)."""
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def detection_s(events: Iterable[Any], fault_time: float, kind: str = "worker_lost") -> float | None:
    """Fault -> the first `kind` event at or after it (the coordinator knows).

    A `worker_lost` line may wait a moment for the failure's cause; its `detected` field is when
    the coordinator first knew.
    """
    times = sorted(float(d.get("detected", t)) for k, t, d, _ in map(event_fields, events)
                   if k == kind and t >= fault_time)
    return times[0] - fault_time if times else None


def timeline(events: Iterable[Any], since: float) -> str:
    """The events from `since` on, one line each as `+seconds kind: message`, then the stacks of ranks killed
    for staying in an aborted round (for failure messages)."""
    lines = []
    for kind, t, data, message in map(event_fields, events):
        if t >= since:
            lines.append(f"+{t - since:.3f}s {kind}: {message}")
            lines += [f"  rank {rank}: {stack}" for rank, stack in (data.get("hung_stacks") or {}).items()]
    return "\n".join(lines)


def check_run(result: Any, steps: int, restarts: int, trace: Trace | None = None, every: int = 1) -> None:
    """Checks (a), (b) and (c) of every row; (d) is the `no_leaks` fixture.

    (a) is checked on the State's own log and, with `trace`, on every process's log kept outside it.
    """
    values = result.return_values
    assert [v["rank"] for v in values] == list(range(len(values)))
    for v in values:
        assert v["log"] == list(range(1, steps + 1)), "(a) every committed step exactly once, in order"
        assert v["weights"] == values[0]["weights"], "(b) all ranks end with identical weights"
    if trace is not None:
        trace.check_committed(steps, every)
    assert result.restarts == restarts, f"(c) restarts spent {result.restarts}, expected {restarts}"


class DeathWatch:
    """Notes when a process dies (or turns zombie), polling every few milliseconds in a thread."""

    def __init__(self, pid: int, poll_s: float = 0.005):
        self.pid = pid
        self.died_at: float | None = None
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        try:
            proc = psutil.Process(self.pid)
        except psutil.Error:
            self.died_at = time.time()
            return
        while not self._stop.is_set():
            try:
                if proc.status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.Error:
                break
            time.sleep(self._poll_s)
        else:
            return
        self.died_at = time.time()

    def wait(self, timeout_s: float) -> float | None:
        self._thread.join(timeout_s)
        self._stop.set()
        return self.died_at


class Decoys:
    """Listening TCP sockets on ephemeral ports that count the connections made to them (a thread accepts)."""

    def __init__(self, count: int):
        import socket

        self._socks = []
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("0.0.0.0", 0))
            sock.listen(16)
            sock.settimeout(0.1)
            self._socks.append(sock)
        self.ports = [s.getsockname()[1] for s in self._socks]
        self.accepted: dict[int, int] = dict.fromkeys(self.ports, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            for sock in self._socks:
                try:
                    conn, _ = sock.accept()
                except OSError:
                    continue
                self.accepted[sock.getsockname()[1]] += 1
                conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in self._socks:
            sock.close()


@contextlib.contextmanager
def decoy_ports(count: int) -> Any:
    """`Decoys(count)`, closed on exit: ports already taken, which nothing of a run may connect to."""
    decoys = Decoys(count)
    try:
        yield decoys
    finally:
        decoys.close()


def ensure_nodes(cluster: Any, count: int, timeout_s: float = 60.0) -> None:
    """Exactly `count` worker nodes alive (see `LocalCluster.resize`)."""
    cluster.resize(count, timeout_s)

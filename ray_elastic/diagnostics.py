"""Where is every rank? Python stacks of the training threads, and the collective each waits in.

A worker reads its training thread's frames in-process (`sys._current_frames`);
for a `ray-elastic run` script, which runs in a subprocess, it asks `py-spy`
(shipped with ray[default]) instead. The collective comes from torch's flight
recorder (`TORCH_FR_BUFFER_SIZE`, which workers turn on with a small buffer unless
set): the last collective enqueued on the default group and whether it completed.

`stacks(name)` asks a running run for every worker's stack (the CLI's
`ray-elastic stacks <run>`); the coordinator also gathers them whenever it aborts
a round for silence or for `hang_timeout_s`, and names the stuck ranks with them.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Small: a few entries tell which collective a rank waits in; workers set it unless the user did.
FLIGHT_RECORDER_ENTRIES = "64"
# A Python frame in `py-spy dump`'s output, "func (path/file.py:12)"; C frames name a library, with no line.
_PY_SPY_PYTHON_FRAME = re.compile(r"\(\S+:\d+\)$")


def thread_stack(thread_id: int | None) -> str:
    """The formatted frames of one thread of this process (innermost last); "" if it is gone."""
    frame = sys._current_frames().get(thread_id) if thread_id is not None else None
    return "".join(traceback.format_stack(frame)) if frame is not None else ""


def collective_state() -> tuple[int, str]:
    """(how many collectives this rank issued on the default group, the op of the last one); (-1, "") if none.

    Ranks that issued more than another are waiting in a collective that one has not
    reached (`compare_collectives`). torch's flight recorder names the op; its
    "completed" marks are not reliable for gloo here, so only issue counts are compared.
    """
    try:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            return -1, ""
        group = dist.distributed_c10d._get_default_group()
        issued = int(group._get_sequence_number_for_group())  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - diagnostics never fail the caller
        return -1, ""
    return issued, _flight_recorder_op(str(getattr(group, "group_name", "0")), issued)


def _flight_recorder_op(group_name: str, seq: int) -> str:
    """The op of collective `seq` of the default group in torch's flight recorder; "" if not recorded.

    The recorder keeps entries of every group this process formed (one per round), newest last.
    """
    try:
        import torch._C._distributed_c10d as c10d

        dump = pickle.loads(c10d._dump_fr_trace())  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - not in this torch, or the recorder is off
        return ""
    entries = [e for e in dump.get("entries") or [] if (e.get("process_group") or ("",))[0] == group_name]
    newest = max((e.get("pg_id", 0) for e in entries), default=0)
    for entry in reversed(entries):
        if entry.get("pg_id", 0) == newest and entry.get("collective_seq_id") == seq:
            return str(entry.get("profiling_name", ""))
    return ""


def compare_collectives(issued: dict[str, tuple[int, str]]) -> dict[str, str]:
    """Where each rank stands among its peers, from how many collectives each issued.

    Args:
        issued: per rank label ("rank 3"), (collectives issued, op of the last one); -1 if unknown.

    Returns:
        per rank: "waiting in <op> #N (rank(s) ... issued only #M)", "behind: issued #M, the others #N",
        or "at <op> #N, like every rank"; "" when unknown.
    """
    known = {k: v for k, v in issued.items() if v[0] >= 0}
    if not known:
        return {k: "" for k in issued}
    top = max(seq for seq, _ in known.values())
    behind = sorted((k for k, (seq, _) in known.items() if seq < top), key=lambda k: (len(k), k))
    out: dict[str, str] = {}
    for key, (seq, op) in issued.items():
        name = f"{op or 'collective'} #{seq}"
        if seq < 0:
            out[key] = ""
        elif seq == top and behind:
            lag = ", ".join(f"{k} at #{known[k][0]}" for k in behind)
            out[key] = f"waiting in {name} (behind: {lag})"
        elif seq < top:
            out[key] = f"behind: issued #{seq}, others #{top}"
        else:
            out[key] = f"at {name}, like every rank that answered"
    return out


def py_spy_path() -> str | None:
    """The py-spy next to this Python (ray[default] installs it there), else the one on PATH."""
    return shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")


def py_spy_dump(pid: int, timeout_s: float = 10.0, native: bool = False, who: str = "the script") -> tuple[str, str]:
    """(stack, note) of another process, read with `py-spy dump` (with C frames if `native`); stack "" and a
    note when it cannot. `who` names the process in the note."""
    exe = py_spy_path()
    if exe is None:
        return "", f"py-spy not found (it ships with ray[default]); no stack for {who}"
    command = [exe, "dump", "--pid", str(pid)] + (["--native"] if native else [])
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return "", f"py-spy dump --pid {pid} failed: {exc}"
    if done.returncode != 0:
        return "", py_spy_failure(pid, who, (done.stderr or done.stdout).strip())
    return done.stdout, f"read by py-spy from {who} (pid {pid})"


def py_spy_failure(pid: int, who: str, said: str) -> str:
    """Why `py-spy dump` could not read `who`, from what it printed; a missing right is named, not py-spy's advice
    to rerun it with sudo."""
    if "permission denied" in said.lower():
        return (f"py-spy may not read {who} (pid {pid}): it needs ptrace rights on that node (Ray run as root or "
                f"with CAP_SYS_PTRACE, or kernel.yama.ptrace_scope=0)")
    return f"py-spy dump --pid {pid} failed: {said[:300]}"


def gil_holder(dump: str) -> str:
    """The thread of a `py-spy dump` that holds the GIL, innermost frame last as in a traceback, from its
    outermost Python frame on (the C frames above it, where it holds the GIL, are kept; those below, the
    thread's start, are not); the whole dump if no thread holds it."""
    for block in re.split(r"\n(?=Thread )", dump):
        head, *frames = block.strip().splitlines()
        if head.startswith("Thread ") and "+gil" in head:
            outermost_first = list(reversed(frames))
            python = [i for i, frame in enumerate(outermost_first) if _PY_SPY_PYTHON_FRAME.search(frame)]
            kept = outermost_first[python[0]:] if python else outermost_first
            return "\n".join([head, *(_shorten(frame) for frame in kept)]) + "\n"
    return dump


def holds_the_gil(stack: str) -> bool:
    """Whether a stack from `gil_holder` is a thread that held the GIL when it was read."""
    head = stack.split("\n", 1)[0]
    return head.startswith("Thread ") and "+gil)" in head


def _shorten(frame: str, width: int = 160) -> str:
    """One frame on one readable line: C++ template arguments make some thousands of characters long."""
    return frame if len(frame) <= width else frame[: width - 5] + " ...)"


def first_user_frame(stack: str) -> str:
    """The innermost frame outside torch, ray_elastic, ray and the standard library, e.g. "train.py:41 in step"."""
    lines = stack.splitlines()
    skip = ("/torch/", "/ray_elastic/", "/ray/", "/threading.py", "/concurrent/", "/site-packages/",
            f"{os.sep}python3.", "<frozen ")
    for index in range(len(lines) - 1, -1, -1):
        line = lines[index].strip()
        if line.startswith('File "') and not any(s in line for s in skip):
            try:
                path, rest = line[6:].split('", line ', 1)
                number, _, func = rest.partition(", in ")
                return f"{Path(path).name}:{number} in {func}"
            except ValueError:
                return line
        if line.startswith("Thread ") or line.startswith("Process "):
            continue
        if _PY_SPY_PYTHON_FRAME.search(line) and not line.startswith("File"):  # py-spy: "func (file.py:12)"
            func, _, where = line.rpartition(" (")
            if not any(s in "/" + where for s in skip):  # py-spy shortens paths: "ray/_private/worker.py"
                return f"{where[:-1]} in {func}"
    return ""


@dataclass(frozen=True)
class RankStack:
    """One worker's stack, as `stacks()` returns it.

    Attributes:
        rank: its rank in the current round, or -1 if it is in none.
        worker_id, node_id, pid: which worker, where.
        round_id: the round it was in when asked (-1: none).
        stack: formatted frames of the training thread (or the script), innermost last; "" if unread.
        collective: where it stands in the default group's collectives against the other ranks.
        collective_seq: how many collectives it issued (-1: unknown).
        note: why the stack is missing, or where it was read from.
    """

    rank: int
    worker_id: str
    node_id: str
    pid: int
    round_id: int
    stack: str
    collective: str = ""
    note: str = ""
    collective_seq: int = -1

    def describe(self) -> str:
        head = f"rank {self.rank}" if self.rank >= 0 else "idle worker"
        lines = [f"--- {head} (worker {self.worker_id}, pid {self.pid}, node {self.node_id[:12]}, "
                 f"round {self.round_id})"]
        if self.collective:
            lines.append(f"collective: {self.collective}")
        if self.note:
            lines.append(f"note: {self.note}")
        lines.append(self.stack.rstrip() if self.stack else "(no stack)")
        return "\n".join(lines)


def format_stacks(stacks: list[RankStack]) -> str:
    """Every stack, rank order, for a terminal."""
    return "\n\n".join(s.describe() for s in sorted(stacks, key=lambda s: (s.rank < 0, s.rank, s.worker_id)))


def stacks(name: str, *, ray_address: str | None = None, timeout_s: float = 10.0) -> list[RankStack]:
    """Every worker's current stack in the running run `name` (rank order; idle workers last).

    Connects to the Ray cluster this process is connected to, else `ray_address`,
    else RAY_ADDRESS, else a local cluster already running; never starts one.

    Args:
        name: the run's name (`run(name=...)`, or the CLI's `--rdzv-id`).
        ray_address: the cluster to connect to.
        timeout_s: how long to wait for the workers' answers; a frozen one is reported without a stack.

    Returns:
        one `RankStack` per live worker of the run.

    Raises:
        ConfigError: no run of that name is running on the cluster.
    """
    import ray

    from ray_elastic.api import coordinator_name
    from ray_elastic.errors import ConfigError

    if not ray.is_initialized():
        ray.init(address=ray_address or os.environ.get("RAY_ADDRESS") or "auto", log_to_driver=False)
    try:
        coordinator = ray.get_actor(coordinator_name(name))
    except ValueError:
        raise ConfigError(f"no run named {name!r} is running on this Ray cluster; check the name "
                          f"(run(name=...) or --rdzv-id) and the cluster address.") from None
    answers: list[dict[str, Any]] = ray.get(coordinator.stacks.remote(timeout_s), timeout=timeout_s + 30)
    return [RankStack(**answer) for answer in answers]


def print_stacks(name: str, address: str | None, timeout_s: float) -> int:
    """`ray-elastic stacks <run>`: print every worker's stack; the process exit code."""
    import ray

    from ray_elastic.errors import ConfigError

    owns_ray = not ray.is_initialized()
    try:
        found = stacks(name, ray_address=address, timeout_s=timeout_s)
    except (ConfigError, ConnectionError) as exc:
        print(f"ray-elastic stacks: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if owns_ray and ray.is_initialized():
            ray.shutdown()
    print(format_stacks(found) if found else f"run {name!r} has no live worker", flush=True)
    return 0

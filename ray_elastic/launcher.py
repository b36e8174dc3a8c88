"""Runs an unmodified torchrun script as a worker's train_fn (what `ray-elastic run` launches).

Each worker actor starts the script as a subprocess with torchrun's environment;
the round's store lives on the coordinator (``TORCHELASTIC_USE_AGENT_STORE=True``),
so ``init_process_group("env://")`` in the script connects as a client. When the
coordinator aborts the round or asks for a membership change, the subprocess tree
is signalled at once so the round ends promptly; the actor itself stays up and
starts the script again in the next round. A subprocess never outlives its actor:
it gets ``PR_SET_PDEATHSIG`` on Linux and its process group is killed on every exit.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psutil

from ray_elastic.context import TrainContext, get_session

STDERR_TAIL_LINES = 60
_EXIT_CODE = re.compile(r"script exited with code (-?\d+)")
_PR_SET_PDEATHSIG = 1
_POLL_S = 0.05


@dataclass(frozen=True)
class ScriptSpec:
    """What every worker runs, and where its output goes.

    Attributes:
        command: the script and its arguments (``("train.py", "--lr", "0.1")``), or
            ``("-m", "pkg.module", ...)``; run with the worker's Python unless `no_python`.
        no_python: run ``command[0]`` as an executable, like torchrun's ``--no-python``.
        cwd: working directory of the script (the CLI's), if it exists on the worker's node.
        log_dir: also write per-rank ``stdout.log``, ``stderr.log`` and ``error.json`` under
            ``log_dir/<run-id>/attempt_<round>/<rank>/``.
        kill_grace_s: after SIGTERM on abort or stop, SIGKILL follows this much later.
    """

    command: tuple[str, ...]
    no_python: bool = False
    cwd: str | None = None
    log_dir: str | None = None
    kill_grace_s: float = 1.0

    def argv(self) -> list[str]:
        return list(self.command) if self.no_python else [sys.executable, "-u", *self.command]


class ScriptFailedError(RuntimeError):
    """The script exited non-zero; `remote_traceback` is its own traceback (or stderr tail).

    A RuntimeError whose message carries the script's last error line, so a rank that
    failed only because a peer vanished reads as a communication error (a victim).
    """

    def __init__(self, exit_code: int, summary: str, remote_traceback: str = ""):
        self.exit_code = exit_code
        self.summary = summary
        self.remote_traceback = remote_traceback
        super().__init__(f"script exited with code {exit_code}: {summary}")

    def __reduce__(self):
        return (type(self), (self.exit_code, self.summary, self.remote_traceback))


class RoundInterrupted(RuntimeError):
    """The coordinator aborted the round while the script ran; the worker reports ABORTED."""


def exit_code_of(message: str) -> int | None:
    """The script's exit code in a failure message made from a `ScriptFailedError`, if any."""
    match = _EXIT_CODE.search(message)
    return int(match.group(1)) if match else None


def script_env(ctx: TrainContext, error_file: str) -> dict[str, str]:
    """torchrun's worker environment: the worker's round variables plus the agent-store settings."""
    env = dict(os.environ)  # the worker has just set RANK, WORLD_SIZE, MASTER_* ... for this round
    env.update(
        {
            "TORCHELASTIC_USE_AGENT_STORE": "True",
            "TORCHELASTIC_ERROR_FILE": error_file,
            "GROUP_WORLD_SIZE": str(ctx.num_nodes),
            "ROLE_NAME": "default",
            "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _read_error_file(path: str) -> tuple[str, str] | None:
    """(summary, traceback) from a torch `@record` error file, if the script wrote one."""
    try:
        with open(path) as fp:
            data = json.load(fp)
    except (OSError, ValueError):
        return None
    message = data.get("message") if isinstance(data, dict) else None
    if isinstance(message, dict):
        extra = message.get("extraInfo") or {}
        return str(message.get("message", "")), str(extra.get("py_callstack", ""))
    if isinstance(message, str):
        return message, message
    return None


def script_failure(exit_code: int, error_file: str, stderr_tail: list[str]) -> ScriptFailedError:
    """The error for a non-zero exit: the recorded traceback if any, else the stderr tail."""
    recorded = _read_error_file(error_file)
    if recorded is not None:
        summary, trace = recorded
    else:
        trace = "\n".join(stderr_tail)
        lines = [line for line in stderr_tail if line.strip()]
        summary = lines[-1].strip() if lines else "no output on stderr"
    if exit_code < 0:
        with contextlib.suppress(ValueError):
            killed = f"killed by {signal.Signals(-exit_code).name}"
            summary = killed if recorded is None else f"{killed}; {summary}"
    return ScriptFailedError(exit_code, summary.splitlines()[0][:300] if summary else "", trace)


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """A preexec_fn: SIGKILL the child when the thread that started it (the actor) dies."""
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None

    def preexec() -> None:
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def signal_tree(pid: int, sig: int) -> None:
    """Send `sig` to a process and all its descendants, children first."""
    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True)[::-1] + [root]
    except psutil.Error:
        return
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)


def _pump(stream: IO[bytes], sink_name: str, prefix: str, log_path: Path | None, tail: deque[str] | None) -> None:
    """Copy a pipe line by line to a per-rank file and, prefixed, to the actor's stdout/stderr."""
    with open(log_path, "ab") if log_path else contextlib.nullcontext() as log:
        for raw in iter(stream.readline, b""):
            if log is not None:
                log.write(raw)
                log.flush()
            line = raw.decode(errors="replace").rstrip("\r\n")
            if tail is not None:
                tail.append(line)
            shown = line if line.startswith(prefix) else f"{prefix}{line}"  # torch adds it to some errors
            print(shown, file=getattr(sys, sink_name), flush=True)
    stream.close()


class ScriptProcess:
    """One script subprocess: started unless already interrupted, streamed, killed on every path."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: str | None, prefix: str,
                 log_dir: Path | None, kill_grace_s: float):
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.prefix = prefix
        self.log_dir = log_dir
        self.kill_grace_s = kill_grace_s
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self.interrupted: str | None = None
        self._interrupted_at = 0.0
        self._lock = threading.Lock()
        self._popen: subprocess.Popen[bytes] | None = None
        self._pumps: list[threading.Thread] = []

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    def start(self) -> bool:
        """Start the script; False if the round was interrupted first."""
        with self._lock:
            if self.interrupted is not None:
                return False
            self._popen = subprocess.Popen(
                self.argv, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, start_new_session=True, preexec_fn=_die_with_parent(os.getpid()),
            )
        assert self._popen.stdout is not None and self._popen.stderr is not None
        for stream, sink, name, tail in ((self._popen.stdout, "stdout", "stdout.log", None),
                                         (self._popen.stderr, "stderr", "stderr.log", self.stderr_tail)):
            log_path = self.log_dir / name if self.log_dir else None
            thread = threading.Thread(target=_pump, args=(stream, sink, self.prefix, log_path, tail), daemon=True)
            thread.start()
            self._pumps.append(thread)
        return True

    def interrupt(self, reason: str) -> None:
        """Session interrupt handler ("abort" or "stop"): SIGTERM the tree now, SIGKILL after the grace."""
        with self._lock:
            if self.interrupted is None:
                self.interrupted = reason
                self._interrupted_at = time.monotonic()
            popen = self._popen
        if popen is not None:
            signal_tree(popen.pid, signal.SIGTERM)

    def wait(self) -> int:
        """Wait for the script to exit, then kill whatever it left in its process group; the exit code."""
        popen = self._popen
        assert popen is not None
        try:
            # WNOWAIT keeps the exited script unreaped, so its pid (= its group id) cannot be reused
            # before its group is killed below.
            while os.waitid(os.P_PID, popen.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is None:
                if self.interrupted is not None and time.monotonic() - self._interrupted_at > self.kill_grace_s:
                    signal_tree(popen.pid, signal.SIGKILL)
                time.sleep(_POLL_S)
        finally:
            self.kill()
        for thread in self._pumps:
            thread.join(timeout=2.0)
        return popen.returncode

    def kill(self) -> None:
        """SIGKILL the script's tree and process group, then reap it (idempotent)."""
        popen = self._popen
        if popen is None:
            return
        if popen.returncode is None:
            signal_tree(popen.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=10)


def _rank_dir(spec: ScriptSpec, ctx: TrainContext) -> tuple[Path, bool]:
    """Where this rank's error file (and logs) go; True if it is a temporary directory."""
    if spec.log_dir:
        path = Path(spec.log_dir) / ctx.run_id / f"attempt_{ctx.round_id}" / str(ctx.rank)
        path.mkdir(parents=True, exist_ok=True)
        return path, False
    return Path(tempfile.mkdtemp(prefix=f"ray_elastic_rank{ctx.rank}_")), True


def run_script(spec: ScriptSpec) -> dict[str, Any]:
    """The train_fn of `ray-elastic run`: run the script for this round and report how it ended.

    Returns:
        {"rank", "pid", "exit_code": 0} when the script succeeded.

    Raises:
        MembershipChange: the coordinator asked for a re-form; the script was stopped.
        RoundInterrupted: the round was aborted (a peer failed); the script was killed.
        ScriptFailedError: the script exited non-zero (exit code, its traceback).
    """
    from ray_elastic.state import MembershipChange

    session = get_session()
    ctx = session.context
    rank_dir, temporary = _rank_dir(spec, ctx)
    error_file = rank_dir / "error.json"
    error_file.unlink(missing_ok=True)
    cwd = spec.cwd if spec.cwd and os.path.isdir(spec.cwd) else None
    proc = ScriptProcess(spec.argv(), script_env(ctx, str(error_file)), cwd, f"[rank{ctx.rank}]:",
                         None if temporary else rank_dir, spec.kill_grace_s)
    session.add_interrupt_handler(proc.interrupt)
    try:
        started = proc.start()
        if started and proc.pid is not None:
            session.subprocess_pids.append(proc.pid)
        exit_code = proc.wait() if started else None
        failure = None if exit_code in (0, None) else script_failure(exit_code, str(error_file),
                                                                      list(proc.stderr_tail))
    finally:
        proc.kill()
        if temporary:
            shutil.rmtree(rank_dir, ignore_errors=True)
    if exit_code == 0:
        return {"rank": ctx.rank, "pid": proc.pid, "exit_code": 0}
    if proc.interrupted == "stop":
        raise MembershipChange()
    if proc.interrupted is not None or failure is None:
        raise RoundInterrupted(f"script on rank {ctx.rank} stopped: round {ctx.round_id} was aborted")
    raise failure

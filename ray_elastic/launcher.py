"""Runs an unmodified torchrun script for one rank and one round (what `ray-elastic run` launches).

The script starts as a subprocess with torchrun's environment; the round's store
is the launcher's (``TORCHELASTIC_USE_AGENT_STORE=True``), so
``init_process_group("env://")`` in the script connects as a client. When the
round is aborted or re-formed, the subprocess tree is signalled at once so the
round ends promptly. A subprocess never outlives its launcher: it gets
``PR_SET_PDEATHSIG`` on Linux and its process group is killed on every exit.

`RankRun` is shared by both ways of running: `run_script` (the train_fn of a
worker actor on a Ray cluster) and the local worker group (`cli_local.py`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_elastic.cli_output import STDERR, STDOUT, ChannelSink, ConsoleSink, OutputSpec
from ray_elastic.context import get_session
from ray_elastic.script_process import ScriptProcess, StreamRoute, signal_tree

__all__ = ["RankPlace", "RankRun", "RoundInterrupted", "RoundStopped", "ScriptFailedError", "ScriptProcess",
           "ScriptSpec", "exit_code_of", "pid_of", "run_script", "script_env", "script_failure", "signal_tree"]

_EXIT_CODE = re.compile(r"script exited with code (-?\d+)")
_PID = re.compile(r"script exited with code -?\d+ \(pid (\d+)\)")
# torchrun's --run-path: the script runs through runpy in a fresh interpreter, and an exception is
# recorded in TORCHELASTIC_ERROR_FILE in torch's format, as torch's @record would (without importing torch).
_RUN_PATH_BOOT = """
import json, os, runpy, sys, time, traceback
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exc:
    if exc.code not in (None, 0):
        raise
except BaseException as exc:
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path and not os.path.exists(path):
        info = {"py_callstack": traceback.format_exc(), "timestamp": str(int(time.time()))}
        with open(path, "w") as fp:
            json.dump({"message": {"message": f"{type(exc).__name__}: {exc}", "extraInfo": info}}, fp)
    raise
"""


@dataclass(frozen=True)
class ScriptSpec:
    """What every rank runs, and where its output goes.

    Attributes:
        command: the script and its arguments (``("train.py", "--lr", "0.1")``), or
            ``("-m", "pkg.module", ...)``; run with the worker's Python unless `no_python`.
        no_python: run ``command[0]`` as an executable, like torchrun's ``--no-python``.
        run_path: run the script with ``runpy.run_path`` (torchrun's ``--run-path``).
        cwd: working directory of the script (the CLI's), if it exists on the worker's node.
        log_dir: also write per-rank ``stdout.log``, ``stderr.log`` and ``error.json`` under
            ``log_dir/<run-id>/attempt_<round>/<rank>/``.
        kill_grace_s: after SIGTERM on abort or stop, SIGKILL follows this much later
            (torchrun's ``--shutdown-timeout``).
        role: ROLE_NAME (torchrun's ``--role``).
        signals_to_handle: TORCHELASTIC_SIGNALS_TO_HANDLE given to the script.
        virtual_local_rank: LOCAL_RANK=0 and one GPU in CUDA_VISIBLE_DEVICES per script.
        numa_binding: torchrun's ``--numa-binding`` mode, applied where the node has GPUs.
        output: console and log-file settings.
    """

    command: tuple[str, ...]
    no_python: bool = False
    cwd: str | None = None
    log_dir: str | None = None
    kill_grace_s: float = 1.0
    run_path: bool = False
    role: str = "default"
    signals_to_handle: str = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"
    virtual_local_rank: bool = False
    numa_binding: str | None = None
    output: OutputSpec = field(default_factory=OutputSpec)

    def argv(self) -> list[str]:
        if self.run_path:
            return [sys.executable, "-u", "-c", _RUN_PATH_BOOT, *self.command]
        return list(self.command) if self.no_python else [sys.executable, "-u", *self.command]


@dataclass(frozen=True)
class RankPlace:
    """Where one script runs: its run, round and ranks."""

    run_id: str
    round_id: int
    rank: int
    local_rank: int
    num_nodes: int


class ScriptFailedError(RuntimeError):
    """The script exited non-zero; `remote_traceback` is its own traceback (or stderr tail).

    A RuntimeError whose message carries the script's last error line, so a rank that
    failed only because a peer vanished reads as a communication error (a victim).
    """

    def __init__(self, exit_code: int, summary: str, remote_traceback: str = "", pid: int | None = None):
        self.exit_code = exit_code
        self.summary = summary
        self.remote_traceback = remote_traceback
        self.pid = pid
        where = f" (pid {pid})" if pid is not None else ""
        super().__init__(f"script exited with code {exit_code}{where}: {summary}")

    def __reduce__(self):
        return (type(self), (self.exit_code, self.summary, self.remote_traceback, self.pid))


class RoundInterrupted(RuntimeError):
    """The coordinator aborted the round while the script ran; the worker reports ABORTED."""


class RoundStopped(RuntimeError):
    """The round was asked to re-form (a node joins) while the script ran; the worker reports STOPPED."""


def exit_code_of(message: str) -> int | None:
    """The script's exit code in a failure message made from a `ScriptFailedError`, if any."""
    match = _EXIT_CODE.search(message)
    return int(match.group(1)) if match else None


def script_env(base: Mapping[str, str], spec: ScriptSpec, place: RankPlace, error_file: str) -> dict[str, str]:
    """torchrun's worker environment: `base` (which holds RANK, WORLD_SIZE, MASTER_* ... of the round)
    plus the agent-store settings."""
    env = dict(base)
    env.update(
        {
            "TORCHELASTIC_USE_AGENT_STORE": "True",
            "TORCHELASTIC_ERROR_FILE": error_file,
            "GROUP_WORLD_SIZE": str(place.num_nodes),
            "ROLE_NAME": spec.role,
            "TORCHELASTIC_SIGNALS_TO_HANDLE": spec.signals_to_handle,
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    if spec.virtual_local_rank:  # as torchrun: LOCAL_RANK 0, this rank's GPU as device 0
        env["LOCAL_RANK"] = "0"
        visible = env.get("CUDA_VISIBLE_DEVICES")
        gpus = visible.split(",") if visible else None
        env["CUDA_VISIBLE_DEVICES"] = gpus[place.local_rank].strip() if gpus and place.local_rank < len(gpus) \
            else str(place.local_rank)
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


def pid_of(message: str) -> int | None:
    """The script's pid in a failure message made from a `ScriptFailedError`, if any."""
    match = _PID.search(message)
    return int(match.group(1)) if match else None


def script_failure(exit_code: int, error_file: str, stderr_tail: list[str],
                   pid: int | None = None) -> ScriptFailedError:
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
    return ScriptFailedError(exit_code, summary.splitlines()[0][:300] if summary else "", trace, pid)


def _rank_dir(spec: ScriptSpec, place: RankPlace) -> tuple[Path, bool]:
    """Where this rank's error file (and logs) go; True if it is a temporary directory."""
    if spec.log_dir:
        path = Path(spec.log_dir) / place.run_id / f"attempt_{place.round_id}" / str(place.rank)
        path.mkdir(parents=True, exist_ok=True)
        return path, False
    return Path(tempfile.mkdtemp(prefix=f"ray_elastic_rank{place.rank}_")), True


def _numa_wrapped(argv: list[str], spec: ScriptSpec, local_rank: int) -> list[str]:
    """torchrun's --numa-binding: numactl around the script, bound near its GPU (nodes with GPUs only)."""
    if spec.numa_binding is None:
        return argv
    import torch

    if not torch.cuda.is_available():
        return argv
    from torch.numa import binding

    options = binding.NumaOptions(binding.AffinityMode(spec.numa_binding), should_fall_back_if_binding_fails=True)
    return list(binding._maybe_wrap_command_args_with_numa_binding(  # noqa: SLF001 - what torchrun calls
        tuple(argv), gpu_index=local_rank, numa_options=options))


class RankRun:
    """One rank's script for one round: its files, its process, its output, and how it ended.

    Args:
        spec: what to run.
        place: run id, round and ranks.
        base_env: the round's environment (RANK, WORLD_SIZE, MASTER_* ...).
        console: where lines are printed when the spec has no output channel.
    """

    def __init__(self, spec: ScriptSpec, place: RankPlace, base_env: Mapping[str, str],
                 console: ConsoleSink | None = None):
        self.spec = spec
        self.place = place
        self.dir, self._temporary = _rank_dir(spec, place)
        self.error_file = self.dir / "error.json"
        self.error_file.unlink(missing_ok=True)
        console = console or ConsoleSink()
        out = spec.output
        self.sink: Any = ChannelSink(out.channel, console) if out.channel else console
        prefix = out.prefix(place.rank, place.local_rank, spec.role)
        attempt = None if self._temporary else self.dir.parent
        routes = tuple(
            StreamRoute(prefix, out.shown(place.local_rank, which), out.filters(which),
                        attempt / f"filtered_{name}.log" if attempt else None)
            for which, name in ((STDOUT, "stdout"), (STDERR, "stderr"))
        )
        cwd = spec.cwd if spec.cwd and os.path.isdir(spec.cwd) else None
        self.proc = ScriptProcess(
            _numa_wrapped(spec.argv(), spec, place.local_rank), script_env(base_env, spec, place, str(self.error_file)),
            cwd, prefix, None if self._temporary else self.dir, spec.kill_grace_s, self.sink,
            routes,  # type: ignore[arg-type]
        )

    def run(self) -> dict[str, Any]:
        """Run the script to its end.

        Returns:
            {"rank", "pid", "exit_code": 0} when the script succeeded on its own.

        Raises:
            RoundStopped: the round was asked to re-form while it ran (whatever its exit code).
            RoundInterrupted: the round was aborted while it ran (whatever its exit code).
            ScriptFailedError: the script exited non-zero (exit code, its traceback).
        """
        try:
            exit_code = self.proc.wait() if self.proc.start() else None
            failure = None if exit_code in (0, None) else script_failure(
                exit_code, str(self.error_file), list(self.proc.stderr_tail), self.proc.pid)
        finally:
            self.proc.kill()
            self.sink.close()  # every line printed before the round's outcome is reported
            if self._temporary:
                shutil.rmtree(self.dir, ignore_errors=True)
        # Interrupted while running: the round ends as the coordinator asked, even for a script that
        # exits 0 on SIGTERM (save and exit, a common pattern): under torchrun it would be restarted too.
        if self.proc.interrupted == "stop":
            raise RoundStopped(f"script on rank {self.place.rank} stopped: round {self.place.round_id} re-forms")
        if self.proc.interrupted is not None or exit_code is None:
            raise RoundInterrupted(f"script on rank {self.place.rank} stopped: round {self.place.round_id} "
                                   f"was aborted")
        if failure is not None:
            raise failure
        return {"rank": self.place.rank, "pid": self.proc.pid, "exit_code": 0}


def run_script(spec: ScriptSpec) -> dict[str, Any]:
    """The train_fn of `ray-elastic run` on a Ray cluster: run the script for this round.

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
    place = RankPlace(ctx.run_id, ctx.round_id, ctx.rank, ctx.local_rank, ctx.num_nodes)
    # The worker has just set RANK, WORLD_SIZE, MASTER_* ... for this round in its environment.
    rank_run = RankRun(spec, place, os.environ)
    session.add_interrupt_handler(rank_run.proc.interrupt)
    try:
        return rank_run.run()
    except RoundStopped:
        raise MembershipChange() from None

"""`ray-elastic run`: torchrun's command line, run elastically on this machine or on a Ray cluster.

    ray-elastic run --standalone --nproc-per-node=4 train.py --lr 0.1          # this machine, no Ray
    ray-elastic run --nnodes=2:4 --nproc-per-node=2 --max-restarts=3 train.py   # the Ray cluster at RAY_ADDRESS

Every process slot runs the unmodified script with torchrun's environment (see
`launcher.py`): as local subprocesses when the run is local (`--standalone`, or
no cluster address), else under one worker actor each on Ray nodes. Exit codes
as torchrun's: 0 on success, 1 when the run failed (the script's own exit code is
in the "Root Cause" block); and 2 for bad arguments (nothing was started),
128+N when the launcher got signal N (130 for Ctrl-C).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_elastic import cli_args
from ray_elastic.cli_args import TORCHRUN_FLAGS, check_run_id, given, parse_nnodes, to_int
from ray_elastic.cli_output import DEFAULT_PREFIX, OutputSpec, shared_console
from ray_elastic.errors import ConfigError, FailureInfo, RunAbortedError, TrainingFailedError
from ray_elastic.launcher import ScriptSpec, exit_code_of, pid_of

USAGE_ERROR = 2
FAILED = 1
INTERRUPTED = 130
DEFAULT_SHUTDOWN_S = 30.0  # torchrun's default grace between the signal and SIGKILL
__all__ = ["build_parser", "describe_failure", "failure_exit_code", "main", "parse_nnodes", "plan_launch"]


@dataclass(frozen=True)
class LaunchPlan:
    """Validated CLI arguments: what to run, where, and how."""

    min_nodes: int
    max_nodes: int
    nproc_per_node: int | str  # a number, or "auto"/"cpu"/"gpu", counted on a cluster's nodes once connected
    max_restarts: int
    run_id: str
    script: ScriptSpec
    local: bool = True  # this machine, no Ray
    standalone: bool = False
    address: str | None = None
    use_gpu: bool = False
    wait_for_nodes_timeout_s: float = 600.0
    store_host: str = "127.0.0.1"
    store_port: int = 0
    signals: tuple[int, ...] = ()
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def abort_timeout_s(self) -> float:
        """Scripts get kill_grace_s to leave after the signal; their worker a little more."""
        return self.script.kill_grace_s + 5.0


def build_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The `ray-elastic` parser; torchrun's flags default to their `PET_<FLAG>` variables in `env`."""
    return cli_args.build_parser(os.environ if env is None else env)


def local_nproc(text: str) -> int:
    """torchrun's --nproc-per-node on this machine: a number, or auto/cpu/gpu/xpu counted here."""
    if str(text).lstrip("-").isdigit():
        return to_int("--nproc-per-node", text, 1)
    import torch

    if text == "cpu" or (text == "auto" and not torch.accelerator.is_available()):
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if text == "auto":
        return torch.accelerator.device_count()
    if text in ("gpu", "xpu"):
        module = torch.cuda if text == "gpu" else torch.xpu
        if not module.is_available():
            raise ConfigError(f"--nproc-per-node={text}: this machine has no {text.upper()}; give a number.")
        return module.device_count()
    raise ConfigError(f"--nproc-per-node={text!r} must be a number, or auto, cpu, gpu or xpu.")


def _script_command(args: argparse.Namespace) -> tuple[str, ...]:
    script = args.training_script
    if args.run_path:  # torchrun: --run-path wins over --no-python
        path = Path(script)
        if not path.is_file():
            raise ConfigError(f"training script {script!r} not found (looked in {os.getcwd()}).")
        return (str(path.resolve()), *args.training_script_args)
    if args.module:
        if args.no_python:
            raise ConfigError("-m/--module and --no-python cannot be combined.")
        return ("-m", script, *args.training_script_args)
    if args.no_python:
        import shutil

        found = shutil.which(script)
        if found is None:
            raise ConfigError(f"executable {script!r} not found (--no-python runs it directly).")
        return (os.path.abspath(found), *args.training_script_args)
    path = Path(script)
    if not path.is_file():
        raise ConfigError(f"training script {script!r} not found (looked in {os.getcwd()}); pass a path to a .py "
                          f"file, or -m for a module.")
    return (str(path.resolve()), *args.training_script_args)


def _log_dir(args: argparse.Namespace, output: OutputSpec, notes: list[str]) -> str | None:
    text = args.log_dir
    if not text:
        if not output.needs_files:
            return None
        text = tempfile.mkdtemp(prefix="torchelastic_")  # as torchrun, for redirects/tee without --log-dir
        notes.append(f"log directory set to: {text}")
    log_dir = str(Path(text).resolve())
    try:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--log-dir {text!r} cannot be created: {exc}.") from None
    if not os.access(log_dir, os.W_OK):
        raise ConfigError(f"--log-dir {text!r} is not writable; choose another directory.")
    return log_dir


def _kill_grace_s(args: argparse.Namespace, env: Mapping[str, str]) -> float:
    text = args.shutdown_timeout if args.shutdown_timeout is not None else env.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT")
    return DEFAULT_SHUTDOWN_S if text in (None, "") else float(to_int("--shutdown-timeout", text, 0))


def _check_port_free(port: int) -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError as exc:
            raise ConfigError(f"--master-port={port} cannot be used on this machine ({exc.strerror}); choose a "
                              f"free port, or drop --master-port to get one.") from None


def plan_launch(args: argparse.Namespace, env: Mapping[str, str] | None = None,
                ray_connected: bool = False) -> LaunchPlan:
    """Check every argument before anything starts; the plan to run, or ConfigError saying what to change.

    Args:
        args: parsed by `build_parser`.
        env: the CLI's environment (RAY_ADDRESS, TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE, ...); default os.environ.
        ray_connected: this process is already connected to Ray (the run uses that cluster).
    """
    env = os.environ if env is None else env
    min_nodes, max_nodes = parse_nnodes(args.nnodes)
    if args.standalone:
        if (min_nodes, max_nodes) != (1, 1):
            raise ConfigError(f"--standalone runs one node; drop --nnodes={args.nnodes} or drop --standalone.")
        if args.address:
            raise ConfigError("--standalone runs on this machine without Ray; drop --address or drop --standalone.")
    address = args.address or (None if args.standalone else env.get("RAY_ADDRESS"))
    local = args.standalone or not (address or ray_connected)
    if local and min_nodes > 1:
        raise ConfigError(f"--nnodes={args.nnodes} needs more nodes than this machine: run on a Ray cluster "
                          f"(--address=ADDRESS or RAY_ADDRESS), or use --nnodes=1.")
    on_this_machine = local or address == "local"
    nproc: int | str = local_nproc(args.nproc_per_node) if on_this_machine else args.nproc_per_node
    if isinstance(nproc, str) and nproc not in ("auto", "cpu", "gpu"):
        nproc = to_int("--nproc-per-node", nproc, 1)
    max_restarts = to_int("--max-restarts", args.max_restarts, -1)
    run_id = check_run_id(args.rdzv_id) if given(args, _flag("rdzv_id")) else f"ray-elastic-{uuid.uuid4().hex[:8]}"
    conf = cli_args.parse_rdzv_conf(args.rdzv_conf)
    join_timeout = 600.0
    if "join_timeout" in conf:
        join_timeout = float(to_int("--rdzv-conf join_timeout", conf.pop("join_timeout"), 0))
    notes = [f"ignoring --rdzv-conf {key}" for key in conf]
    for flag in TORCHRUN_FLAGS:
        if flag.ignored and given(args, flag):
            notes.append(f"ignoring {flag.names[0]}={getattr(args, flag.dest)}: {flag.ignored}")
    if not local:
        for name in ("master_addr", "local_addr"):
            if given(args, _flag(name)):
                notes.append(f"ignoring --{name.replace('_', '-')}: on a Ray cluster the store is on the "
                             f"coordinator's node")
    if args.numa_binding and local and "gpu" not in str(args.nproc_per_node) and not _has_gpu():
        notes.append(f"ignoring --numa-binding={args.numa_binding}: this machine has no GPU to bind near")
    store_port = 0 if args.master_port in (None, "") else to_int("--master-port", args.master_port, 1)
    if store_port:  # the store is on this machine: local runs, and the coordinator sits on the driver's node
        _check_port_free(store_port)
    output = OutputSpec(
        prefix_template=env.get("TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE") or DEFAULT_PREFIX,
        redirects=cli_args.parse_std("--redirects", args.redirects),
        tee=cli_args.parse_std("--tee", args.tee),
        local_ranks_filter=cli_args.parse_local_ranks(args.local_ranks_filter),
        duplicate_stdout_filters=cli_args.parse_filters(args.duplicate_stdout_filters),
        duplicate_stderr_filters=cli_args.parse_filters(args.duplicate_stderr_filters),
    )
    script = ScriptSpec(
        command=_script_command(args), no_python=args.no_python and not args.run_path, run_path=args.run_path,
        cwd=os.getcwd(), log_dir=_log_dir(args, output, notes), kill_grace_s=_kill_grace_s(args, env),
        role=args.role, signals_to_handle=args.signals_to_handle, virtual_local_rank=args.virtual_local_rank,
        numa_binding=args.numa_binding, output=output,
    )
    return LaunchPlan(
        min_nodes=min_nodes, max_nodes=max_nodes, nproc_per_node=nproc, max_restarts=max_restarts, run_id=run_id,
        script=script, local=local, standalone=args.standalone, address=address, use_gpu=args.use_gpu,
        wait_for_nodes_timeout_s=join_timeout, store_host=args.local_addr or args.master_addr or "127.0.0.1",
        store_port=store_port, signals=cli_args.parse_signals(args.signals_to_handle), notes=tuple(notes),
    )


def _flag(dest: str) -> cli_args.Flag:
    return next(f for f in TORCHRUN_FLAGS if f.dest == dest)


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


# -- reporting ---------------------------------------------------------------------------------------------
def failure_exit_code(failure: FailureInfo | None) -> int:
    """The script's exit code in a failure (128+N if killed by signal N), else 1; shown in the report."""
    code = exit_code_of(failure.message) if failure is not None else None
    if code is None or code == 0:
        return 1
    return 128 - code if code < 0 else code


def _summary(failure: FailureInfo) -> str:
    text = failure.message.split(": ", 1)[1] if failure.message.startswith("ScriptFailedError: ") else failure.message
    return text.split(": ", 1)[1] if exit_code_of(text) is not None and ": " in text else text


def _failure_block(index: int, failure: FailureInfo, nproc: int, hosts: Mapping[str, str], when: str) -> list[str]:
    code = exit_code_of(failure.message)
    local_rank = failure.rank % nproc if nproc > 0 and failure.rank >= 0 else "-"
    trace = (failure.traceback.rstrip() or _summary(failure)).replace("\n", "\n    ")
    return [
        f"[{index}]:",
        f"  time      : {when}",
        f"  host      : {hosts.get(failure.node_id, failure.node_id[:12])}",
        f"  rank      : {failure.rank} (local_rank: {local_rank})",
        f"  exitcode  : {code if code is not None else '-'} (pid: {pid_of(failure.message) or '-'}, "
        f"{failure.kind} in round {failure.round_id})",
        f"  message   : {_summary(failure)}",
        "  error_file: <N/A>",
        f"  traceback : {trace}",
    ]


def describe_failure(error: TrainingFailedError, script: str = "script", nproc: int = 1,
                     hosts: Mapping[str, str] | None = None) -> str:
    """torchrun's failure report: the other failures, then the root cause with the script's traceback."""
    hosts = hosts or {}
    when = time.strftime("%Y-%m-%d_%H:%M:%S")
    first = error.first_failure
    others = [f for f in error.failures if f is not first]
    lines = [f"ray-elastic: run failed: {error.reason} (restarts spent: {error.restarts})", "=" * 60,
             f"{script} FAILED", "-" * 60, "Failures:"]
    for index, failure in enumerate(others, start=1):
        lines += _failure_block(index, failure, nproc, hosts, when)
    if not others:
        lines.append("  <NO_OTHER_FAILURES>")
    lines += ["-" * 60, "Root Cause (first observed failure):"]
    lines += _failure_block(0, first, nproc, hosts, when) if first is not None else ["  <N/A>"]
    lines.append("=" * 60)
    return "\n".join(lines)


def write_error_file(path: str, failure: FailureInfo | None) -> None:
    """torchrun's launcher error file (TORCHELASTIC_ERROR_FILE): the root cause, in torch's format."""
    if not path or failure is None:
        return
    data = {"message": {"message": _summary(failure),
                        "extraInfo": {"py_callstack": failure.traceback or _summary(failure),
                                      "timestamp": str(int(time.time()))},
                        "errorCode": failure_exit_code(failure)}}
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data))
    except OSError as exc:
        print(f"ray-elastic: cannot write TORCHELASTIC_ERROR_FILE {path}: {exc}", file=sys.stderr)


# -- running -----------------------------------------------------------------------------------------------
def _report(plan: LaunchPlan, error: Exception | None, signum: int | None, hosts: Mapping[str, str],
            nproc: int, world_size: int, restarts: int) -> int:
    """Print how the run ended; the exit code."""
    if signum is not None:
        import signal

        print(f"ray-elastic: run {plan.run_id} stopped: the launcher got {signal.Signals(signum).name}",
              file=sys.stderr, flush=True)
        return 128 + signum
    if isinstance(error, TrainingFailedError):
        print(describe_failure(error, Path(plan.script.command[0]).name if plan.script.command else "script",
                               nproc, hosts), file=sys.stderr, flush=True)
        write_error_file(os.environ.get("TORCHELASTIC_ERROR_FILE", ""), error.first_failure)
        return FAILED
    if isinstance(error, RunAbortedError):
        print("ray-elastic: run interrupted", file=sys.stderr, flush=True)
        return INTERRUPTED
    if error is not None:
        raise error
    print(f"ray-elastic: run {plan.run_id} succeeded: world size {world_size}, restarts spent {restarts}",
          file=sys.stderr, flush=True)
    return 0


def run_config(plan: LaunchPlan, nproc: int) -> Any:
    from ray_elastic.config import RunConfig, validate

    return validate(RunConfig(
        run_id=plan.run_id, min_nodes=plan.min_nodes, max_nodes=plan.max_nodes, nproc_per_node=nproc,
        max_restarts=plan.max_restarts, wait_for_nodes_timeout_s=plan.wait_for_nodes_timeout_s,
        hang_timeout_s=None, abort_timeout_s=plan.abort_timeout_s, init_process_group=False, warmup_modules=(),
        replacement_wait_s=0.0,  # scripts report no progress: nothing to wait for
        store_port=plan.store_port,
    ))


def execute_local(plan: LaunchPlan) -> int:
    """Run on this machine with no Ray (see cli_local.py)."""
    from ray_elastic.cli_local import NODE_ID, run_local
    from ray_elastic.progress import LogProgress

    assert isinstance(plan.nproc_per_node, int)
    with shared_console() as console:
        summary, signum = run_local(run_config(plan, plan.nproc_per_node), plan.script, plan.store_host,
                                    plan.signals, LogProgress(), console=console)
    return _report(plan, summary.error, signum, {NODE_ID: socket.getfqdn()}, plan.nproc_per_node,
                   len(summary.return_values), summary.restarts)


def execute(plan: LaunchPlan) -> int:
    """Run the plan; the process exit code."""
    for note in plan.notes:
        print(f"ray-elastic: {note}", file=sys.stderr)
    if plan.local:
        return execute_local(plan)
    from ray_elastic.cli_ray import execute_on_ray

    return execute_on_ray(plan)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `ray-elastic` and `python -m ray_elastic`; returns the exit code."""
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
            return exc.code if isinstance(exc.code, int) else USAGE_ERROR
        if args.command == "stacks":
            from ray_elastic.diagnostics import print_stacks

            return print_stacks(args.run_name, args.address, args.timeout)
        ray_mod = sys.modules.get("ray")
        plan = plan_launch(args, ray_connected=bool(ray_mod is not None and ray_mod.is_initialized()))
    except ConfigError as exc:
        print(f"ray-elastic run: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    return execute(plan)


def replace_output(plan: LaunchPlan, **changes: Any) -> LaunchPlan:
    """The plan with its script's output settings changed (the output channel, once it exists)."""
    output = dataclasses.replace(plan.script.output, **changes)
    return dataclasses.replace(plan, script=dataclasses.replace(plan.script, output=output))

"""`ray-elastic run`: torchrun's command line, run elastically on a Ray cluster.

    ray-elastic run --nnodes=2:4 --nproc-per-node=2 --max-restarts=3 train.py --lr 0.1

Every process slot is a worker actor that starts the unmodified script with
torchrun's environment (see `launcher.py`). Exit codes: 0 on success, 2 for bad
arguments (nothing was started), the first failed script's exit code on failure
(128+N for a script killed by signal N), 1 for other failures, 130 if interrupted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray_elastic.errors import ConfigError, FailureInfo, RunAbortedError, TrainingFailedError
from ray_elastic.launcher import ScriptSpec, exit_code_of, run_script

USAGE_ERROR = 2
INTERRUPTED = 130
_IGNORED = ("rdzv_backend", "rdzv_endpoint", "master_addr", "master_port", "node_rank", "monitor_interval")


@dataclass(frozen=True)
class LaunchPlan:
    """Validated CLI arguments, ready for `ray_elastic.run`."""

    min_nodes: int
    max_nodes: int
    nproc_per_node: int
    max_restarts: int
    run_id: str
    script: ScriptSpec
    standalone: bool = False
    address: str | None = None
    use_gpu: bool = False
    wait_for_nodes_timeout_s: float = 600.0


def _flag(parser: argparse.ArgumentParser, name: str, **kwargs: Any) -> None:
    """Add `--a-b` with torchrun's `--a_b` spelling as an alias."""
    parser.add_argument(f"--{name}", f"--{name.replace('-', '_')}", **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ray-elastic", description="Elastic PyTorch training on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run", allow_abbrev=False,
        help="run a torchrun-style script elastically (same flags as torchrun)",
        description="Run an unmodified torchrun script on Ray nodes; scripts restart with the new world "
                    "after a failure or a membership change, as under torchrun.",
    )
    _flag(run, "nnodes", default="1:1", help="MIN:MAX nodes, or N for N:N (default 1:1)")
    _flag(run, "nproc-per-node", default="1", help="processes per node (default 1)")
    _flag(run, "max-restarts", default="0", help="failures tolerated, -1 for unlimited (default 0, as torchrun)")
    _flag(run, "rdzv-id", default=None, help="run id (TORCHELASTIC_RUN_ID); default: a fresh one")
    _flag(run, "rdzv-conf", default="", help="key=value,...; join_timeout=SECONDS: wait this long for MIN nodes")
    _flag(run, "log-dir", default=None, help="also write per-rank logs under DIR/<run-id>/attempt_<round>/<rank>/")
    run.add_argument("--standalone", action="store_true", help="one node on a local Ray (--nnodes=1)")
    run.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else local Ray)")
    _flag(run, "use-gpu", action="store_true", help="one GPU per process")
    run.add_argument("-m", "--module", action="store_true", help="run training_script as a module, like python -m")
    _flag(run, "no-python", action="store_true", help="run training_script as an executable, without python")
    for name in _IGNORED:
        _flag(run, name.replace("_", "-"), default=None, help=argparse.SUPPRESS)
    run.add_argument("training_script", help="the script (or module with -m) every process runs")
    run.add_argument("training_script_args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    stacks = commands.add_parser(
        "stacks", help="print every rank's Python stack in a running run",
        description="Print where every worker of a running run is: its training thread's Python stack (a "
                    "script's, read with py-spy) and the collective it waits in.",
    )
    stacks.add_argument("run_name", help="the run's name: run(name=...) or --rdzv-id")
    stacks.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else local)")
    stacks.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the workers (default 10)")
    return parser


def _int(flag: str, text: str, minimum: int) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise ConfigError(f"{flag}={text!r} must be an integer >= {minimum}.") from None
    if value < minimum:
        raise ConfigError(f"{flag}={value} must be >= {minimum}.")
    return value


def parse_nnodes(text: str) -> tuple[int, int]:
    """torchrun's --nnodes: "N" means N:N, "MIN:MAX" a range."""
    parts = str(text).split(":")
    if len(parts) not in (1, 2):
        raise ConfigError(f"--nnodes={text!r} must be N or MIN:MAX, e.g. --nnodes=2 or --nnodes=2:4.")
    low = _int("--nnodes", parts[0], 1)
    high = _int("--nnodes", parts[-1], 1)
    if high < low:
        raise ConfigError(f"--nnodes={text}: MIN ({low}) must be <= MAX ({high}); write --nnodes={high}:{low}.")
    return low, high


def _parse_rdzv_conf(text: str) -> dict[str, str]:
    conf = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--rdzv-conf entry {item!r} must be key=value.")
        conf[key.strip()] = value.strip()
    return conf


def _script_command(args: argparse.Namespace) -> tuple[str, ...]:
    script = args.training_script
    if args.module:
        if args.no_python:
            raise ConfigError("-m/--module and --no-python cannot be combined.")
        return ("-m", script, *args.training_script_args)
    if args.no_python:
        found = shutil.which(script)
        if found is None:
            raise ConfigError(f"executable {script!r} not found (--no-python runs it directly).")
        return (found, *args.training_script_args)
    path = Path(script)
    if not path.is_file():
        raise ConfigError(f"training script {script!r} not found (looked in {os.getcwd()}); pass a path to a .py "
                          f"file, or -m for a module.")
    return (str(path.resolve()), *args.training_script_args)


def plan_launch(args: argparse.Namespace) -> LaunchPlan:
    """Check every argument before anything starts; the plan to run, or ConfigError saying what to change."""
    min_nodes, max_nodes = parse_nnodes(args.nnodes)
    if args.standalone:
        if (min_nodes, max_nodes) != (1, 1):
            raise ConfigError(f"--standalone runs one node; drop --nnodes={args.nnodes} or drop --standalone.")
        if args.address:
            raise ConfigError("--standalone starts a local Ray; drop --address or drop --standalone.")
    nproc = _int("--nproc-per-node", args.nproc_per_node, 1)
    max_restarts = _int("--max-restarts", args.max_restarts, -1)
    run_id = args.rdzv_id or f"ray-elastic-{uuid.uuid4().hex[:8]}"
    if not all(c.isalnum() or c in "-_." for c in run_id):
        raise ConfigError(f"--rdzv-id={run_id!r} may only hold letters, digits, '-', '_' and '.'.")
    conf = _parse_rdzv_conf(args.rdzv_conf)
    join_timeout = 600.0
    if "join_timeout" in conf:
        join_timeout = float(_int("--rdzv-conf join_timeout", conf.pop("join_timeout"), 0))
    log_dir = None
    if args.log_dir:
        log_dir = str(Path(args.log_dir).resolve())
        try:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--log-dir {args.log_dir!r} cannot be created: {exc}.") from None
        if not os.access(log_dir, os.W_OK):
            raise ConfigError(f"--log-dir {args.log_dir!r} is not writable; choose another directory.")
    for name in _IGNORED:
        if getattr(args, name) is not None:
            print(f"ray-elastic: ignoring --{name.replace('_', '-')}: Ray places the workers and the "
                  f"coordinator hosts the store", file=sys.stderr)
    for key in conf:
        print(f"ray-elastic: ignoring --rdzv-conf {key}", file=sys.stderr)
    return LaunchPlan(
        min_nodes=min_nodes, max_nodes=max_nodes, nproc_per_node=nproc, max_restarts=max_restarts,
        run_id=run_id, standalone=args.standalone, address=args.address, use_gpu=args.use_gpu,
        wait_for_nodes_timeout_s=join_timeout,
        script=ScriptSpec(command=_script_command(args), no_python=args.no_python, cwd=os.getcwd(), log_dir=log_dir),
    )


def failure_exit_code(failure: FailureInfo | None) -> int:
    """The CLI's exit code for a failed run: the script's own (128+N if killed by signal N), else 1."""
    code = exit_code_of(failure.message) if failure is not None else None
    if code is None or code == 0:
        return 1
    return 128 - code if code < 0 else code


def describe_failure(error: TrainingFailedError) -> str:
    """A torchrun-like report: why the run gave up, then the root cause with its traceback."""
    lines = [f"ray-elastic: run failed: {error.reason} (restarts spent: {error.restarts})"]
    first = error.first_failure
    if first is not None:
        code = exit_code_of(first.message)
        lines += [
            "Root Cause (first observed failure):",
            f"  rank      : {first.rank} (node {first.node_id[:12]}, round {first.round_id})",
            f"  exitcode  : {code if code is not None else '-'} ({first.kind})",
            f"  message   : {first.message}",
            "  traceback :",
            *(f"    {line}" for line in (first.traceback.rstrip() or "(none)").splitlines()),
        ]
    others = [f for f in error.failures if f is not first]
    if others:
        lines.append("Other failures:")
        lines += [f"  {f.describe()}" for f in others]
    return "\n".join(lines)


def _quiet_ray_log_dedup() -> None:
    """Ray folds log lines that differ only in numbers; every rank's line matters here."""
    if "RAY_DEDUP_LOGS" in os.environ:
        return
    os.environ["RAY_DEDUP_LOGS"] = "0"
    try:
        import ray._private.ray_logging as ray_logging

        ray_logging.RAY_DEDUP_LOGS = False  # type: ignore[attr-defined]
    except (ImportError, AttributeError):
        pass


def execute(plan: LaunchPlan) -> int:
    """Run the plan on Ray; the process exit code."""
    import ray

    import ray_elastic

    _quiet_ray_log_dedup()
    owns_ray = not ray.is_initialized()
    if owns_ray and plan.standalone:
        ray.init(address="local", include_dashboard=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}})
    try:
        result = ray_elastic.run(
            run_script, config=plan.script, name=plan.run_id,
            min_nodes=plan.min_nodes, max_nodes=plan.max_nodes, nproc_per_node=plan.nproc_per_node,
            max_restarts=plan.max_restarts, use_gpu=plan.use_gpu,
            wait_for_nodes_timeout_s=plan.wait_for_nodes_timeout_s,
            hang_timeout_s=None,  # scripts do not report progress; torchrun has no hang watchdog either
            init_process_group=False, warmup_modules=(),  # the scripts run in subprocesses
            progress="log", ray_address=plan.address,
        )
    except ConfigError as exc:
        print(f"ray-elastic run: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except TrainingFailedError as exc:
        print(describe_failure(exc), file=sys.stderr, flush=True)
        return failure_exit_code(exc.first_failure)
    except (RunAbortedError, KeyboardInterrupt):
        print("ray-elastic: run interrupted", file=sys.stderr)
        return INTERRUPTED
    finally:
        if owns_ray and ray.is_initialized():
            ray.shutdown()
    print(f"ray-elastic: run {plan.run_id} succeeded: world size {len(result.return_values)}, "
          f"restarts spent {result.restarts}", file=sys.stderr, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `ray-elastic` and `python -m ray_elastic`; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else USAGE_ERROR
    if args.command == "stacks":
        from ray_elastic.diagnostics import print_stacks

        return print_stacks(args.run_name, args.address, args.timeout)
    try:
        plan = plan_launch(args)
    except ConfigError as exc:
        print(f"ray-elastic run: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    return execute(plan)

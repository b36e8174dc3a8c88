"""`ray-elastic run`'s command line: every flag of torchrun 2.13, with torchrun's `PET_<FLAG>` variables.

`TORCHRUN_FLAGS` lists each of torchrun's flags with what `ray-elastic run` does
with it: the flags with an `ignored` reason are accepted and ignored with one line
saying why; every other one has torchrun's meaning. A unit test compares the list
with torch's own parser (`torch.distributed.run.get_args_parser()`), so a flag
torchrun adds fails the suite until it is handled here.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ray_elastic.errors import ConfigError


@dataclass(frozen=True)
class Flag:
    """One torchrun flag: its spellings, its `PET_` name, and what we do with it."""

    names: tuple[str, ...]
    default: Any = None
    switch: bool = False  # takes no value (torchrun's check_env flags)
    choices: tuple[str, ...] | None = None
    help: str = ""
    ignored: str | None = None  # accepted and ignored: why (printed when the flag is given)

    @property
    def dest(self) -> str:
        longest = next(n for n in self.names if n.startswith("--"))
        return longest[2:].replace("-", "_")

    @property
    def env_name(self) -> str:
        return f"PET_{self.dest.upper()}"


_PLACED = "Ray places the nodes and the launcher hosts a fresh store every round"

TORCHRUN_FLAGS: tuple[Flag, ...] = (
    Flag(("--nnodes",), "1:1", help="MIN:MAX nodes, or N for N:N (default 1:1)"),
    Flag(("--nproc-per-node", "--nproc_per_node"), "1",
         help="processes per node: a number, or auto, cpu, gpu, xpu (counted on the node) (default 1)"),
    Flag(("--rdzv-backend", "--rdzv_backend"), "static", ignored=_PLACED),
    Flag(("--rdzv-endpoint", "--rdzv_endpoint"), "", ignored=_PLACED),
    Flag(("--rdzv-id", "--rdzv_id"), "none", help="run id (TORCHELASTIC_RUN_ID); default: a fresh one"),
    Flag(("--rdzv-conf", "--rdzv_conf"), "", help="key=value,...; join_timeout=SECONDS: wait this long for MIN "
                                                   "nodes (default 600); other keys are ignored"),
    Flag(("--standalone",), False, switch=True, help="one node, this machine, no Ray (--nnodes=1)"),
    Flag(("--max-restarts", "--max_restarts"), "0", help="failures tolerated, -1 for unlimited (default 0)"),
    Flag(("--monitor-interval", "--monitor_interval"), "0.1",
         ignored="script exits are seen within 50 ms, whatever the interval"),
    Flag(("--start-method", "--start_method"), "spawn", choices=("spawn", "fork", "forkserver"),
         ignored="scripts always start as fresh processes, as with spawn"),
    Flag(("--event-log-handler", "--event_log_handler"), "null",
         ignored="events are printed as [ray_elastic] lines (the Python API writes them with event_log_path)"),
    Flag(("--role",), "default", help="ROLE_NAME of every script (default: default)"),
    Flag(("-m", "--module"), False, switch=True, help="run training_script as a module, like python -m"),
    Flag(("--no-python", "--no_python"), False, switch=True, help="run training_script as an executable"),
    Flag(("--run-path", "--run_path"), False, switch=True,
         help="run training_script with runpy.run_path in a fresh interpreter (wins over --no-python)"),
    Flag(("--log-dir", "--log_dir"), None,
         help="per-rank logs under DIR/<run-id>/attempt_<round>/<rank>/{stdout,stderr}.log and error.json"),
    Flag(("-r", "--redirects"), "0",
         help="streams sent to the log file only: 1 stdout, 2 stderr, 3 both; or per local rank, 0:1,1:2"),
    Flag(("-t", "--tee"), "0", help="streams sent to the log file and the console (format as --redirects)"),
    Flag(("--local-ranks-filter", "--local_ranks_filter"), "", help="local ranks shown on the console, e.g. 0,1"),
    Flag(("--duplicate-stdout-filters", "--duplicate_stdout_filters"), "",
         help="stdout lines containing any of these (a,b; ,, for a comma) also go to filtered_stdout.log"),
    Flag(("--duplicate-stderr-filters", "--duplicate_stderr_filters"), "",
         help="stderr lines containing any of these also go to filtered_stderr.log"),
    Flag(("--node-rank", "--node_rank"), "0", ignored="node ranks follow the order in which nodes joined"),
    Flag(("--master-addr", "--master_addr"), "127.0.0.1",
         help="MASTER_ADDR of a local run; on a Ray cluster, the coordinator's node"),
    Flag(("--master-port", "--master_port"), None,
         help="port of the store (MASTER_PORT) on the launcher's node, so tcp://host:PORT scripts work; "
              "default: a free port each round"),
    Flag(("--local-addr", "--local_addr"), None, help="address scripts of a local run reach the store at"),
    Flag(("--logs-specs", "--logs_specs"), None,
         ignored="the log layout is fixed: --log-dir/<run-id>/attempt_<round>/<rank>/"),
    Flag(("--numa-binding", "--numa_binding"), None, choices=("node", "socket", "exclusive", "core-complex"),
         help="bind each script near its GPU with numactl (nodes with GPUs; ignored on the others)"),
    Flag(("--signals-to-handle", "--signals_to_handle"), "SIGTERM,SIGINT,SIGHUP,SIGQUIT",
         help="signals the launcher forwards to the scripts before it stops them"),
    Flag(("--shutdown-timeout", "--shutdown_timeout"), None,
         help="seconds between the signal and SIGKILL when scripts are stopped "
              "(default: TORCH_ELASTIC_SHUTDOWN_TIMEOUT, else 1)"),
    Flag(("--virtual-local-rank", "--virtual_local_rank"), False, switch=True,
         help="LOCAL_RANK=0 for every script, each seeing only its own GPU"),
)

OWN_FLAGS: tuple[Flag, ...] = (
    Flag(("--address",), None, help="Ray cluster address (default: RAY_ADDRESS; 'local' starts a Ray on this "
                                    "machine; with neither, the run is local and needs no Ray)"),
    Flag(("--use-gpu", "--use_gpu"), False, switch=True, help="one GPU per process on a Ray cluster"),
)


def _switch_default(flag: Flag, env: Mapping[str, str]) -> bool:
    """torchrun's check_env: PET_<FLAG> set to a non-zero integer turns the switch on."""
    text = env.get(flag.env_name)
    if text is None:
        return bool(flag.default)
    try:
        return bool(int(text))
    except ValueError:
        raise ConfigError(f"{flag.env_name}={text!r} must be 0 or 1 (it sets {flag.names[-1]}).") from None


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    """The `ray-elastic` parser; torchrun's flags take their defaults from `PET_<FLAG>` in `env`.

    Raises:
        ConfigError: a PET_ switch that is not an integer.
    """
    parser = argparse.ArgumentParser(prog="ray-elastic", description="Elastic PyTorch training on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run", allow_abbrev=False,
        help="run a torchrun-style script elastically (torchrun's flags)",
        description="Run an unmodified torchrun script on this machine or on Ray nodes; scripts restart with "
                    "the new world after a failure or a membership change, as under torchrun. Every flag can "
                    "also be set with PET_<FLAG> (e.g. PET_NPROC_PER_NODE=4), as with torchrun; flags win.",
    )
    for flag in TORCHRUN_FLAGS + OWN_FLAGS:
        text = flag.help if not flag.ignored else f"accepted and ignored: {flag.ignored}"
        if flag.switch:
            default = _switch_default(flag, env) if flag in TORCHRUN_FLAGS else flag.default
            run.add_argument(*flag.names, dest=flag.dest, action="store_true", default=default, help=text)
        else:
            default = env.get(flag.env_name, flag.default) if flag in TORCHRUN_FLAGS else flag.default
            run.add_argument(*flag.names, dest=flag.dest, default=default, choices=flag.choices, help=text)
    run.add_argument("training_script", help="the script (or module with -m) every process runs")
    run.add_argument("training_script_args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    return parser


def given(args: argparse.Namespace, flag: Flag) -> bool:
    """Whether a flag was set (on the command line or by PET_<FLAG>) to something other than its default."""
    value = getattr(args, flag.dest)
    return value != flag.default and not (flag.default is None and value in ("", None))


# -- values -------------------------------------------------------------------------------------------------
def to_int(flag: str, text: Any, minimum: int) -> int:
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
    low = to_int("--nnodes", parts[0], 1)
    high = to_int("--nnodes", parts[-1], 1)
    if high < low:
        raise ConfigError(f"--nnodes={text}: MIN ({low}) must be <= MAX ({high}); write --nnodes={high}:{low}.")
    return low, high


def parse_rdzv_conf(text: str) -> dict[str, str]:
    """key=value,... (quotes around the whole value, as a shell-less caller may pass them, are dropped)."""
    conf = {}
    for item in filter(None, (part.strip() for part in text.strip().strip("'\"").split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--rdzv-conf entry {item!r} must be key=value.")
        conf[key.strip()] = value.strip()
    return conf


_STD_VALUE = re.compile(r"^[0123]$")
_STD_MAPPING = re.compile(r"^(\d:[0123],)*(\d:[0123])$")


def parse_std(flag: str, text: str) -> int | dict[int, int]:
    """torchrun's Std spec: "3" for every local rank, or "0:1,1:2" per local rank (1 out, 2 err, 3 both)."""
    text = str(text)
    if _STD_VALUE.match(text):
        return int(text)
    if _STD_MAPPING.match(text):
        return {int(rank): int(bits) for rank, bits in (item.split(":") for item in text.split(","))}
    raise ConfigError(f"{flag}={text!r} must be 0-3 (1 stdout, 2 stderr, 3 both) or per local rank, like 0:1,1:2.")


def parse_filters(text: Any) -> tuple[str, ...]:
    """torchrun's comma-separated filter list: ",," is a literal comma; an empty value means none."""
    if isinstance(text, (list, tuple)):
        return tuple(text)
    if not text:
        return ()
    placeholder = "\0"
    return tuple(item.replace(placeholder, ",") for item in str(text).replace(",,", placeholder).split(","))


def parse_local_ranks(text: str) -> frozenset[int] | None:
    if not text:
        return None
    try:
        ranks = frozenset(int(item) for item in str(text).split(","))
    except ValueError:
        raise ConfigError(f"--local-ranks-filter={text!r} must be local ranks separated by commas, "
                          f"e.g. --local-ranks-filter=0,1.") from None
    return ranks


def parse_signals(text: str) -> tuple[int, ...]:
    """Signal names (SIGTERM,SIGUSR1) as numbers."""
    import signal

    numbers = []
    for name in filter(None, (part.strip() for part in str(text).split(","))):
        try:
            numbers.append(int(signal.Signals[name]))
        except KeyError:
            raise ConfigError(f"--signals-to-handle: {name!r} is not a signal name (like SIGTERM or SIGUSR1).") \
                from None
    return tuple(numbers)


def check_run_id(run_id: str) -> str:
    """A run id names a directory under --log-dir and Ray actors: no path tricks."""
    if not run_id or run_id in (".", "..") or not all(c.isalnum() or c in "-_." for c in run_id):
        raise ConfigError(f"--rdzv-id={run_id!r} may only hold letters, digits, '-', '_' and '.', and may not be "
                          f"'.' or '..' (it names a directory under --log-dir).")
    return run_id

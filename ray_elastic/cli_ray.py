"""`ray-elastic run` on a Ray cluster: one worker actor per process slot, each running the script.

The CLI connects (or starts a Ray on this machine with `--address=local`), counts
`--nproc-per-node=auto|cpu|gpu` on the cluster's nodes, opens the output channel
the scripts' lines come back through, and hands `launcher.run_script` to
`ray_elastic.run`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

from ray_elastic.cli import LaunchPlan, _report, replace_output
from ray_elastic.cli_output import OutputServer, shared_console
from ray_elastic.errors import ConfigError, RunAbortedError, TrainingFailedError
from ray_elastic.launcher import run_script


def cluster_nproc(spec: str, nodes: list[Mapping[str, Any]]) -> tuple[int, bool]:
    """--nproc-per-node=auto|cpu|gpu on a cluster: (processes per node, one GPU each?).

    Counted on the alive nodes that have the resource; the smallest such node sets the count,
    so every one of them can hold a node group.

    Raises:
        ConfigError: gpu asked and no node has a GPU.
    """
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    gpus = [int(r.get("GPU", 0)) for r in alive if r.get("GPU", 0) >= 1]
    if spec == "gpu" or (spec == "auto" and gpus):
        if not gpus:
            raise ConfigError("--nproc-per-node=gpu: no node of the Ray cluster has a GPU; give a number.")
        return min(gpus), True
    cpus = [int(r.get("CPU", 0)) for r in alive if r.get("CPU", 0) >= 1]
    if not cpus:
        raise ConfigError(f"--nproc-per-node={spec}: no node of the Ray cluster has a CPU; give a number.")
    return min(cpus), False


def _connect(plan: LaunchPlan) -> bool:
    """Connect to the plan's cluster (or start a Ray here); True if this call started the connection."""
    import ray

    from ray_elastic import api

    if ray.is_initialized():
        return False
    if plan.address == "local":
        assert isinstance(plan.nproc_per_node, int)
        # A Ray of this machine places nproc_per_node scripts whatever the CPU count, as torchrun does.
        ray.init(address="local", include_dashboard=False,
                 num_cpus=max(os.cpu_count() or 1, plan.nproc_per_node * plan.max_nodes))
    else:
        api._connect(plan.address)
    return True


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


def _hosts() -> dict[str, str]:
    import ray

    try:
        return {n["NodeID"]: str(n.get("NodeManagerHostname") or n.get("NodeManagerAddress")) for n in ray.nodes()}
    except Exception:  # noqa: BLE001 - names are cosmetic
        return {}


def _install(signals: tuple[int, ...], received: list[int]) -> dict[int, Any]:
    """Record the handled signals the CLI gets (the run is aborted from the main loop, not the handler:
    an exception raised inside Ray's own waits breaks them)."""

    def handler(signum: int, _frame: Any) -> None:
        received.append(signum)

    previous: dict[int, Any] = {}
    if threading.current_thread() is not threading.main_thread():
        return previous
    for signum in signals:
        try:
            previous[signum] = signal.signal(signum, handler)
        except (OSError, ValueError):
            continue
    return previous


def _run_until_signalled(plan: LaunchPlan, run: Callable[[], Any], received: list[int]) -> Any:
    """Run `run()` in a thread; on a handled signal, abort the run (its scripts get SIGTERM) and wait for it.

    Returns:
        run()'s result.

    Raises:
        whatever run() raised (RunAbortedError after a signal).
    """
    import ray

    from ray_elastic.api import coordinator_name

    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = run()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            box["error"] = exc

    runner = threading.Thread(target=target, name="ray_elastic-cli-run", daemon=True)
    runner.start()
    aborted = False
    while runner.is_alive():
        runner.join(0.1)
        if received and not aborted:
            try:  # the coordinator may not exist yet: try again on the next turn
                ray.get_actor(coordinator_name(plan.run_id)).abort.remote(
                    f"the launcher got {signal.Signals(received[0]).name}")
                aborted = True
            except ValueError:
                continue
    if "error" in box:
        raise box["error"]
    return box["result"]


def execute_on_ray(plan: LaunchPlan) -> int:
    """Run the plan on Ray; the process exit code."""
    import ray

    import ray_elastic

    _quiet_ray_log_dedup()
    owns_ray = False
    server = None
    nproc: int | str = plan.nproc_per_node
    received: list[int] = []
    previous: dict[int, Any] = {}
    stack = contextlib.ExitStack()
    try:
        owns_ray = _connect(plan)
        previous = _install(plan.signals, received)  # after ray.init, which sets handlers of its own
        use_gpu = plan.use_gpu
        if isinstance(nproc, str):
            nproc, gpus = cluster_nproc(nproc, ray.nodes())
            use_gpu = use_gpu or gpus
            print(f"ray-elastic: using nproc_per_node={nproc} ({plan.nproc_per_node}, counted on the cluster's "
                  f"nodes)", file=sys.stderr)
        console = stack.enter_context(shared_console())
        server = OutputServer(ray.util.get_node_ip_address(), console)
        plan = replace_output(plan, channel=server.channel)
        script, per_node, gpu = plan.script, nproc, use_gpu
        result = _run_until_signalled(plan, lambda: ray_elastic.run(
            run_script, config=script, name=plan.run_id,
            min_nodes=plan.min_nodes, max_nodes=plan.max_nodes, nproc_per_node=per_node,
            max_restarts=plan.max_restarts, use_gpu=gpu,
            wait_for_nodes_timeout_s=plan.wait_for_nodes_timeout_s,
            hang_timeout_s=None,  # scripts do not report progress; torchrun has no hang watchdog either
            abort_timeout_s=plan.abort_timeout_s,
            init_process_group=False, warmup_modules=(),  # the scripts run in subprocesses
            replacement_wait_s=0.0,  # every script restarts, and scripts report no progress to wait for
            progress="log", store_port=plan.store_port,
        ), received)
    except ConfigError as exc:
        print(f"ray-elastic run: error: {exc}", file=sys.stderr)
        return 2
    except TrainingFailedError as exc:
        hosts = _hosts()
        return _report(plan, exc, None, hosts, nproc if isinstance(nproc, int) else 1, 0, exc.restarts)
    except (RunAbortedError, KeyboardInterrupt):
        return _report(plan, RunAbortedError("interrupted"), received[0] if received else None, {}, 1, 0, 0)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if server is not None:
            server.close()
        stack.close()
        if owns_ray and ray.is_initialized():
            ray.shutdown()
    return _report(plan, None, None, {}, 1, len(result.return_values), result.restarts)

"""Ray's own autoscaler on one machine (its fake multi-node provider), stopped without `ray stop`.

`ray.cluster_utils.AutoscalingCluster` does the same, but it runs `ray stop --force` on start and on
shutdown (which stops every Ray on the machine), and in the Ray 2.60 wheel it reads a defaults file
(`fake_multi_node/example.yaml`) that the wheel does not ship. This class writes the whole config
itself, starts the head on a free port with its own marker in the environment of every process it
starts (the autoscaler's monitor, and through it every node the fake provider launches), and on
shutdown kills exactly the processes that carry the marker.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import psutil
import ray

from ray_elastic.testing.ports import free_port
from ray_elastic.testing.procs import marked_processes, with_descendants

MARKER = "RAY_ELASTIC_AUTOSCALING_CLUSTER"
# Node id the fake provider gives the head (Ray's own FAKE_HEAD_NODE_ID); worker ids count up from it.
FAKE_HEAD_NODE_ID = "f" * 51 + "00000"


def autoscaling_config(
    worker_types: Mapping[str, Mapping[str, Any]],
    head_resources: Mapping[str, float],
    gcs_address: str,
    autoscaler_v2: bool,
    idle_timeout_minutes: float,
) -> dict[str, Any]:
    """A complete cluster config for Ray's fake multi-node provider (nothing left to Ray's defaults)."""
    node_types: dict[str, Any] = {
        "ray.head.default": {"resources": dict(head_resources), "node_config": {}, "max_workers": 0},
    }
    for name, spec in worker_types.items():
        node_types[name] = {"node_config": {}, **spec}
    provider: dict[str, Any] = {
        # "external" naming the fake provider's class, rather than type "fake_multinode": the latter
        # makes autoscaler v2 merge in the defaults file missing from the wheel (v1 never reads it).
        "type": "external",
        "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
        "use_node_id_as_ip": True,
        "disable_node_updaters": True,
        "disable_launch_config_check": True,
        "gcs_address": gcs_address,
    }
    if autoscaler_v2:
        provider.update({"launch_multiple": True, "head_node_id": FAKE_HEAD_NODE_ID})
    else:
        # v1 launches in background threads by default; two launches at once stalled its loop here.
        provider["foreground_node_launch"] = True
    return {
        "cluster_name": f"fake-{uuid.uuid4().hex[:8]}",
        "max_workers": sum(int(spec.get("max_workers", 0)) for spec in worker_types.values()),
        "provider": provider,
        "available_node_types": node_types,
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


class LocalAutoscalingCluster:
    """A CPU-less head whose autoscaler starts and stops simulated worker nodes on demand.

    Args:
        worker_types: node types the autoscaler may start, e.g.
            ``{"cpu2": {"resources": {"CPU": 2}, "min_workers": 0, "max_workers": 3}}``.
        autoscaler_v2: run Ray's autoscaler v2 (the one KubeRay uses) instead of v1.
        idle_timeout_minutes: an idle worker node is terminated after this long.
        system_config: the head's `_system_config` (health checks, ...).
    """

    def __init__(
        self,
        worker_types: Mapping[str, Mapping[str, Any]],
        autoscaler_v2: bool = False,
        idle_timeout_minutes: float = 1.0,
        system_config: Mapping[str, Any] | None = None,
    ):
        self.worker_types = worker_types
        self.autoscaler_v2 = autoscaler_v2
        self.idle_timeout_minutes = idle_timeout_minutes
        self.system_config = dict(system_config or {})
        self.marker = uuid.uuid4().hex
        self.address = ""
        self._dir = tempfile.mkdtemp(prefix="ray_elastic_autoscaling_")

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # RAY_AUTH_MODE explicit: with ~/.ray/auth_token present (any earlier local `ray.init()` writes
        # one), `ray start --head` would otherwise turn token authentication on, and a client without
        # the mode set could not connect.
        env.update({MARKER: self.marker, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                    "RAY_AUTH_MODE": env.get("RAY_AUTH_MODE", "disabled")})
        if self.autoscaler_v2:
            env.update({"RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
                        "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID})
        return env

    def start(self) -> str:
        """Start the head and its autoscaler; return the cluster address."""
        port = free_port("")
        host = ray.util.get_node_ip_address()
        self.address = f"{host}:{port}"
        config = autoscaling_config(self.worker_types, {"CPU": 0}, self.address, self.autoscaler_v2,
                                    self.idle_timeout_minutes)
        config_path = os.path.join(self._dir, "autoscaling.json")
        with open(config_path, "w", encoding="utf-8") as out:
            json.dump(config, out)
        ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
        cmd = [ray_cli, "start", "--head", f"--port={port}", f"--autoscaling-config={config_path}",
               "--num-cpus=0", "--include-dashboard=false", "--disable-usage-stats",
               f"--object-store-memory={80 * 1024 * 1024}"]
        if self.system_config:
            cmd.append(f"--system-config={json.dumps(self.system_config, separators=(',', ':'))}")
        subprocess.run(cmd, env=self._env(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return self.address

    def processes(self) -> list[psutil.Process]:
        """Every process of this cluster (they carry its marker in their environment, or descend from one that does)."""
        return marked_processes(MARKER, self.marker)

    def raylet_pids(self) -> set[int]:
        """Raylets of this cluster's nodes (Ray processes carry theirs as RAY_RAYLET_PID)."""
        pids = set()
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                if proc.name() == "raylet":
                    pids.add(proc.pid)
        return pids

    def worker_nodes(self) -> list[dict[str, Any]]:
        """Alive worker nodes as `ray.nodes()` lists them (this process must be connected)."""
        return [n for n in ray.nodes() if n["Alive"] and n["NodeID"] != FAKE_HEAD_NODE_ID
                and not n["Resources"].get("node:__internal_head__")]

    def kill_node(self, node_id: str) -> None:
        """Kill one worker node's processes outright, as a cloud provider does at a preemption deadline."""
        on_node = []
        for proc in self.processes():  # only this cluster's: every fake provider numbers its nodes alike
            with contextlib.suppress(psutil.Error, OSError):
                if proc.environ().get("RAY_OVERRIDE_NODE_ID_FOR_TESTING") == node_id:
                    on_node.append(proc)
        for proc in with_descendants(on_node):
            with contextlib.suppress(psutil.Error):
                proc.kill()

    def shutdown(self) -> None:
        procs = self.processes()
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(procs, timeout=10)
        shutil.rmtree(self._dir, ignore_errors=True)


@contextlib.contextmanager
def local_autoscaling_cluster(
    worker_types: Mapping[str, Mapping[str, Any]], connect: bool = True, timeout_s: float = 60.0, **kwargs: Any
) -> Iterator[LocalAutoscalingCluster]:
    """Start a `LocalAutoscalingCluster`, connect this process to it, and stop it (and only it) after."""
    cluster = LocalAutoscalingCluster(worker_types, **kwargs)
    try:
        cluster.start()
        if connect:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    ray.init(address=cluster.address)
                    break
                except ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()

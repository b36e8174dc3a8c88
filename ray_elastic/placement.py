"""Which Ray nodes can hold a node group, and pinning one placement group to each.

Nodes are identified by node id, never by IP: simulated nodes share one IP.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group

from ray_elastic.config import RunConfig
from ray_elastic.errors import ConfigError

NODE_ID_LABEL = "ray.io/node-id"
HEAD_RESOURCE = "node:__internal_head__"
logger = logging.getLogger("ray_elastic")


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    resources: Mapping[str, float]
    alive: bool
    address: str = ""  # the node IP Ray reports

    @property
    def is_head(self) -> bool:
        return HEAD_RESOURCE in self.resources


def cluster_nodes() -> list[NodeInfo]:
    return [
        NodeInfo(n["NodeID"], dict(n.get("Resources", {})), bool(n.get("Alive")), str(n.get("NodeManagerAddress", "")))
        for n in ray.nodes()
    ]


def fits(resources: Mapping[str, float], bundle: Mapping[str, float], count: int) -> bool:
    """True when a node with these total resources can hold `count` bundles."""
    return all(resources.get(name, 0.0) >= amount * count for name, amount in bundle.items())


def autoscaler_node_types() -> list[dict[str, float]] | None:
    """Resources of each node type the cluster's autoscaler may start; None when no autoscaler says.

    Read from the cluster config the autoscaler reports to the GCS (a private Ray API, as Ray Data
    uses it; any failure means "unknown").
    """
    try:
        from ray._private.state import state as ray_state

        config = ray_state.get_cluster_config()
    except Exception:  # noqa: BLE001 - unknown is an answer
        return None
    if config is None or not config.node_group_configs:
        return None
    return [{k: float(v) for k, v in group.resources.items()}
            for group in config.node_group_configs if group.max_count != 0]


def _runs_workers(resources: Mapping[str, float]) -> bool:
    return resources.get("CPU", 0) > 0 or resources.get("GPU", 0) > 0


def check_feasible(config: RunConfig, nodes: list[NodeInfo],
                   node_types: list[dict[str, float]] | None = None) -> int:
    """Fail fast when no node can ever hold a node group; return how many nodes can now.

    What could ever exist: the alive nodes, and the node types an autoscaler may add (`node_types`).
    With no autoscaler known and no node that can run a worker at all yet (a head with
    `--num-cpus=0` whose worker nodes are still starting), nothing is rejected: the run waits for
    nodes (`wait_for_nodes_timeout_s`).

    Raises:
        ConfigError: use_gpu without GPUs, or resources no node holds, with what to change.
    """
    alive = [n for n in nodes if n.alive]
    bundle = config.bundle
    fitting = [n for n in alive if fits(n.resources, bundle, config.nproc_per_node)]
    if fitting or any(fits(t, bundle, config.nproc_per_node) for t in node_types or ()):
        return len(fitting)
    if node_types is None and not any(_runs_workers(n.resources) for n in alive):
        return 0
    shapes = [dict(n.resources) for n in alive] + list(node_types or ())
    if config.use_gpu and not any(r.get("GPU", 0) > 0 for r in shapes):
        raise ConfigError(
            "use_gpu=True but the Ray cluster has no GPUs; set use_gpu=False or add GPU nodes."
        )
    largest = max(shapes, key=lambda r: r.get("CPU", 0), default={})
    shown = {k: v for k, v in largest.items() if not k.startswith("node:") and "memory" not in k}
    raise ConfigError(
        f"no node can hold nproc_per_node={config.nproc_per_node} worker(s) with "
        f"resources_per_worker={bundle} each; the largest node has {shown}. "
        f"Lower nproc_per_node or resources_per_worker, or add larger nodes."
    )


def pinned_group(node_id: str, bundle: Mapping[str, float], count: int, name: str) -> PlacementGroup:
    """A STRICT_PACK placement group of `count` bundles on exactly this node."""
    return placement_group(
        [dict(bundle) for _ in range(count)],
        strategy="STRICT_PACK",
        name=name,
        bundle_label_selector=[{NODE_ID_LABEL: node_id} for _ in range(count)],
    )

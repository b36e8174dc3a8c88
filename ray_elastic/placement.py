"""Which Ray nodes can hold a node group, and pinning one placement group to each.

Nodes are identified by node id, never by IP: simulated nodes share one IP.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
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


def autoscaler_node_types() -> list[dict[str, float]]:
    """Resources of the node types an autoscaler told Ray it can start (Ray's cluster config), if any."""
    try:
        cluster_config = ray._private.state.state.get_cluster_config()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - not every cluster reports one
        logger.debug("get_cluster_config failed", exc_info=True)
        return []
    if cluster_config is None:
        return []
    return [{k: float(v) for k, v in group.resources.items()}
            for group in cluster_config.node_group_configs if group.max_count != 0]


def check_feasible(config: RunConfig, nodes: list[NodeInfo], node_types: Sequence[Mapping[str, float]] = ()) -> int:
    """Fail fast when no node can ever hold a node group; return how many nodes can now.

    A cluster still to grow is not rejected: one with no worker node yet and a head that takes no
    work (an autoscaling cluster, or a head started with --num-cpus=0 whose workers are still
    coming), or whose autoscaler reports a node type (`node_types`) that could hold a node group.
    The run then waits for nodes (up to wait_for_nodes_timeout_s) while asking the autoscaler.

    Raises:
        ConfigError: use_gpu without GPUs, or resources no node holds, with what to change.
    """
    alive = [n for n in nodes if n.alive]
    bundle = config.bundle
    growing = not any(not n.is_head for n in alive) and not any(n.resources.get("CPU", 0) > 0 for n in alive)
    if growing or any(fits(t, bundle, config.nproc_per_node) for t in node_types):
        fitting = [n for n in alive if fits(n.resources, bundle, config.nproc_per_node)]
        return len(fitting)
    if config.use_gpu and not any(n.resources.get("GPU", 0) > 0 for n in alive):
        raise ConfigError(
            "use_gpu=True but the Ray cluster has no GPUs; set use_gpu=False or add GPU nodes."
        )
    fitting = [n for n in alive if fits(n.resources, bundle, config.nproc_per_node)]
    if not fitting:
        largest = max((dict(n.resources) for n in alive), key=lambda r: r.get("CPU", 0), default={})
        shown = {k: v for k, v in largest.items() if not k.startswith("node:") and "memory" not in k}
        raise ConfigError(
            f"no node can hold nproc_per_node={config.nproc_per_node} worker(s) with "
            f"resources_per_worker={bundle} each; the largest node has {shown}. "
            f"Lower nproc_per_node or resources_per_worker, or add larger nodes."
        )
    return len(fitting)


def pinned_group(node_id: str, bundle: Mapping[str, float], count: int, name: str) -> PlacementGroup:
    """A STRICT_PACK placement group of `count` bundles on exactly this node."""
    return placement_group(
        [dict(bundle) for _ in range(count)],
        strategy="STRICT_PACK",
        name=name,
        bundle_label_selector=[{NODE_ID_LABEL: node_id} for _ in range(count)],
    )

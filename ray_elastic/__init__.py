"""ray_elastic: elastic, fault-tolerant PyTorch training on Ray where survivors never restart.

The names below load on first use, so `ray-elastic run --standalone` (which needs neither Ray
nor the training API) starts without importing Ray.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray_elastic.api import RunResult, run
    from ray_elastic.context import TrainContext, get_context, report
    from ray_elastic.diagnostics import RankStack, stacks
    from ray_elastic.errors import (
        ConfigError,
        CoordinatorLostError,
        ElasticError,
        FailureInfo,
        NotEnoughNodesError,
        RunAbortedError,
        RunNameInUseError,
        SnapshotLostError,
        TrainingFailedError,
    )
    from ray_elastic.sampler import ElasticSampler
    from ray_elastic.state import State

__all__ = [
    "ConfigError",
    "CoordinatorLostError",
    "ElasticError",
    "ElasticSampler",
    "FailureInfo",
    "NotEnoughNodesError",
    "RankStack",
    "RunAbortedError",
    "RunNameInUseError",
    "RunResult",
    "SnapshotLostError",
    "State",
    "TrainContext",
    "TrainingFailedError",
    "get_context",
    "report",
    "run",
    "stacks",
]
_HOMES = {
    "ray_elastic.api": ("RunResult", "run"),
    "ray_elastic.context": ("TrainContext", "get_context", "report"),
    "ray_elastic.diagnostics": ("RankStack", "stacks"),
    "ray_elastic.errors": (
        "ConfigError", "CoordinatorLostError", "ElasticError", "FailureInfo", "NotEnoughNodesError",
        "RunAbortedError", "RunNameInUseError", "SnapshotLostError", "TrainingFailedError",
    ),
    "ray_elastic.sampler": ("ElasticSampler",),
    "ray_elastic.state": ("State",),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _HOME_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'ray_elastic' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

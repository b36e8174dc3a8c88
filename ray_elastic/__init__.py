"""ray_elastic: elastic, fault-tolerant PyTorch training on Ray where survivors never restart."""

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
    "RunAbortedError",
    "RankStack",
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
__version__ = "0.1.0"

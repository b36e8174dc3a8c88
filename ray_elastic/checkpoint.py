"""Durable checkpoints (placeholder until storage support lands)."""

from __future__ import annotations

from typing import Any

from ray_elastic.config import RunConfig
from ray_elastic.errors import ConfigError


class Checkpointer:
    @classmethod
    def for_run(cls, config: RunConfig) -> Checkpointer:
        raise ConfigError("storage_path is not supported yet")

    def maybe_save(self, holder: Any, context: Any) -> None:
        raise NotImplementedError

    def load_latest(self) -> Any:
        raise NotImplementedError

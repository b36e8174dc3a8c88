"""A DistributedSampler that re-shards the rest of an epoch when the world changes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ray_elastic.context import get_context


class ElasticSampler(torch.utils.data.Sampler[int]):
    """Yields this rank's share of the samples of the epoch not yet consumed.

    Put it in `State` and call `record_batch(batch_size)` after each step: the
    position (samples consumed by all ranks together) is committed with the
    state, and after a membership change the remaining samples are split across
    the new world, so no committed sample is repeated and none is skipped.

    Ranks' shares of what remains differ by at most one sample, so ranks may see a
    different number of batches at the end of an epoch; loop over
    `steps_left(batch_size)` global steps (the same on every rank) rather than
    over the loader, or a rank may wait in a collective the others skipped.

    Args:
        num_samples: dataset length.
        shuffle: permute each epoch (seeded by `seed + epoch`, identical on all ranks).
        seed: base seed.
    """

    def __init__(self, num_samples: int, shuffle: bool = True, seed: int = 0):
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.consumed = 0

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def _world(self) -> tuple[int, int]:
        ctx = get_context()
        return ctx.rank, ctx.world_size

    def __iter__(self) -> Iterator[int]:
        rank, world = self._world()
        remaining = self._order()[self.consumed:]
        return iter(remaining[rank::world])

    def __len__(self) -> int:
        rank, world = self._world()
        remaining = max(0, self.num_samples - self.consumed)
        return len(range(rank, remaining, world))

    def steps_left(self, batch_size: int) -> int:
        """Whole steps of `batch_size` per rank left in this epoch: the same number on every rank."""
        _, world = self._world()
        return max(0, self.num_samples - self.consumed) // (batch_size * world)

    def record_batch(self, batch_size: int) -> None:
        """Advance the position by one step of `batch_size` samples on every rank."""
        _, world = self._world()
        self.consumed = min(self.num_samples, self.consumed + batch_size * world)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its first sample (no-op if already there)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.consumed = 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]
        self.consumed = state["consumed"]
        self.seed = state["seed"]

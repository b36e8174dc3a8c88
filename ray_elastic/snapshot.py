"""This process's last committed snapshot, and how a commit fills it.

Two modes, chosen per run (`run(snapshot=...)`):

- ``"copy"`` (default): every tensor is copied into buffers the holder owns,
  reused from one commit to the next. Any loop shape is safe.
- ``"live"``: tensors that only an optimizer held in the State changes (its
  parameters and its state, such as momentum) are kept by reference, with their
  version counters; everything else (buffers, schedulers, plain values) is
  copied. The live tensors are the snapshot until they change: an optimizer
  step or any in-place write bumps a version, and from then on this process no
  longer holds its commit (`held_commit_id()` is -1); restore takes the commit
  from a rank that does. This is sound when `commit()` follows
  `optimizer.step()` with no collective in between: a peer lost before its
  step stops every survivor in the backward all-reduce, before their steps; a
  peer lost after it lets every survivor reach `commit()`, which snapshots
  before its own agreement all-reduce. The optimizer hooks below enforce that
  loop shape and raise `ConfigError` when it is broken.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

import torch
import torch.distributed as dist

from ray_elastic.config import SNAPSHOT_MODES
from ray_elastic.errors import ConfigError


def _copy_into(dst: Any, src: Any, borrowed: frozenset[int] = frozenset(),
               live_keys: frozenset[tuple[Any, ...]] | None = None, out_live: list[torch.Tensor] | None = None) -> Any:
    """Copy `src` (a state_dict tree) into `dst`, reusing its tensors of matching shape; return the copy.

    Tensors whose key is in `live_keys` are kept by reference instead and appended to `out_live`;
    tensors of `dst` whose id is in `borrowed` are such references, never written into.
    """
    if isinstance(src, torch.Tensor):
        if live_keys and src.numel() and _tensor_key(src) in live_keys:
            held = src.detach()  # shares storage and version counter
            if out_live is not None:
                out_live.append(held)
            return held
        if (isinstance(dst, torch.Tensor) and id(dst) not in borrowed
                and dst.shape == src.shape and dst.dtype == src.dtype):
            dst.copy_(src.detach(), non_blocking=False)
            return dst
        return src.detach().to("cpu", copy=True)
    if isinstance(src, dict):
        old = dst if isinstance(dst, dict) else {}
        return {k: _copy_into(old.get(k), v, borrowed, live_keys, out_live) for k, v in src.items()}
    if isinstance(src, (list, tuple)):
        old_seq = dst if isinstance(dst, (list, tuple)) and len(dst) == len(src) else [None] * len(src)
        items = [_copy_into(d, s, borrowed, live_keys, out_live) for d, s in zip(old_seq, src)]
        return items if isinstance(src, list) else tuple(items)
    return copy.deepcopy(src)


def _tensor_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    return (tensor.device, tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors only `optimizer.step()` should change: its parameters and its per-parameter state."""
    tensors = [p for group in optimizer.param_groups for p in group["params"]]
    for per_param in optimizer.state.values():
        tensors.extend(v for v in per_param.values() if isinstance(v, torch.Tensor))
    return tensors


def collective_count() -> int | None:
    """How many collectives the default process group has issued (None when unknown)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        group: Any = dist.distributed_c10d._get_default_group()
        return int(group._get_sequence_number_for_group())
    except (AttributeError, RuntimeError):
        return None


class SnapshotHolder:
    """This process's last committed snapshot; outlives rounds (train_fn re-entries)."""

    def __init__(self, mode: str = "copy", shard_replicas: int = 1, shard_replica_every: int = 1) -> None:
        if mode not in SNAPSHOT_MODES:
            raise ConfigError(f"snapshot must be one of {SNAPSHOT_MODES}, got {mode!r}.")
        self.mode = mode
        self.commit_id = -1
        self.items: dict[str, Any] = {}
        self.attrs: dict[str, Any] = {}
        self.world_size = 0
        self._live: list[tuple[torch.Tensor, int]] = []  # held by reference, with the version at commit
        # Optimizers whose tensors are held live (weak: a new optimizer may reuse a dead one's id).
        self._watched: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        self._dirty = False  # a watched optimizer stepped since the commit
        # Loop-shape checks of "live" mode, per commit interval.
        self._stepped: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        self._count_after_step: int | None = None
        self._hooked: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        # Sharded (FSDP2) state is held apart, by `ray_elastic.sharded.store.ShardStore` (created on first use).
        self.shard_replicas = shard_replicas
        self.shard_replica_every = shard_replica_every
        self.shards: Any = None

    # -- what is held -----------------------------------------------------------------------------
    def held_commit_id(self) -> int:
        """The commit this process can restore from memory, or -1 if live tensors moved on since."""
        if self._dirty or any(t._version != version for t, version in self._live):
            return -1
        return self.commit_id

    def as_payload(self) -> dict[str, Any]:
        return {"commit_id": self.commit_id, "items": self.items, "attrs": self.attrs, "world_size": self.world_size}

    def load_payload(self, payload: dict[str, Any]) -> None:
        """Hold `payload` (received or read from storage): owned tensors, nothing live."""
        self.commit_id = payload["commit_id"]
        self.items = payload["items"]
        self.attrs = payload["attrs"]
        self.world_size = payload["world_size"]
        self._forget_live()

    def _forget_live(self) -> None:
        self._live, self._watched, self._dirty = [], weakref.WeakSet(), False

    # -- commit -------------------------------------------------------------------------------------
    def take(self, stateful: dict[str, Any], attrs: dict[str, Any], world_size: int) -> None:
        """The local half of a commit: snapshot every item, then count the commit."""
        self.check_commit_follows_step()
        optimizers = [o for o in stateful.values() if isinstance(o, torch.optim.Optimizer)]
        live = self.mode == "live"
        live_keys = frozenset(_tensor_key(t) for o in optimizers for t in _optimizer_tensors(o)) if live else None
        borrowed = frozenset(id(t) for t, _ in self._live)
        held: list[torch.Tensor] = []
        for name, obj in stateful.items():
            self.items[name] = _copy_into(self.items.get(name), obj.state_dict(), borrowed, live_keys, held)
        self._live = [(t, t._version) for t in held]
        self._watched = weakref.WeakSet(optimizers if live else ())
        self._dirty = False
        self.attrs = copy.deepcopy(attrs)
        self.commit_id += 1
        self.world_size = world_size
        self.begin_interval()

    def begin_interval(self) -> None:
        """Start a new commit interval (after a commit, or on entering a round)."""
        self._stepped = weakref.WeakSet()
        self._count_after_step = None

    def rebaseline(self) -> None:
        """The live objects were just loaded from this snapshot: what they hold now is the commit."""
        self._live = [(t, t._version) for t, _ in self._live]
        self._dirty = False

    # -- optimizer hooks ("live" mode) --------------------------------------------------------------
    def track(self, optimizer: torch.optim.Optimizer) -> None:
        """Watch `optimizer.step()` (once per optimizer object) to enforce the live loop shape."""
        if self.mode != "live" or optimizer in self._hooked:
            return
        self._hooked.add(optimizer)
        optimizer.register_step_pre_hook(self._before_step)
        optimizer.register_step_post_hook(self._after_step)

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if optimizer in self._stepped:
            raise ConfigError(
                f"snapshot='live' needs state.commit() after every optimizer.step(), but "
                f"{type(optimizer).__name__} stepped twice since the last commit. Commit every step, "
                f"or run with snapshot='copy'."
            )
        self.check_commit_follows_step()
        self._stepped.add(optimizer)
        if optimizer in self._watched:
            self._dirty = True

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._count_after_step is None:
            self._count_after_step = collective_count()

    def check_commit_follows_step(self) -> None:
        """Raise if a collective ran since the first optimizer step of this interval ("live" mode)."""
        if self._count_after_step is None:
            return
        now = collective_count()
        if now is not None and now != self._count_after_step:
            raise ConfigError(
                "snapshot='live' needs state.commit() right after optimizer.step(), with no collective "
                "(all_reduce, barrier, ...) in between: a peer lost there would leave no rank holding the "
                "last commit. Move the collective before optimizer.step() or after state.commit(), or run "
                "with snapshot='copy'."
            )

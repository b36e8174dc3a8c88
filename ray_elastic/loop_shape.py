"""What the training loop does between two commits, as far as keeping the commit by reference depends on it.

Keeping optimizer-owned tensors by reference ("live", see `ray_elastic.snapshot`)
is sound for one loop shape: between two commits each optimizer steps at most
once, `commit()` follows that step with no collective in between, and nothing
but the optimizer writes the parameters. `LoopShape` watches each optimizer's
steps (hooks) and the default group's collective count, and checks during the
first commit intervals that the parameters are unchanged between a commit and
the next step (a checksum: writes through `.data` bypass version counters).

- ``"live"``: a break raises `ConfigError` saying what to change.
- ``"auto"``: commits are copies while the first `LEARN_INTERVALS` intervals are
  watched; then, if none broke the shape, live. The first break seen at any time
  switches the run to copies for good (no error).
- ``"copy"``: nothing is watched.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.distributed as dist

from ray_elastic.errors import ConfigError

LEARN_INTERVALS = 3  # commit intervals watched before "auto" keeps commits by reference


def collective_count() -> int | None:
    """How many collectives the default process group has issued (None when unknown)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        group: Any = dist.distributed_c10d._get_default_group()
        return int(group._get_sequence_number_for_group())
    except (AttributeError, RuntimeError):
        return None


def checksums(tensors: list[torch.Tensor]) -> list[int]:
    """A 64-bit wrapping sum of each tensor's bytes: changes with any single changed element.

    One read of every byte (~2 ms per 40 MB on one core here), no copy.
    """
    if not tensors:
        return []
    sums = [_checksum(t) for t in tensors]
    if len({s.device for s in sums}) == 1:
        return [int(s) for s in torch.stack(sums).tolist()]  # one device sync
    return [int(s.item()) for s in sums]


def _checksum(tensor: torch.Tensor) -> torch.Tensor:
    raw = tensor.detach().reshape(-1).view(torch.uint8)
    whole = raw.numel() // 8 * 8
    head = raw[:whole]
    try:
        part = head.view(torch.int64).sum()
    except RuntimeError:  # a view whose offset is not 8-byte aligned (a slice of a flat buffer)
        part = head.clone().view(torch.int64).sum()
    if whole < raw.numel():
        part = part + raw[whole:].to(torch.int64).sum()
    return part


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


class LoopShape:
    """Watches the loop of one worker process across rounds; decides, for "auto", how commits are kept.

    Args:
        mode: "copy", "live" or "auto".
        on_step: called with the optimizer before each of its steps (the holder marks its snapshot moved).
    """

    def __init__(self, mode: str, on_step: Any = None) -> None:
        self.mode = mode
        self._on_step = on_step
        self.intervals = 0  # commit intervals completed without a break
        self.broken: str | None = None  # why "auto" keeps copies (the first break seen)
        self.broken_at_step: Any = None
        self._hooked: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        self._stepped: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        self._count_after_step: int | None = None
        self._write_check: list[tuple[torch.Tensor, int]] = []  # parameters and their checksums at the commit
        self.step_hint: Any = None  # the State's `step` attribute at the last commit, for messages

    # -- decisions ------------------------------------------------------------------------------------
    @property
    def watching(self) -> bool:
        return self.mode in ("live", "auto")

    def live_commit(self) -> bool:
        """Whether the commit being taken keeps optimizer-owned tensors by reference."""
        if self.mode == "live":
            return True
        return self.mode == "auto" and self.broken is None and self.intervals >= LEARN_INTERVALS

    def learning(self) -> bool:
        """Still checking for parameter writes between a commit and the next step."""
        return self.watching and self.broken is None and self.intervals < LEARN_INTERVALS

    def describe(self) -> tuple[str, str]:
        """(mode in use: "copy" | "live" | "auto", why); "auto" while still watching the first intervals."""
        if self.mode == "copy":
            return "copy", "snapshot='copy' was asked for"
        if self.mode == "live":
            return "live", "snapshot='live' was asked for"
        if self.broken is not None:
            where = "" if self.broken_at_step is None else f" (after step {self.broken_at_step})"
            return "copy", f"snapshot='auto' keeps copies: {self.broken}{where}"
        if self.intervals >= LEARN_INTERVALS:
            return "live", ("snapshot='auto' keeps optimizer state by reference: commit() follows each "
                            "optimizer.step() with no collective in between")
        return "auto", "snapshot='auto' is watching the first commits"

    def _violation(self, live_message: str, auto_reason: str) -> None:
        if self.mode == "live":
            raise ConfigError(live_message)
        if self.mode == "auto" and self.broken is None:
            self.broken = auto_reason
            self.broken_at_step = self.step_hint

    # -- the loop ------------------------------------------------------------------------------------
    def track(self, optimizer: torch.optim.Optimizer) -> None:
        """Watch `optimizer.step()` (once per optimizer object)."""
        if not self.watching or optimizer in self._hooked:
            return
        self._hooked.add(optimizer)
        optimizer.register_step_pre_hook(self._before_step)
        optimizer.register_step_post_hook(self._after_step)

    def begin_interval(self, params: list[torch.Tensor] | None = None) -> None:
        """Start a commit interval; with `params`, check they are unchanged at the next step (while learning)."""
        self._stepped = weakref.WeakSet()
        self._count_after_step = None
        self._write_check = []
        if params and self.learning():
            detached = [p.detach() for p in params]
            self._write_check = list(zip(detached, checksums(detached)))

    def before_commit(self) -> None:
        """Check the interval that ends with this commit; count it if it kept the shape."""
        self._check_no_collective_since_step()
        if self.broken is None:
            self.intervals += 1

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if optimizer in self._stepped:
            self._violation(
                f"snapshot='live' needs state.commit() after every optimizer.step(), but "
                f"{type(optimizer).__name__} stepped twice since the last commit. Commit every step, "
                f"or run with snapshot='copy' (or 'auto', which picks copies for such loops).",
                "the optimizer steps more than once between two commits",
            )
        self._check_no_collective_since_step()
        if self._write_check:
            tensors = [t for t, _ in self._write_check]
            before = [s for _, s in self._write_check]
            self._write_check = []
            if checksums(tensors) != before:
                self._violation(
                    "snapshot='live' needs the parameters left alone between state.commit() and the next "
                    "optimizer.step(), but they changed (a write through .data or outside the optimizer). "
                    "Make that change before commit(), or run with snapshot='copy'.",
                    "the parameters change between a commit and the next optimizer step",
                )
        self._stepped.add(optimizer)
        if self._on_step is not None:
            self._on_step(optimizer)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._count_after_step is None:
            self._count_after_step = collective_count()

    def _check_no_collective_since_step(self) -> None:
        if self._count_after_step is None:
            return
        now = collective_count()
        if now is not None and now != self._count_after_step:
            self._count_after_step = now  # one report per collective
            self._violation(
                "snapshot='live' needs state.commit() right after optimizer.step(), with no collective "
                "(all_reduce, barrier, ...) in between: a peer lost there would leave no rank holding the "
                "last commit. Move the collective before optimizer.step() or after state.commit(), or run "
                "with snapshot='copy'.",
                "a collective runs between optimizer.step() and commit()",
            )

"""Showing a run's progress where the user is: a live bar in notebooks, log lines elsewhere.

`run(progress="auto")` picks by where the driver runs:

- Jupyter (an IPython kernel): a tqdm bar, a widget when ipywidgets is installed,
  else tqdm's text bar; without tqdm, log lines.
- a terminal, or no terminal at all (`ray job submit`, CI, a pipe): plain
  `[ray_elastic] ...` lines on stderr, one per event plus a status line at most
  every `status_interval_s` while training moves; no carriage returns or colours.
"""

from __future__ import annotations

import sys
import time
import warnings
from typing import Any

_BAR_EVENTS = (
    "round_formed", "restart", "scale_up", "scale_down", "drain", "waiting", "commit_lost", "failed", "aborted",
)


def in_notebook() -> bool:
    """True when running in a Jupyter kernel (IPython's ZMQ shell, or a subclass such as Colab's)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - any failure means "not a notebook"
        return False
    return shell is not None and any(cls.__name__ == "ZMQInteractiveShell" for cls in type(shell).__mro__)


def is_shown(event: Any, started: bool) -> bool:
    """Whether a display prints this event: not a "waiting" that awaits no missing node (workers of
    existing nodes starting), nor "node ready" before the first round (the round's line counts them)."""
    if event.kind == "waiting" and event.data.get("missing", 1) == 0:
        return False
    return not (event.kind == "node_ready" and not started)


def _status(snapshot: dict[str, Any]) -> str:
    metrics = snapshot.get("metrics") or {}
    parts = [f"step {metrics['step']}"] if "step" in metrics else []
    if isinstance(metrics.get("loss"), (int, float)):
        parts.append(f"loss {metrics['loss']:.4g}")
    parts += [f"world size {snapshot['world_size']}", f"restarts {snapshot['restarts']}"]
    return ", ".join(parts)


class LogProgress:
    """Plain lines: every event, and a status line at most every `status_interval_s` while steps move.

    Args:
        stream: where to write (default: stderr at the time of each write).
        status_interval_s: minimum seconds between two status lines.
    """

    interval_s = 1.0

    def __init__(self, stream: Any = None, status_interval_s: float = 10.0):
        self.stream = stream
        self.status_interval_s = status_interval_s
        self._last_status_at = time.monotonic()
        self._last_status = ""
        self._started = False  # a round has formed

    def _write(self, line: str) -> None:
        print(f"[ray_elastic] {line}", file=self.stream or sys.stderr, flush=True)

    def update(self, snapshot: dict[str, Any]) -> None:
        for event in snapshot["events"]:
            if is_shown(event, self._started):
                self._write(event.message)
            self._started = self._started or event.kind == "round_formed"
        now = time.monotonic()
        status = _status(snapshot)
        moving = snapshot["state"] == "RUNNING" and "step" in (snapshot.get("metrics") or {})
        if moving and status != self._last_status and (
            now - self._last_status_at >= self.status_interval_s
        ):
            self._write(status)
            self._last_status, self._last_status_at = status, now

    def close(self) -> None:
        pass


class BarProgress:
    """A live tqdm bar counting rank 0's reported steps, with state, size, budget and loss beside it.

    Uses `tqdm.auto` (a widget in Jupyter with ipywidgets); when the widget cannot be
    made, tqdm's text bar. Raises ImportError without tqdm.
    """

    interval_s = 0.5

    def __init__(self, stream: Any = None) -> None:
        from tqdm import std

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", std.TqdmWarning)  # "IProgress not found": fall back below
                from tqdm.auto import tqdm

            self.bar = tqdm(total=None, desc="ray_elastic", unit="step", file=stream)
        except ImportError:
            self.bar = std.tqdm(total=None, desc="ray_elastic", unit="step", file=stream)
        self._stream = stream
        self._step = 0
        self._started = False

    def update(self, snapshot: dict[str, Any]) -> None:
        metrics = snapshot.get("metrics") or {}
        step = metrics.get("step")
        if isinstance(step, int) and step != self._step:
            if step > self._step:
                self.bar.update(step - self._step)
            else:  # rolled back to an earlier commit
                self.bar.n = step
            self._step = step
        shown: dict[str, Any] = {"state": snapshot["state"], "world": snapshot["world_size"],
                                 "restarts": snapshot["restarts"]}
        if isinstance(metrics.get("loss"), (int, float)):
            shown["loss"] = f"{metrics['loss']:.4g}"
        self.bar.set_postfix(shown, refresh=True)
        for event in snapshot["events"]:
            if event.kind in _BAR_EVENTS and is_shown(event, self._started):
                self.bar.write(f"[ray_elastic] {event.message}", file=self._stream)
            self._started = self._started or event.kind == "round_formed"

    def close(self) -> None:
        self.bar.close()


class NoProgress:
    """Shows nothing."""

    interval_s = 0.5

    def update(self, snapshot: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def make_progress(mode: str) -> LogProgress | BarProgress | NoProgress:
    """Return the display for `mode`: "auto" (bar in Jupyter, lines elsewhere), "bar", "log" or "none".

    "bar" falls back to log lines when tqdm is not installed.
    """
    if mode == "auto":
        mode = "bar" if in_notebook() else "log"
    if mode == "bar":
        try:
            return BarProgress()
        except ImportError:
            return LogProgress()
    if mode == "log":
        return LogProgress()
    return NoProgress()

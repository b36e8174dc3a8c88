"""Showing a run's progress where the user is: a live bar in notebooks, log lines elsewhere."""

from __future__ import annotations

import sys
from typing import Any


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    try:
        ip = shell.get_ipython()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001
        return False
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


class LogProgress:
    """Concise lines on state changes and events (terminals, `ray job submit`)."""

    interval_s = 1.0

    def __init__(self, stream: Any = None):
        self.stream = stream or sys.stderr
        self._last = ""

    def update(self, snapshot: dict[str, Any]) -> None:
        for event in snapshot["events"]:
            print(f"[ray_elastic] {event.message}", file=self.stream, flush=True)
        line = (f"{snapshot['state']} round={snapshot['round_id']} world_size={snapshot['world_size']} "
                f"restarts={snapshot['restarts']}")
        if line != self._last and not snapshot["events"]:
            self._last = line

    def close(self) -> None:
        pass


class BarProgress:
    """A live tqdm bar (notebook widget where available) showing step, loss, size and budget."""

    interval_s = 0.5

    def __init__(self) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=None, desc="ray_elastic", unit="step")
        self._step = 0

    def update(self, snapshot: dict[str, Any]) -> None:
        metrics = snapshot.get("metrics") or {}
        step = metrics.get("step")
        if isinstance(step, int) and step > self._step:
            self.bar.update(step - self._step)
            self._step = step
        shown = {"state": snapshot["state"], "world": snapshot["world_size"], "restarts": snapshot["restarts"]}
        if "loss" in metrics:
            shown["loss"] = f"{metrics['loss']:.4g}"
        self.bar.set_postfix(shown, refresh=True)
        for event in snapshot["events"]:
            if event.kind in ("round_formed", "restart", "failed", "waiting", "scale_up"):
                self.bar.write(f"[ray_elastic] {event.message}")

    def close(self) -> None:
        self.bar.close()


class NoProgress:
    interval_s = 0.5

    def update(self, snapshot: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def make_progress(mode: str) -> Any:
    """"auto": a bar in Jupyter (if tqdm is installed), log lines elsewhere."""
    if mode == "auto":
        mode = "bar" if _in_notebook() else "log"
    if mode == "bar":
        try:
            return BarProgress()
        except ImportError:
            return LogProgress()
    if mode == "log":
        return LogProgress()
    return NoProgress()

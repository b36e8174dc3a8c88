"""Which progress display `make_progress` picks, in a real kernel, a real terminal and a pipe."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys

import pytest

from ray_elastic.events import Event
from ray_elastic.progress import BarProgress, LogProgress, NoProgress, make_progress

pytestmark = pytest.mark.timeout(120)

PICK = "from ray_elastic.progress import make_progress; print('picked', type(make_progress('auto')).__name__)"


def _snapshot(step: int, events: list[Event] = (), state: str = "RUNNING") -> dict:
    return {"state": state, "round_id": 0, "world_size": 2, "num_nodes": 2, "restarts": 0,
            "metrics": {"step": step, "loss": 0.5}, "events": list(events)}


def test_auto_picks_log_lines_when_output_is_a_pipe():
    """As under `ray job submit`, CI or `python train.py | tee`: no terminal at all."""
    out = subprocess.run([sys.executable, "-c", PICK], capture_output=True, text=True, timeout=60, check=True)
    assert "picked LogProgress" in out.stdout


def test_auto_picks_log_lines_in_a_terminal():
    pid, fd = pty.fork()
    if pid == 0:  # child: stdin/stdout/stderr are the pty
        os.execv(sys.executable, [sys.executable, "-c", PICK])
    chunks = []
    while True:
        try:
            data = os.read(fd, 1024)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.waitpid(pid, 0)
    assert "picked LogProgress" in b"".join(chunks).decode()


@pytest.mark.parametrize(
    ("setup", "bar_kind"),
    [("", "widget"), ("import sys; sys.modules['ipywidgets'] = None  # as if not installed", "text")],
    ids=["widget", "no-ipywidgets"],
)
def test_auto_picks_a_bar_in_a_jupyter_kernel(setup, bar_kind):
    jupyter_client = pytest.importorskip("jupyter_client")
    pytest.importorskip("ipykernel")
    pytest.importorskip("ipywidgets")
    code = f"""{setup}
import warnings
warnings.simplefilter("error")  # a fallback must be quiet
from ray_elastic.progress import make_progress
display = make_progress("auto")
display.update({{"state": "RUNNING", "world_size": 2, "restarts": 0, "metrics": {{"step": 3}}, "events": []}})
display.close()
widget = any(cls.__module__ == "tqdm.notebook" for cls in type(display.bar).__mro__)
print("picked", type(display).__name__, "widget" if widget else "text")
"""
    outputs: list[str] = []
    manager, client = jupyter_client.manager.start_new_kernel(kernel_name="python3")
    try:
        reply = client.execute_interactive(code, timeout=60, output_hook=_collect(outputs))
        assert reply["content"]["status"] == "ok", reply["content"]
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    assert f"picked BarProgress {bar_kind}" in "".join(outputs), outputs


def _collect(outputs: list[str]):
    def hook(msg: dict) -> None:
        if msg["msg_type"] == "stream":
            outputs.append(msg["content"]["text"])

    return hook


def test_explicit_modes():
    assert isinstance(make_progress("log"), LogProgress)
    assert isinstance(make_progress("none"), NoProgress)
    bar = make_progress("bar")
    assert isinstance(bar, BarProgress)
    bar.close()


def test_log_lines_are_plain_events_and_rate_limited_status():
    stream = io.StringIO()
    display = LogProgress(stream=stream, status_interval_s=0.0)
    formed = Event("round_formed", "r", 0, "FORMING", "round 0: 2 node(s), world size 2 (start)")
    display.update(_snapshot(3, [formed]))
    display.update(_snapshot(3))  # nothing new: no repeated status
    lines = stream.getvalue().splitlines()
    assert lines == [
        "[ray_elastic] round 0: 2 node(s), world size 2 (start)",
        "[ray_elastic] step 3, loss 0.5, world size 2, restarts 0",
    ]
    quiet = LogProgress(stream=io.StringIO(), status_interval_s=3600)
    quiet.update(_snapshot(4))
    assert quiet.stream.getvalue() == "", "status lines wait for status_interval_s"
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()


def test_bar_counts_steps_and_follows_a_rollback():
    stream = io.StringIO()
    bar = BarProgress(stream=stream)
    bar.update(_snapshot(5))
    assert bar.bar.n == 5
    bar.update(_snapshot(3))  # resumed from an earlier commit
    assert bar.bar.n == 3
    bar.update(_snapshot(7, [Event("restart", "r", 0, "RESTARTING", "round 0 failed")]))
    assert bar.bar.n == 7
    bar.close()
    text = stream.getvalue()
    assert "ray_elastic" in text and "restarts=0" in text and "[ray_elastic] round 0 failed" in text


def test_log_lines_leave_out_waits_for_nothing_and_nodes_counted_by_the_round_line():
    """Issue 14: starting the workers of nodes that exist is not a wait for nodes, and the first round's
    line says how many nodes there are; a real wait, and a node joining a running run, are shown."""
    out = io.StringIO()
    display = LogProgress(stream=out)
    display.update(_snapshot(0, [
        Event("waiting", "r", -1, "WAITING", "starting workers on 1 node(s)", data={"missing": 0}),
        Event("node_ready", "r", -1, "WAITING", "node abc ready to join"),
        Event("round_formed", "r", 0, "FORMING", "round 0: 1 node(s), world size 2 (start)"),
        Event("node_ready", "r", 0, "RUNNING", "node def ready to join"),
        Event("waiting", "r", 0, "WAITING", "waiting for 1 more node(s)", data={"missing": 1}),
    ], state="WAITING"))
    assert out.getvalue().splitlines() == [
        "[ray_elastic] round 0: 1 node(s), world size 2 (start)",
        "[ray_elastic] node def ready to join",
        "[ray_elastic] waiting for 1 more node(s)",
    ]

"""The worker's lease and checkpoint fence, the native pulse, and the stack helpers (no Ray)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from ray_elastic.checkpoint import Checkpointer
from ray_elastic.diagnostics import (
    collective_state,
    compare_collectives,
    first_user_frame,
    gil_holder,
    py_spy_dump,
    py_spy_failure,
    py_spy_path,
    thread_stack,
)
from ray_elastic.pulse import ALIVE, GONE, SILENT, PulseServer, ping
from ray_elastic.worker.fence import FencedCheckpointer, Lease, RoundFenced

pytestmark = pytest.mark.timeout(60)


# -- lease ---------------------------------------------------------------------------------------------
def test_fresh_lease_lets_the_worker_publish_at_once():
    lease = Lease(timeout_s=2.0, confirm_s=5.0)
    lease.begin(3)
    started = time.monotonic()
    lease.check(3, "publish")
    assert time.monotonic() - started < 0.1


def test_expired_lease_waits_for_two_probes_then_goes_on():
    lease = Lease(timeout_s=0.2, confirm_s=5.0)
    lease.begin(3)
    time.sleep(0.3)

    def coordinator_still_probes() -> None:
        for _ in range(2):
            time.sleep(0.1)
            lease.renew(3)

    threading.Thread(target=coordinator_still_probes).start()
    started = time.monotonic()
    lease.check(3, "publish")
    assert 0.15 < time.monotonic() - started < 2.0


def test_expired_lease_with_one_late_probe_only_is_fenced():
    """The probe sent before the coordinator gave up arrives after the wake-up; nothing after it."""
    lease = Lease(timeout_s=0.2, confirm_s=0.5)
    lease.begin(3)
    time.sleep(0.3)
    threading.Timer(0.05, lease.renew, args=(3,)).start()
    with pytest.raises(RoundFenced, match="most likely left this worker behind .* not going to publish"):
        lease.check(3, "publish")


def test_a_late_probe_answered_before_the_check_renews_nothing():
    """The worker wakes; another thread answers the probe sent before the coordinator gave up, and only then
    does the training thread reach its fence (CI: the woken worker published into the re-formed run)."""
    lease = Lease(timeout_s=0.2, confirm_s=0.5)
    lease.begin(3)
    time.sleep(0.3)
    lease.renew(3)
    with pytest.raises(RoundFenced, match="most likely left this worker behind"):
        lease.check(3, "publish")


def test_probes_answered_in_a_row_after_a_silence_renew_the_lease():
    """A busy worker (kept by the coordinator) answers again: the second answer in a row makes it fresh."""
    lease = Lease(timeout_s=0.2, confirm_s=0.5)
    lease.begin(3)
    time.sleep(0.3)
    lease.renew(3)
    time.sleep(0.05)
    lease.renew(3)
    started = time.monotonic()
    lease.check(3, "publish")
    assert time.monotonic() - started < 0.1


def test_a_round_that_is_no_longer_the_workers_is_fenced():
    lease = Lease(timeout_s=2.0, confirm_s=1.0)
    lease.begin(4)
    lease.renew(3)  # a stale probe of an old round renews nothing
    with pytest.raises(RoundFenced, match="round 3 is over"):
        lease.check(3, "publish")


def test_fenced_checkpointer_publishes_nothing_and_marks_the_worker_busy(tmp_path):
    inner = Checkpointer(tmp_path, every=1, keep=2)

    class Holder:
        commit_id = 0

        def as_payload(self):
            return {"commit_id": 0, "items": {"w": {"x": torch.ones(3)}}, "attrs": {"step": 1}, "world_size": 1}

    class Context:
        rank = 0

    busy: list[str | None] = []

    def fence() -> None:
        raise RoundFenced("left behind")

    fenced = FencedCheckpointer(inner, fence, busy.append)
    with pytest.raises(RoundFenced):
        fenced.maybe_save(Holder(), Context())
    assert list(tmp_path.iterdir()) == [], "no checkpoint, no temporary directory"
    assert busy == ["writing durable checkpoint of commit 0", None]
    assert fenced.every == 1, "everything else is the run's checkpointer"
    open_fence = FencedCheckpointer(inner, lambda: None, busy.append)
    path = open_fence.maybe_save(Holder(), Context())
    assert path is not None and (path / "MANIFEST.json").exists()


# -- native pulse --------------------------------------------------------------------------------------
_SERVER = """
import sys, time
from ray_elastic.pulse import PulseServer
server = PulseServer("127.0.0.1")
print(server.address[1], flush=True)
time.sleep(1.0)
sum(range(int(sys.argv[1])))  # one C call that holds the GIL
time.sleep(60)
"""


def test_pulse_answers_through_a_gil_holding_call_not_when_stopped_refused_when_gone():
    proc = subprocess.Popen([sys.executable, "-c", _SERVER, str(150_000_000)], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        assert ping("127.0.0.1", port, 1.0) == ALIVE
        time.sleep(1.5)  # inside sum(range(...)) now, for seconds
        started = time.monotonic()
        assert ping("127.0.0.1", port, 1.0) == ALIVE
        assert time.monotonic() - started < 0.5
        os.kill(proc.pid, signal.SIGSTOP)
        while psutil.Process(proc.pid).status() != psutil.STATUS_STOPPED:
            time.sleep(0.01)
        started = time.monotonic()
        assert ping("127.0.0.1", port, 0.5) == SILENT
        assert 0.4 < time.monotonic() - started < 2.0
        os.kill(proc.pid, signal.SIGCONT)
        assert ping("127.0.0.1", port, 1.0) == ALIVE
        proc.kill()
        proc.wait()
        assert ping("127.0.0.1", port, 1.0) == GONE
    finally:
        proc.kill()
        proc.wait()


def test_pulse_server_checks_itself_at_start():
    server = PulseServer("127.0.0.1")
    assert server.address is not None and ping(*server.address, 1.0) == ALIVE
    server.close()
    assert server.address is None


# -- stacks --------------------------------------------------------------------------------------------
def test_thread_stack_and_first_user_frame():
    ready, release = threading.Event(), threading.Event()

    def waiting_for_data() -> None:
        ready.set()
        release.wait(10)

    thread = threading.Thread(target=waiting_for_data)
    thread.start()
    ready.wait(5)
    try:
        stack = thread_stack(thread.ident)
    finally:
        release.set()
        thread.join()
    assert "waiting_for_data" in stack
    assert first_user_frame(stack).startswith("test_fence_pulse.py:")
    assert first_user_frame(stack).endswith("in waiting_for_data")
    assert first_user_frame("Thread 12 (idle): \"MainThread\"\n    load (train.py:12)\n") == "train.py:12 in load"
    assert thread_stack(None) == "" and collective_state() == (-1, "")


def test_compare_collectives_names_who_waits_for_whom():
    standing = compare_collectives({"rank 0": (21, "gloo:all_reduce"), "rank 1": (20, "gloo:broadcast"),
                                    "rank 2": (21, "gloo:all_reduce"), "rank 3": (-1, "")})
    assert standing["rank 0"] == "waiting in gloo:all_reduce #21 (behind: rank 1 at #20)"
    assert standing["rank 1"] == "behind: issued #20, others #21"
    assert standing["rank 3"] == ""
    same = compare_collectives({"rank 0": (5, ""), "rank 1": (5, "")})
    assert same["rank 0"] == "at collective #5, like every rank that answered"


_GIL_HOLDER = """
import threading, time
threading.Thread(target=lambda: time.sleep(60), name="sleeper", daemon=True).start()
def holding_the_gil():
    sum(range(10**11))  # one C call that never lets the GIL go
print("ready", flush=True)
holding_the_gil()
"""


def test_py_spy_reads_the_thread_holding_the_gil_from_outside():
    proc = subprocess.Popen([sys.executable, "-c", _GIL_HOLDER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        dump, note = py_spy_dump(proc.pid, native=True, who="the holder")
        held = gil_holder(dump)
    finally:
        proc.kill()
        proc.wait()
    assert note == f"read by py-spy from the holder (pid {proc.pid})" and "sleeper" in dump, (note, dump)
    assert held.startswith(f"Thread {proc.pid} (active+gil)") and "sleeper" not in held, held
    assert first_user_frame(held) == "<string>:5 in holding_the_gil", held  # innermost last, as in a traceback
    assert gil_holder("Thread 7 (idle): \"x\"\n    f (a.py:1)\n") == "Thread 7 (idle): \"x\"\n    f (a.py:1)\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="runs py-spy as user nobody: needs root")
def test_py_spy_without_ptrace_rights_says_what_it_needs(tmp_path):
    """py-spy run by a user that may not trace the process (nobody, reading a root process): the note names the
    rights it needs, read from what this py-spy really prints."""
    import pwd
    import shutil
    import tempfile

    nobody = pwd.getpwnam("nobody")
    reachable = Path(tempfile.mkdtemp(dir="/tmp"))  # a copy nobody may run (the venv's may sit in a private home)
    try:
        reachable.chmod(0o755)
        exe = shutil.copy(py_spy_path(), reachable / "py-spy")
        target = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            done = subprocess.run([exe, "dump", "--pid", str(target.pid)], capture_output=True, text=True, timeout=30,
                                  preexec_fn=lambda: (os.setgid(nobody.pw_gid), os.setuid(nobody.pw_uid)))
        finally:
            target.kill()
            target.wait()
    finally:
        shutil.rmtree(reachable)
    assert done.returncode != 0, done.stdout
    assert py_spy_failure(target.pid, "rank 3", done.stderr or done.stdout) == (
        f"py-spy may not read rank 3 (pid {target.pid}): it needs ptrace rights on that node (Ray run as root or "
        f"with CAP_SYS_PTRACE, or kernel.yama.ptrace_scope=0)")
    assert py_spy_failure(7, "rank 0", "Error: Failed to find python version") == \
        "py-spy dump --pid 7 failed: Error: Failed to find python version"


def test_gil_holder_keeps_the_c_frames_where_the_gil_is_held_not_the_threads_start():
    dump = "\n".join([
        'Process 9: ray::ElasticWorker', '',
        'Thread 11 (idle): "MainThread"', '    main_loop (ray/_private/worker.py:900)',
        'Thread 12 (active+gil): "Dummy-1"',
        '    ProcessGroupGloo::~ProcessGroupGloo (libtorch_cpu.so)',  # innermost: holds the GIL here
        '    release_round_objects (ray_elastic/worker/process_group.py:60)',
        '    run_round (ray_elastic/worker/actor.py:300)',
        '    std::_Function_handler<' + "x" * 3000 + '>::_M_invoke (ray/_raylet.so)',  # the thread's start
        '    0x7f558c6a71f5 (libc.so.6)', ''])
    held = gil_holder(dump).splitlines()
    assert held == ['Thread 12 (active+gil): "Dummy-1"',
                    '    run_round (ray_elastic/worker/actor.py:300)',
                    '    release_round_objects (ray_elastic/worker/process_group.py:60)',
                    '    ProcessGroupGloo::~ProcessGroupGloo (libtorch_cpu.so)']
    assert first_user_frame("\n".join(held)) == ""  # nothing of the user's: every frame is torch's or ours

"""What arrives from outside is checked (no Ray): storage and run directory, event log, checkpoints on resume.

Each refusal is a ConfigError that names the path and says what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from ray_elastic.checkpoint import MANIFEST, STATE_FILE, Checkpointer
from ray_elastic.config import RunConfig
from ray_elastic.errors import ConfigError
from ray_elastic.events import EventLog, resolve_log_path
from ray_elastic.safepath import open_new

pytestmark = pytest.mark.timeout(60)


def _config(storage: Path, name: str = "job", resume: bool = False) -> RunConfig:
    return RunConfig(run_id=name, storage_path=str(storage), resume=resume)


def _payload(commit_id: int, **attrs) -> dict:
    return {"commit_id": commit_id, "items": {"model": {"w": torch.full((3,), float(commit_id))}},
            "attrs": {"step": commit_id + 1, **attrs}, "world_size": 2}


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@dataclass
class Custom:
    """A user type in State attrs: not on torch's weights_only allowlist until the user adds it."""

    value: int


class Exploit:
    """What a hostile writer of shared storage would plant: unpickling it runs code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


# -- run directory -------------------------------------------------------------------------------------------


def test_checkpoints_are_owner_only(tmp_path):
    ckpt = Checkpointer.for_run(_config(tmp_path))
    path = ckpt.save(_payload(0))
    assert _mode(ckpt.run_dir) == 0o700 and _mode(path) == 0o700
    assert _mode(path / STATE_FILE) == 0o600 and _mode(path / MANIFEST) == 0o600


def test_an_open_run_directory_is_made_owner_only(tmp_path):
    (tmp_path / "job").mkdir()
    os.chmod(tmp_path / "job", 0o777)
    Checkpointer.for_run(_config(tmp_path))
    assert _mode(tmp_path / "job") == 0o700


def test_a_run_directory_that_is_a_link_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "job").symlink_to(elsewhere)
    with pytest.raises(ConfigError, match=r"run directory .*/runs/job is a symbolic link.*Remove the link"):
        Checkpointer.for_run(_config(tmp_path / "runs"))
    assert list(elsewhere.iterdir()) == [], "nothing was written through the link"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to hand a directory away")
def test_a_run_directory_of_another_user_is_refused(tmp_path):
    (tmp_path / "job").mkdir(mode=0o700)
    os.chown(tmp_path / "job", 12345, -1)
    with pytest.raises(ConfigError, match="belongs to user id 12345, not to you"):
        Checkpointer.for_run(_config(tmp_path))


@pytest.mark.parametrize("name", ["..", "../escape", "a/../../b", ".hidden", "a b", "x" * 201])
def test_a_run_name_is_one_plain_component(tmp_path, name):
    with pytest.raises(ConfigError, match="cannot be a directory name"):
        Checkpointer.for_run(_config(tmp_path / "runs", name=name))
    assert not (tmp_path / "escape").exists() and not (tmp_path / "b").exists()


def test_storage_path_with_dots_is_resolved_before_use(tmp_path):
    (tmp_path / "a").mkdir()
    ckpt = Checkpointer.for_run(_config(tmp_path / "a" / ".." / "runs"))
    assert ckpt.run_dir == tmp_path / "runs" / "job" and ".." not in ckpt.run_dir.parts


def test_a_file_planted_as_a_link_is_never_written_through(tmp_path):
    target = tmp_path / "victim"
    target.write_text("keep me")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(OSError):
        open_new(tmp_path / "link")
    assert target.read_text() == "keep me"


# -- resume: manifest, checksum, weights_only ----------------------------------------------------------------


def _saved(tmp_path: Path, *payloads: dict) -> Checkpointer:
    ckpt = Checkpointer.for_run(_config(tmp_path))
    for payload in payloads:
        ckpt.save(payload)
    return ckpt


def test_resume_refuses_a_checkpoint_changed_after_it_was_written(tmp_path):
    ckpt = _saved(tmp_path, _payload(0), _payload(1))
    state = ckpt.run_dir / "checkpoint_000000001" / STATE_FILE
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    state.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"checkpoint_000000001 does not match its manifest \(state.pt has a "
                                          r"different size or sha256\).*move it out of"):
        Checkpointer.for_run(_config(tmp_path, resume=True))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(commit_id=7), "the manifest names commit 7"),
        (lambda m: m.update(files={}), "the manifest lists no state.pt"),
        (lambda m: m["files"].update({"../../etc/passwd": {"size": 1, "sha256": "0"}}),
         "the manifest lists '../../etc/passwd'"),
        (lambda m: m["files"]["state.pt"].update(sha256="0" * 64), "different size or sha256"),
    ],
    ids=["other-commit", "no-files", "path-escape", "wrong-sha"],
)
def test_resume_refuses_a_manifest_that_does_not_match(tmp_path, edit, message):
    ckpt = _saved(tmp_path, _payload(0))
    manifest_path = ckpt.run_dir / "checkpoint_000000000" / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    edit(manifest)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=message):
        Checkpointer.for_run(_config(tmp_path, resume=True))


def test_resume_refuses_a_checkpoint_that_is_a_link(tmp_path):
    ckpt = _saved(tmp_path, _payload(0))
    planted = tmp_path / "planted"
    (ckpt.run_dir / "checkpoint_000000000").rename(planted)
    (ckpt.run_dir / "checkpoint_000000009").symlink_to(planted, target_is_directory=True)
    with pytest.raises(ConfigError, match="checkpoint_000000009 does not match its manifest .*symbolic link"):
        Checkpointer.for_run(_config(tmp_path, resume=True))
    assert ckpt.load_latest() is None, "a linked checkpoint is never loaded"


def test_a_crashed_write_without_manifest_is_no_reason_to_refuse(tmp_path):
    ckpt = _saved(tmp_path, _payload(0))
    (ckpt.run_dir / "checkpoint_000000001").mkdir()  # a write that died before its manifest
    assert Checkpointer.for_run(_config(tmp_path, resume=True)).load_latest()["commit_id"] == 0


def _forge(ckpt: Checkpointer, commit_id: int, payload: object) -> None:
    """A checkpoint written by someone else, manifest and checksums matching: only weights_only stops it."""
    path = ckpt.run_dir / f"checkpoint_{commit_id:09d}"
    path.mkdir()
    torch.save(payload, path / STATE_FILE)
    data = (path / STATE_FILE).read_bytes()
    (path / MANIFEST).write_text(json.dumps({"format": 1, "commit_id": commit_id, "world_size": 2, "files": {
        STATE_FILE: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}}}))


def test_a_pickle_that_would_run_code_is_never_unpickled(tmp_path):
    ckpt = _saved(tmp_path, _payload(0))
    marker = tmp_path / "code_ran"
    _forge(ckpt, 1, dict(_payload(1), attrs={"step": 2, "x": Exploit(str(marker))}))
    with pytest.raises(ConfigError, match=r"holds objects that torch.load\(weights_only=True\) refuses.*mkdir"):
        Checkpointer.for_run(_config(tmp_path, resume=True))
    with pytest.raises(ConfigError, match=r"weights_only=True\) refuses"):
        ckpt.load_latest()  # a worker loading it mid-run refuses it the same way
    assert not marker.exists(), "the planted code ran"


def test_user_types_load_once_allowed_before_run(tmp_path):
    ckpt = _saved(tmp_path, _payload(0, extra=Custom(5)))
    with pytest.raises(ConfigError, match=r"Custom.*torch.serialization.add_safe_globals"):
        Checkpointer.for_run(_config(tmp_path, resume=True))
    torch.serialization.add_safe_globals([Custom])
    try:
        resumed = Checkpointer.for_run(_config(tmp_path, resume=True))
    finally:
        torch.serialization.clear_safe_globals()
    assert Custom in resumed.safe_globals, "the driver's allowlist travels with the checkpointer to workers"
    assert resumed.load_latest()["attrs"]["extra"] == Custom(5), "workers load with the driver's allowlist"
    with pytest.raises(ConfigError, match="add_safe_globals"):
        ckpt.load_latest()  # a checkpointer made before the type was allowed does not load it


# -- event log ---------------------------------------------------------------------------------------------


def test_event_log_is_created_owner_only_and_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    resolved = resolve_log_path("sub/../events.jsonl")
    assert resolved == str(tmp_path / "events.jsonl")
    assert _mode(tmp_path / "events.jsonl") == 0o600
    EventLog("run", resolved).emit("round_formed", 0, "RUNNING", "formed")
    assert json.loads((tmp_path / "events.jsonl").read_text())["kind"] == "round_formed"


def test_event_log_through_a_link_is_refused(tmp_path):
    target = tmp_path / "victim"
    target.write_text("keep me\n")
    (tmp_path / "events.jsonl").symlink_to(target)
    with pytest.raises(ConfigError, match=r"event_log_path .* is a symbolic link.*Pass the real file's path"):
        resolve_log_path(str(tmp_path / "events.jsonl"))
    EventLog("run", str(tmp_path / "events.jsonl")).emit("round_formed", 0, "RUNNING", "formed")  # planted later
    assert target.read_text() == "keep me\n", "an event was written through a link"


def test_event_log_that_is_a_directory_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="cannot be written"):
        resolve_log_path(str(tmp_path))

"""Durable checkpoints: the fallback for losing every worker (or the coordinator).

Layout under ``<storage_path>/<run name>/``::

    checkpoint_000000041/state.pt         torch.save of the committed snapshot
    checkpoint_000000041/MANIFEST.json    commit id, step, world size, time, files (size, sha256)
    .tmp-checkpoint_000000043-<pid>-...   a write in progress (never loaded)

A checkpoint counts only once its manifest exists and matches its files. A
write goes: state file into a temporary directory in the run directory, fsync,
rename into place, then the manifest through its own temporary file, fsync,
rename. A crash at any point leaves either a temporary directory or a
checkpoint without a manifest, both ignored by `load_latest` and removed by the
next save; the previous complete checkpoint stays the newest one loaded.

Nothing from storage is trusted blindly: the run directory and its files are
owner-only and never written through a link (`safepath`), a state file is
unpickled only after its sha256 matches the manifest, and then only with
`torch.load(weights_only=True)` (plus the types the driver allowed with
`torch.serialization.add_safe_globals`); `resume=True` checks the newest
checkpoint before any actor starts (`verify_newest`).

Only rank 0 writes: under data parallelism the committed state is replicated.
State that is sharded across ranks (FSDP2) is written by every rank with
`torch.distributed.checkpoint`, in the same run directory and under the same
manifest rule: see `ray_elastic.sharded.durable` (manifests with "kind": "sharded").

`storage_path` must be visible at the same path from every node (a shared
filesystem), since any rank may become rank 0 and every rank may load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, cast

import torch

from ray_elastic.checkpoint_checks import (  # noqa: F401 - MANIFEST, STATE_FILE are this module's names too
    MANIFEST,
    STATE_FILE,
    driver_safe_globals,
    load_weights_only,
    manifest_mismatch,
    state_file_of,
    unsafe_globals,
)
from ray_elastic.config import RunConfig
from ray_elastic.errors import ConfigError, RunNameInUseError
from ray_elastic.safepath import absolute, check_component, is_link, open_new, private_dir, read_bytes

logger = logging.getLogger("ray_elastic")

TMP_PREFIX = ".tmp-"
FORMAT_VERSION = 1
_CHECKPOINT_DIR = re.compile(r"^checkpoint_(\d{9,})$")
# Testing hook: "<point>" or "<point>:<commit_id>" makes the writer SIGKILL itself there.
CRASH_ENV = "RAY_ELASTIC_CHECKPOINT_CRASH_AT"


def _crash_point(point: str, commit_id: int) -> None:
    wanted = os.environ.get(CRASH_ENV)
    if wanted and wanted in (point, f"{point}:{commit_id}"):
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _HashingWriter:
    """A file wrapper that hashes and counts what passes through (torch.save writes to it)."""

    def __init__(self, file: IO[bytes]):
        self.file = file
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def checkpoint_dir_name(commit_id: int) -> str:
    return f"checkpoint_{commit_id:09d}"


def _commit_id_of(path: Path) -> int:
    match = _CHECKPOINT_DIR.match(path.name)
    return int(match.group(1)) if match else -1


def _remove_tree(path: Path) -> None:
    """Delete a checkpoint so that no reader sees it complete halfway: manifest first. A link goes, not its target."""
    if is_link(path):
        path.unlink()
        return
    with contextlib.suppress(FileNotFoundError):
        (path / MANIFEST).unlink()
    shutil.rmtree(path, ignore_errors=True)


class Checkpointer:
    """Writes the committed snapshot to storage every N commits; loads the newest complete one.

    Built on the driver by `for_run` (which validates storage before any actor
    starts), then pickled to the coordinator and every worker. Writes are
    synchronous: `maybe_save` returns once the checkpoint is durable, so nothing
    is in flight when a round or train_fn ends.

    Args:
        run_dir: ``<storage_path>/<run name>``.
        every: write at every `every`-th commit.
        keep: complete checkpoints to keep (older ones are pruned).
    """

    def __init__(self, run_dir: str | os.PathLike[str], every: int = 1, keep: int = 2, safe_globals: tuple = ()):
        self.run_dir = Path(run_dir)
        self.every = every
        self.keep = keep
        # Types the driver allowed for torch.load(weights_only=True) (torch.serialization.add_safe_globals).
        self.safe_globals = tuple(safe_globals)

    @classmethod
    def for_run(cls, config: RunConfig) -> Checkpointer:
        """Validate the run's storage up front and return its checkpointer.

        Creates the run directory and writes (then removes) a probe file. A run
        name that already has complete checkpoints needs `resume=True`;
        `resume=True` with no checkpoint yet is fine and starts fresh.

        Raises:
            ConfigError: storage_path or the name unusable, saying what to change.
            RunNameInUseError: the name has checkpoints and resume=True was not given.
        """
        raw = config.storage_path
        if not isinstance(raw, (str, os.PathLike)) or not str(raw):
            raise ConfigError(f"storage_path must be a directory path, got {raw!r}.")
        if "://" in str(raw):
            raise ConfigError(
                f"storage_path={str(raw)!r} looks like a URI; only filesystem paths are supported. "
                f"Mount the bucket (or use a shared filesystem) and pass its local path."
            )
        name = check_component(config.run_id, "name")
        run_dir = absolute(raw) / name
        probe = run_dir / f"{TMP_PREFIX}probe-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            private_dir(run_dir, "run directory")
            with open_new(probe) as file:
                file.write(b"ray_elastic write probe\n")
                file.flush()
                os.fsync(file.fileno())
            probe.unlink()
        except OSError as exc:
            raise ConfigError(
                f"storage_path {str(raw)!r} is not writable: creating {probe} failed ({exc}). Pass a directory "
                f"you can write to (on a filesystem every node sees), or fix its permissions."
            ) from exc
        checkpointer = cls(run_dir, every=config.checkpoint_every, keep=config.keep_checkpoints,
                           safe_globals=driver_safe_globals())
        existing = checkpointer.complete_checkpoints()
        if existing and not config.resume:
            raise RunNameInUseError(
                f"run name {name!r} is already used: {run_dir} holds {len(existing)} checkpoint(s), newest "
                f"{existing[-1].name}; pass resume=True to continue it or choose another name."
            )
        if config.resume:
            checkpointer.verify_newest()
        return checkpointer

    def verify_newest(self) -> Path | None:
        """Check, without unpickling, the newest checkpoint that claims to be complete (has a manifest).

        Its manifest must name it and list its files with matching sizes and sha256, and
        its state may hold only what `torch.load(weights_only=True)` accepts (plus the
        types allowed with `torch.serialization.add_safe_globals` before `run`).
        A checkpoint without a manifest is a write that crashed and is skipped.

        Returns:
            the checkpoint a resumed run will load, or None when there is none.

        Raises:
            ConfigError: it does not match its manifest, or needs types not allowed, saying what to do.
        """
        try:
            claimed = sorted((p for p in self.run_dir.iterdir() if _CHECKPOINT_DIR.match(p.name)
                              and (p / MANIFEST).exists()), key=_commit_id_of)
        except FileNotFoundError:
            return None
        if not claimed:
            return None
        path = claimed[-1]
        problem = manifest_mismatch(path, _commit_id_of(path))
        if problem is not None:
            raise ConfigError(
                f"resume=True: checkpoint {path} does not match its manifest ({problem}); it changed after it "
                f"was written (corruption, or someone else wrote there), so it is not loaded. Inspect it, then "
                f"move it out of {self.run_dir} to resume from the previous checkpoint."
            )
        manifest = json.loads(read_bytes(path / MANIFEST))
        allowed = self.safe_globals
        if manifest.get("kind") == "sharded":  # its replicated part holds ray_elastic's own plain dataclasses
            from ray_elastic.sharded.layout import SAFE_TYPES

            allowed = (*allowed, *SAFE_TYPES)
        unsafe = unsafe_globals(path / state_file_of(manifest), allowed)
        if unsafe:
            raise ConfigError(
                f"resume=True: checkpoint {path} holds objects that torch.load(weights_only=True) refuses: "
                f"{', '.join(unsafe)}. If you trust them, allow them before calling run: "
                f"torch.serialization.add_safe_globals([...those classes or functions...])."
            )
        return path

    # -- reading -------------------------------------------------------------------------------
    def _read_manifest(self, path: Path) -> dict[str, Any] | None:
        """The checkpoint's manifest if it exists and matches its files (sizes), else None."""
        match = _CHECKPOINT_DIR.match(path.name)
        if match is None or is_link(path):
            return None
        try:
            manifest = json.loads(read_bytes(path / MANIFEST))
            if manifest.get("commit_id") != int(match.group(1)) or not manifest.get("files"):
                return None
            for file_name, entry in manifest["files"].items():
                if (path / file_name).stat().st_size != entry["size"]:
                    return None
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None
        return manifest

    def complete_checkpoints(self) -> list[Path]:
        """Checkpoint directories with a valid manifest, oldest first."""
        try:
            entries = sorted(
                (p for p in self.run_dir.iterdir() if _CHECKPOINT_DIR.match(p.name)), key=_commit_id_of
            )
        except FileNotFoundError:
            return []
        return [p for p in entries if self._read_manifest(p) is not None]

    def load_latest(self) -> dict[str, Any] | None:
        """The newest complete checkpoint whose checksums match, as a snapshot payload; None if none.

        Returns a dict shaped like `SnapshotHolder.as_payload()`:
        {"commit_id", "items", "attrs", "world_size"}.
        """
        for path in reversed(self.complete_checkpoints()):
            manifest = self._read_manifest(path)
            if manifest is None:
                continue
            if manifest.get("kind") == "sharded":  # written by ray_elastic.sharded.durable; loaded there
                logger.warning("checkpoint %s holds sharded (FSDP2) state; skipped for replicated state", path)
                continue
            try:
                data = read_bytes(path / STATE_FILE)
            except OSError:
                logger.warning("checkpoint %s vanished or is unreadable; trying an older one", path)
                continue
            if hashlib.sha256(data).hexdigest() != manifest["files"][STATE_FILE]["sha256"]:
                logger.error("checkpoint %s does not match its manifest checksum; not loading it, trying an older "
                             "one", path)
                continue
            payload = load_weights_only(data, path, self.safe_globals)
            logger.info("loaded checkpoint %s (step %s)", path, manifest.get("step"))
            return payload
        return None

    # -- writing -------------------------------------------------------------------------------
    def should_save(self, commit_id: int, rank: int) -> bool:
        return rank == 0 and commit_id >= 0 and (commit_id + 1) % self.every == 0

    def maybe_save(self, holder: Any, context: Any, before_publish: Callable[[], None] | None = None) -> Path | None:
        """Write the holder's snapshot when this commit is due and this is rank 0; return its path."""
        if not self.should_save(holder.commit_id, context.rank):
            return None
        return self.save(holder.as_payload(), before_publish)

    def save(self, payload: dict[str, Any], before_publish: Callable[[], None] | None = None) -> Path:
        """Write one checkpoint atomically (see the module docstring), then prune old ones.

        Args:
            payload: the snapshot.
            before_publish: called once the data is written, before the checkpoint replaces
                anything in the run directory; raising there abandons the write (a fenced worker).
        """
        commit_id = int(payload["commit_id"])
        final = self.run_dir / checkpoint_dir_name(commit_id)
        tmp = self.run_dir / f"{TMP_PREFIX}{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(mode=0o700)  # a fresh, unguessable name: fails rather than follow anything already there
        try:
            with open_new(tmp / STATE_FILE) as file:
                writer = _HashingWriter(file)
                torch.save(payload, cast(IO[bytes], writer))
                file.flush()
                os.fsync(file.fileno())
            _fsync_dir(tmp)
            _crash_point("before_rename", commit_id)
            if before_publish is not None:
                before_publish()
            if final.exists():  # a leftover without manifest, or one that failed its checksum
                _remove_tree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(self.run_dir)
        _crash_point("before_manifest", commit_id)
        step = payload["attrs"].get("step")
        manifest = {
            "format": FORMAT_VERSION,
            "commit_id": commit_id,
            "step": step if isinstance(step, (int, float)) else None,
            "world_size": payload["world_size"],
            "time": time.time(),
            "writer_pid": os.getpid(),
            "files": {STATE_FILE: {"size": writer.size, "sha256": writer.sha256.hexdigest()}},
        }
        manifest_tmp = final / f"{TMP_PREFIX}{MANIFEST}"
        with open_new(manifest_tmp, "w") as file:
            json.dump(manifest, file, indent=1)
            file.flush()
            os.fsync(file.fileno())
        os.replace(manifest_tmp, final / MANIFEST)
        _fsync_dir(final)
        self.prune()
        return final

    def prune(self) -> None:
        """Keep the newest `keep` complete checkpoints; drop older ones, partial ones and temp dirs.

        Only rank 0 of the one live run writes here, so any temporary directory
        or manifest-less checkpoint seen now is a crashed write.
        """
        complete = self.complete_checkpoints()
        keep = set(complete[-self.keep:])
        for path in self.run_dir.iterdir():
            if path in keep:
                continue
            if is_link(path):
                path.unlink()  # nothing the run writes is a link
            elif path.name.startswith(TMP_PREFIX) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif _CHECKPOINT_DIR.match(path.name):
                _remove_tree(path)

"""Checks on what a checkpoint holds before it is trusted: manifest and checksums, and weights-only loading.

`torch.load(weights_only=True)` unpickles only tensors, numbers, strings and plain
containers (plus types allowed with `torch.serialization.add_safe_globals`), so a
checkpoint written by someone else cannot run code when it is loaded. The sha256 in
the manifest detects corruption, not a writer who rewrites both: that is what the
owner-only run directory is for.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from ray_elastic.errors import ConfigError
from ray_elastic.safepath import is_link, read_bytes

MANIFEST = "MANIFEST.json"
STATE_FILE = "state.pt"
_CHECKPOINT_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# torch.distributed.checkpoint's own names, in sharded checkpoints (ray_elastic.sharded.durable)
_DCP_FILE = re.compile(r"^(\.metadata|__\d+(_\d+)?\.(distcp|metadata))$")
SHARDED_STATE_FILE = "rest.pt"  # the replicated part of a sharded checkpoint


def state_file_of(manifest: dict[str, Any]) -> str:
    """The file a checkpoint's unpickled state lives in: state.pt, or rest.pt for sharded (FSDP2) state."""
    return SHARDED_STATE_FILE if manifest.get("kind") == "sharded" else STATE_FILE


def driver_safe_globals() -> tuple:
    """What the driver allowed for weights_only loading, handed to every worker with the checkpointer."""
    get = getattr(torch.serialization, "get_safe_globals", None)
    return tuple(get()) if get is not None else ()


def unsafe_globals(state_file: Path, safe_globals: tuple) -> list[str]:
    """Globals in a torch.save file that weights_only loading would refuse (a static scan, nothing is run)."""
    scan = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    allow = getattr(torch.serialization, "safe_globals", None)
    if scan is None or allow is None:  # torch < 2.5: the load itself reports them
        return []
    with allow(list(safe_globals)):
        return list(scan(io.BytesIO(read_bytes(state_file))))


def load_weights_only(data: bytes, path: Path, safe_globals: tuple) -> dict[str, Any]:
    """Unpickle a verified state file with torch.load(weights_only=True): no code runs while loading.

    Raises:
        ConfigError: it holds objects outside the weights_only allowlist, saying how to allow them.
    """
    allow = getattr(torch.serialization, "safe_globals", None)
    context = allow(list(safe_globals)) if allow is not None and safe_globals else contextlib.nullcontext()
    try:
        with context:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if "WeightsUnpickler error" in line]
        reason = (lines or str(exc).splitlines() or ["?"])[0].removeprefix("WeightsUnpickler error: ")
        raise ConfigError(
            f"checkpoint {path} holds objects that torch.load(weights_only=True) refuses ({reason[:300]}"
            f"). Keep plain values (tensors, numbers, strings, lists, dicts) in State, or, for types you trust, "
            f"call torch.serialization.add_safe_globals([...]) before ray_elastic.run."
        ) from exc


def manifest_mismatch(path: Path, commit_id: int) -> str | None:
    """Why checkpoint `path` does not match its manifest, or None when it does (every file's size and sha256)."""
    if is_link(path):
        return "it is a symbolic link"
    try:
        manifest = json.loads(read_bytes(path / MANIFEST))
    except (OSError, ValueError) as exc:
        return f"the manifest cannot be read: {exc}"
    if not isinstance(manifest, dict) or manifest.get("commit_id") != commit_id:
        return f"the manifest names commit {manifest.get('commit_id') if isinstance(manifest, dict) else None}"
    files = manifest.get("files")
    state_file = state_file_of(manifest)
    if not isinstance(files, dict) or state_file not in files:
        return f"the manifest lists no {state_file}"
    sharded = manifest.get("kind") == "sharded"
    for file_name, entry in files.items():
        allowed = _CHECKPOINT_FILE.match(str(file_name)) or (sharded and _DCP_FILE.match(str(file_name)))
        if not allowed or not isinstance(entry, dict):
            return f"the manifest lists {file_name!r}"
        try:
            data = read_bytes(path / file_name)
        except OSError as exc:
            return f"{file_name} cannot be read: {exc}"
        if len(data) != entry.get("size") or hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            return f"{file_name} has a different size or sha256"
    return None


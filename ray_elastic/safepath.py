"""Paths that come from outside the run, checked before use and opened without following links.

- A name that becomes one path component (the run name under storage_path) is one
  plain component: letters, digits, '.', '_', '-', starting with a letter or digit,
  so never '..' and never a separator.
- A directory the run writes into (the run directory) is created owner-only (0700);
  an existing one must be a real directory (not a symbolic link) owned by this user,
  and is tightened to 0700.
- Files are created owner-only (0600) with O_NOFOLLOW (and O_EXCL where the name is
  fresh), so a symbolic link planted where the run writes is refused, never followed.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path

from ray_elastic.errors import ConfigError

logger = logging.getLogger("ray_elastic")

_SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
FILE_MODE = 0o600
DIR_MODE = 0o700


def check_component(name: str, what: str, max_len: int = 200) -> str:
    """Return `name` if it is one plain path component, else raise ConfigError naming `what`."""
    if not isinstance(name, str) or not _SAFE_COMPONENT.match(name) or len(name) > max_len:
        raise ConfigError(
            f"{what}={name!r} cannot be a directory name; use letters, digits, '.', '_' and '-' (starting with "
            f"a letter or digit, at most {max_len} characters)."
        )
    return name


def absolute(path: str | os.PathLike[str]) -> Path:
    """`path` made absolute against the current directory, with '.' and '..' resolved lexically."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def private_dir(path: Path, what: str) -> Path:
    """Create `path` (and missing parents) owner-only, or check an existing one.

    Raises:
        ConfigError: `path` is a symbolic link, not a directory, or owned by another user.
        OSError: it cannot be created.
    """
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise ConfigError(
            f"{what} {path} is a symbolic link; the run writes only into a real directory. Remove the link or "
            f"choose another name."
        )
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{what} {path} exists and is not a directory; remove it or choose another name.")
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise ConfigError(
            f"{what} {path} belongs to user id {info.st_uid}, not to you ({os.getuid()}): another user could "
            f"change what the run loads from it. Choose a name (or storage_path) of your own."
        )
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(path, DIR_MODE)
        logger.info("%s %s was open to other users; made it owner-only (0700)", what, path)
    return path


def open_new(path: Path, mode: str = "wb"):
    """Create `path` owner-only for writing; fails if anything (a link included) is already there."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, FILE_MODE)
    return os.fdopen(fd, mode)


def open_append(path: Path):
    """Open `path` for appending text, creating it owner-only; a symbolic link there is refused (OSError ELOOP)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _CLOEXEC, FILE_MODE)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise IsADirectoryError(f"{path} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "a", encoding="utf-8")


def read_bytes(path: Path) -> bytes:
    """The contents of regular file `path`, refusing to follow a symbolic link (OSError)."""
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise IsADirectoryError(f"{path} is not a regular file")
        return file.read()


def is_link(path: Path) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False

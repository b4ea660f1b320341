"""Durable, atomic publication of directories: a reader sees a complete directory or none."""

from __future__ import annotations

import errno
import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_dir(tmp: Path, dst: Path) -> None:
    """Make the finished directory `tmp` appear as `dst`, durably.

    fsyncs every file under `tmp` and `tmp` itself, renames it to `dst` (same filesystem), then
    fsyncs the parent so the rename survives a crash. Raises FileExistsError if `dst` already
    exists and is not an empty directory (rename replaces at most an empty one); `tmp` is then
    left for the caller to remove.
    """
    for path in sorted(tmp.rglob("*"), reverse=True):  # children before their directories
        fsync_path(path)
    fsync_path(tmp)
    try:
        os.rename(tmp, dst)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(f"{dst} already exists") from None
        raise
    fsync_path(dst.parent)

"""The named checkpoint errors, shared by every module of the package.

`CheckpointError` › `ManifestError` (the manifest breaks the spec), `CheckpointNotFound` (no manifest),
`CorruptCheckpoint` › `ChecksumMismatch` (the data files do not match a valid manifest) and
`ConversionError` (a source model cannot be converted). Each is an `SllmdError`, so one reaching a client
maps to an HTTP error body.
"""

from __future__ import annotations

import errno

from sllmd.errors import SllmdError


class CheckpointError(SllmdError):
    """Base of every checkpoint error: bad manifest, corrupt data, failed conversion."""


class ManifestError(CheckpointError):
    """The manifest is not valid v1: unparsable, wrong types, out of limits, or inconsistent."""


class CheckpointNotFound(CheckpointError):
    """The path is not a checkpoint directory (no manifest)."""


class CorruptCheckpoint(CheckpointError):
    """The data files do not match a valid manifest (missing, wrong size, wrong bytes)."""


class ChecksumMismatch(CorruptCheckpoint):
    """A partition's bytes in [start, end) do not hash to the manifest's digest."""

    def __init__(self, partition: str, start: int, end: int) -> None:
        super().__init__(f"checksum mismatch in {partition} bytes [{start}, {end})")
        self.partition, self.start, self.end = partition, start, end


class StoreFull(CheckpointError):
    """A checkpoint does not fit this node's store: its budget or its disk's free space, even after evicting every
    checkpoint no instance uses. A capacity condition of the node, not a fault of the request: 503."""

    status = 503
    error_type = "server_error"
    retry_after_s = 30  # checkpoints in use are released as their instances stop

    def __init__(self, message: str) -> None:
        super().__init__(message, code="store_full")


def as_store_full(exc: BaseException) -> StoreFull | None:
    """`exc` as the capacity condition it is, or None: a StoreFull itself, or an OSError saying the disk is full
    (whose message, naming a file of the store, is not for clients)."""
    if isinstance(exc, StoreFull):
        return exc
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreFull("this node's disk is full")
    return None


class ConversionError(CheckpointError):
    """A source model directory cannot be converted (missing, unsupported or inconsistent weights)."""

"""The named checkpoint errors, shared by every module of the package.

`CheckpointError` › `ManifestError` (the manifest breaks the spec), `CheckpointNotFound` (no manifest),
`CorruptCheckpoint` › `ChecksumMismatch` (the data files do not match a valid manifest) and
`ConversionError` (a source model cannot be converted). Each is an `SllmdError`, so one reaching a client
maps to an HTTP error body.
"""

from __future__ import annotations

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


class ConversionError(CheckpointError):
    """A source model directory cannot be converted (missing, unsupported or inconsistent weights)."""

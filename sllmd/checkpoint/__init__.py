"""Checkpoints in the sllmd v1 format (docs/checkpoint-format.md): the manifest, conversion from
Hugging Face directories, verification and a reference reader.

Importing this package imports neither torch nor transformers; only `convert` and `read_tensors` do.
The `convert` function lives at `sllmd.checkpoint.convert.convert`: re-exporting it here would shadow
the submodule of the same name. `main` is the entry point of `sllmd verify DIR` (cli.COMMANDS names one
module per command, and `sllmd convert` already takes `sllmd.checkpoint.convert.main`).
"""

from sllmd.checkpoint.convert import (
    VerifyReport,
    read_manifest,
    read_tensors,
    verify,
)
from sllmd.checkpoint.convert import verify_main as main
from sllmd.checkpoint.format import (
    ALIGNMENT,
    CHUNK_BYTES,
    DTYPE_SIZES,
    FILE_ALIGNMENT,
    FORMAT_VERSION,
    MANIFEST_FILE,
    PARTITION_MAX_BYTES,
    CheckpointError,
    CheckpointNotFound,
    ChecksumMismatch,
    ConversionError,
    CorruptCheckpoint,
    Manifest,
    ManifestError,
    PartitionEntry,
    PartitionHasher,
    TensorEntry,
    plan_layout,
)

__all__ = [
    "ALIGNMENT",
    "CHUNK_BYTES",
    "DTYPE_SIZES",
    "FILE_ALIGNMENT",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "PARTITION_MAX_BYTES",
    "CheckpointError",
    "CheckpointNotFound",
    "ChecksumMismatch",
    "ConversionError",
    "CorruptCheckpoint",
    "Manifest",
    "ManifestError",
    "PartitionEntry",
    "PartitionHasher",
    "TensorEntry",
    "VerifyReport",
    "main",
    "plan_layout",
    "read_manifest",
    "read_tensors",
    "verify",
]

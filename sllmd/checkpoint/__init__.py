"""Checkpoints in the sllmd v1 format (docs/checkpoint-format.md): the manifest (`format`), conversion from
Hugging Face directories (`convert`), verification and a reference reader (`reader`), the fast loader
(`loader`, with its host buffer pool `pool` and the DRAM cache tier `dram`).

Importing this package imports neither torch nor transformers; only `convert`, `read_tensors` and the
loader modules do. The `convert` function lives at `sllmd.checkpoint.convert.convert`: re-exporting it here
would shadow the submodule of the same name. `sllmd verify DIR` runs `sllmd.checkpoint.reader.main`;
`main` here is the same function, kept for callers of the old entry point.
"""

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
from sllmd.checkpoint.reader import (
    VerifyReport,
    main,
    read_manifest,
    read_tensors,
    verify,
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

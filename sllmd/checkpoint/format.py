"""The sllmd v1 checkpoint format: manifest, limits, layout planning and chunk hashing.

Pure: no file or network I/O; torch is imported only by `Manifest.tensor_views` and `torch_dtype`. The spec is
docs/checkpoint-format.md; every MUST there is enforced here, so a `Manifest` that exists is valid:
`Manifest.parse` checks the JSON types of untrusted bytes, and `Manifest.__post_init__` checks every
semantic rule (also for manifests built in code, which catches writer bugs before they reach disk).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import xxhash

from sllmd.errors import SllmdError

if TYPE_CHECKING:
    import torch

FORMAT_NAME = "sllmd-checkpoint"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
HASH_ALGO = "xxh3_128"

# Layout. Both alignments are 4 KiB: the page size and the O_DIRECT block size (see the spec for why).
ALIGNMENT = 4096  # every tensor offset is a multiple of this
FILE_ALIGNMENT = 4096  # every data file's size is a multiple of this (zero padding)
PARTITION_MAX_BYTES = 4 << 30  # a data file holds at most this much, unless it holds a single tensor
CHUNK_BYTES = 64 << 20  # hash granularity the converter writes

# Limits on what a reader accepts. They bound the work and memory a hostile manifest can cause.
MAX_MANIFEST_BYTES = 128 << 20
MAX_TENSORS = 1 << 18  # DeepSeek-V3-sized MoE checkpoints hold ~100k tensors
MAX_ALIASES = 1 << 16
MAX_PARTITIONS = 4096
MAX_RANK = 8
MAX_NAME_BYTES = 1024  # UTF-8 bytes of a tensor or alias name
MAX_TOTAL_BYTES = 1 << 44  # 16 TiB, also bounds any single tensor
MIN_CHUNK_BYTES = 4096
MAX_CHUNK_BYTES = 1 << 30
MAX_METADATA_ENTRIES = 256
MAX_METADATA_VALUE_BYTES = 64 << 10

# Safetensors' dtype names and their item sizes in bytes. Stored little-endian.
DTYPE_SIZES: Mapping[str, int] = MappingProxyType({
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
})
_TORCH_DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8",
    "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
}

FLOATING_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0"})

_PARTITION_FILE = re.compile(r"data-(\d{5})\.bin")
_DIGEST = re.compile(r"[0-9a-f]{32}")


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


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def partition_file(index: int) -> str:
    """The only valid file name of partition `index`: names never come from untrusted input."""
    return f"data-{index:05d}.bin"


def torch_name(dtype: str) -> str:
    """torch's name of the format's dtype `dtype` ("BF16" -> "bfloat16")."""
    return _TORCH_DTYPE_NAMES[dtype]


def torch_dtype(dtype: str) -> torch.dtype:
    import torch

    return getattr(torch, _TORCH_DTYPE_NAMES[dtype])


def dtype_name(dtype: torch.dtype) -> str:
    """The format's name for a torch dtype; `ValueError` if the format cannot store it."""
    for name, torch_name in _TORCH_DTYPE_NAMES.items():
        if str(dtype) == f"torch.{torch_name}":
            return name
    raise ValueError(f"dtype {dtype} is not supported by the sllmd checkpoint format")


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One stored tensor: `nbytes` contiguous row-major bytes at `offset` in partition `partition`."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    partition: int
    offset: int
    nbytes: int

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


@dataclass(frozen=True, slots=True)
class PartitionEntry:
    """One data file: its padded size, the xxh3-128 of all of it, and of each chunk_bytes chunk."""

    file: str
    nbytes: int
    digest: str
    chunk_digests: tuple[str, ...]


@dataclass(frozen=True)
class Manifest:
    """A validated v1 manifest. Tensors are listed in the order the model uses them, which is also
    their order in the data files; `aliases` maps a tied name to the stored tensor it shares."""

    tensors: tuple[TensorEntry, ...]
    partitions: tuple[PartitionEntry, ...]
    aliases: Mapping[str, str] = field(default_factory=dict)
    chunk_bytes: int = CHUNK_BYTES
    metadata: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tensors", tuple(self.tensors))
        object.__setattr__(self, "partitions", tuple(self.partitions))
        object.__setattr__(self, "aliases", MappingProxyType(dict(self.aliases)))
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))
        _validate(self)
        object.__setattr__(self, "_by_name", {t.name: t for t in self.tensors})

    @property
    def total_bytes(self) -> int:
        """Bytes of all data files together, padding included: the size of a buffer holding them."""
        return sum(p.nbytes for p in self.partitions)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def entry(self, name: str) -> TensorEntry:
        """The stored tensor for `name`, following an alias; `KeyError` if unknown."""
        by_name: dict[str, TensorEntry] = self._by_name  # type: ignore[attr-defined]
        return by_name[self.aliases.get(name, name)]

    def partition_offsets(self) -> list[int]:
        """Base offsets of the partitions when laid back to back in one buffer (all 4 KiB aligned)."""
        bases, base = [], 0
        for p in self.partitions:
            bases.append(base)
            base += p.nbytes
        return bases

    def placements(self, partition_offsets: Sequence[int] | None = None) -> list[tuple[TensorEntry, int]]:
        """(tensor, absolute start) in manifest order, partition i starting at partition_offsets[i]."""
        bases = self.partition_offsets() if partition_offsets is None else list(partition_offsets)
        if len(bases) != len(self.partitions):
            raise ValueError(f"{len(bases)} partition offsets for {len(self.partitions)} partitions")
        if any(b % ALIGNMENT or b < 0 for b in bases):
            raise ValueError(f"partition offsets must be non-negative multiples of {ALIGNMENT}")
        return [(t, bases[t.partition] + t.offset) for t in self.tensors]

    def tensor_views(
        self, buffer: torch.Tensor, partition_offsets: Sequence[int] | None = None
    ) -> dict[str, torch.Tensor]:
        """Views into `buffer` (1-D uint8, any device) holding the partitions at `partition_offsets`
        (default: back to back). No copy; aliases map to the very same view as their target."""
        import torch

        if buffer.dtype != torch.uint8 or buffer.dim() != 1:
            raise ValueError("buffer must be a 1-D uint8 tensor")
        bases = self.partition_offsets() if partition_offsets is None else list(partition_offsets)
        for p, base in zip(self.partitions, bases, strict=False):
            if base + p.nbytes > buffer.numel():
                raise ValueError(f"{p.file} at offset {base} does not fit a buffer of {buffer.numel()} bytes")
        views: dict[str, torch.Tensor] = {}
        for t, start in self.placements(bases):
            views[t.name] = buffer[start : start + t.nbytes].view(torch_dtype(t.dtype)).view(t.shape)
        for alias, target in self.aliases.items():
            views[alias] = views[target]
        return views

    def chunk_ranges(self, partition: int) -> list[tuple[int, int]]:
        """[start, end) of each hashed chunk of a partition, in order (the last may be shorter)."""
        size = self.partitions[partition].nbytes
        return [(s, min(s + self.chunk_bytes, size)) for s in range(0, size, self.chunk_bytes)]

    @classmethod
    def parse(cls, data: bytes) -> Manifest:
        """Parse and validate untrusted manifest bytes; `ManifestError` says what is wrong."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"manifest is {len(data)} bytes, over the {MAX_MANIFEST_BYTES}-byte limit")
        try:
            doc = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_keys,
                             parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ManifestError(f"manifest is not valid JSON: {exc}") from None
        return _from_json(doc)

    def to_json(self) -> bytes:
        """Canonical serialisation: one tensor or partition per line, UTF-8, trailing newline."""
        def dump(value: Any) -> str:
            return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))

        tensors = [dump({"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "partition": t.partition,
                         "offset": t.offset, "nbytes": t.nbytes}) for t in self.tensors]
        parts = [dump({"file": p.file, "nbytes": p.nbytes, "hash": {"algo": HASH_ALGO, "digest": p.digest},
                       "chunks": list(p.chunk_digests)}) for p in self.partitions]
        head = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "alignment": ALIGNMENT,
                "chunk_bytes": self.chunk_bytes, "total_bytes": self.total_bytes}
        lines = [f"  {dump(k)}: {dump(v)}," for k, v in head.items()]
        lines.append('  "tensors": [\n' + ",\n".join(f"    {t}" for t in tensors) + "\n  ],")
        lines.append('  "partitions": [\n' + ",\n".join(f"    {p}" for p in parts) + "\n  ],")
        lines.append(f'  "aliases": {dump(dict(self.aliases))},')
        lines.append(f'  "metadata": {dump(dict(self.metadata))}')
        return ("{\n" + "\n".join(lines) + "\n}\n").encode()


def plan_layout(specs: Iterable[tuple[str, str, Sequence[int]]], *,
                partition_max_bytes: int = PARTITION_MAX_BYTES) -> tuple[list[TensorEntry], list[int]]:
    """Place (name, dtype, shape) tensors in order: each at the next ALIGNMENT boundary of the current
    partition, or at offset 0 of a new one when it would push the partition past `partition_max_bytes`
    (a tensor bigger than that gets a partition of its own). Returns the entries and padded partition sizes."""
    if not FILE_ALIGNMENT <= partition_max_bytes <= PARTITION_MAX_BYTES:
        raise ValueError(f"partition_max_bytes must be in [{FILE_ALIGNMENT}, {PARTITION_MAX_BYTES}]")
    entries: list[TensorEntry] = []
    ends: list[int] = []
    for name, dtype, shape in specs:
        numel = 1
        for dim in shape:
            numel *= dim
        nbytes = numel * DTYPE_SIZES[dtype]
        offset = round_up(ends[-1], ALIGNMENT) if ends else 0
        if not ends or (offset + nbytes > partition_max_bytes and ends[-1] > 0):
            ends.append(0)
            offset = 0
        ends[-1] = max(ends[-1], offset + nbytes)
        entries.append(TensorEntry(name, dtype, tuple(shape), len(ends) - 1, offset, nbytes))
    return entries, [round_up(end, FILE_ALIGNMENT) for end in ends]


class PartitionHasher:
    """Hashes one partition's bytes, fed in file order: the whole file and each `chunk_bytes` chunk."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES) -> None:
        self._chunk_bytes = chunk_bytes
        self._whole = xxhash.xxh3_128()
        self._chunk = xxhash.xxh3_128()
        self._in_chunk = 0
        self._chunk_digests: list[str] = []

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        self._whole.update(view)
        while view:
            take = min(len(view), self._chunk_bytes - self._in_chunk)
            self._chunk.update(view[:take])
            self._in_chunk += take
            view = view[take:]
            if self._in_chunk == self._chunk_bytes:
                self._close_chunk()

    def _close_chunk(self) -> None:
        self._chunk_digests.append(self._chunk.hexdigest())
        self._chunk.reset()
        self._in_chunk = 0

    def finish(self) -> tuple[str, tuple[str, ...]]:
        """(whole-file digest, chunk digests); the hasher is spent afterwards."""
        if self._in_chunk:
            self._close_chunk()
        return self._whole.hexdigest(), tuple(self._chunk_digests)


# ---- validation -------------------------------------------------------------------------------


def _fail(message: str) -> ManifestError:
    return ManifestError(f"invalid manifest: {message}")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        keys = [k for k, _ in pairs]
        raise _fail(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return obj


def _reject_constant(name: str) -> None:
    raise _fail(f"{name} is not allowed")


def _get(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any = ...) -> Any:
    if key not in obj:
        if default is not ...:
            return default
        raise _fail(f"{where}: missing {key!r}")
    value = obj[key]
    # bool is an int in Python; never accept it where a number is meant.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise _fail(f"{where}.{key}: expected {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return value


def _only_keys(obj: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise _fail(f"{where}: unknown key {unknown[0]!r}")


def _from_json(doc: Any) -> Manifest:
    if not isinstance(doc, dict):
        raise _fail("top level must be a JSON object")
    if doc.get("format") != FORMAT_NAME:
        raise _fail(f"'format' must be {FORMAT_NAME!r}, got {doc.get('format')!r}")
    version = doc.get("version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise _fail(f"unsupported version {version!r} (this reader knows {FORMAT_VERSION})")
    _only_keys(doc, {"format", "version", "alignment", "chunk_bytes", "total_bytes", "tensors", "partitions",
                     "aliases", "metadata"}, "manifest")
    if _get(doc, "alignment", int, "manifest") != ALIGNMENT:
        raise _fail(f"alignment must be {ALIGNMENT}, got {doc['alignment']}")
    raw_tensors = _get(doc, "tensors", list, "manifest")
    raw_parts = _get(doc, "partitions", list, "manifest")
    if len(raw_tensors) > MAX_TENSORS:
        raise _fail(f"{len(raw_tensors)} tensors, over the limit of {MAX_TENSORS}")
    if len(raw_parts) > MAX_PARTITIONS:
        raise _fail(f"{len(raw_parts)} partitions, over the limit of {MAX_PARTITIONS}")
    tensors = []
    for i, raw in enumerate(raw_tensors):
        where = f"tensors[{i}]"
        if not isinstance(raw, dict):
            raise _fail(f"{where}: expected an object")
        _only_keys(raw, {"name", "dtype", "shape", "partition", "offset", "nbytes"}, where)
        shape = _get(raw, "shape", list, where)
        if len(shape) > MAX_RANK:
            raise _fail(f"{where}: rank {len(shape)} over the limit of {MAX_RANK}")
        tensors.append(TensorEntry(_get(raw, "name", str, where), _get(raw, "dtype", str, where), tuple(shape),
                                   _get(raw, "partition", int, where), _get(raw, "offset", int, where),
                                   _get(raw, "nbytes", int, where)))
    parts = []
    for i, raw in enumerate(raw_parts):
        where = f"partitions[{i}]"
        if not isinstance(raw, dict):
            raise _fail(f"{where}: expected an object")
        _only_keys(raw, {"file", "nbytes", "hash", "chunks"}, where)
        hash_ = _get(raw, "hash", dict, where)
        _only_keys(hash_, {"algo", "digest"}, f"{where}.hash")
        if _get(hash_, "algo", str, f"{where}.hash") != HASH_ALGO:
            raise _fail(f"{where}.hash.algo: unsupported {hash_['algo']!r} (expected {HASH_ALGO!r})")
        parts.append(PartitionEntry(_get(raw, "file", str, where), _get(raw, "nbytes", int, where),
                                    _get(hash_, "digest", str, f"{where}.hash"),
                                    tuple(_get(raw, "chunks", list, where))))
    aliases = _get(doc, "aliases", dict, "manifest", {})
    metadata = _get(doc, "metadata", dict, "manifest", {})
    manifest = Manifest(tensors, parts, aliases, _get(doc, "chunk_bytes", int, "manifest"), metadata)
    if _get(doc, "total_bytes", int, "manifest") != manifest.total_bytes:
        raise _fail(f"total_bytes {doc['total_bytes']} is not the sum of partition sizes ({manifest.total_bytes})")
    return manifest


def _check_int(value: Any, where: str, low: int, high: int) -> int:
    if type(value) is not int:
        raise _fail(f"{where}: expected an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise _fail(f"{where}: {value} is outside [{low}, {high}]")
    return value


def _check_name(name: Any, where: str) -> None:
    if not isinstance(name, str) or not name:
        raise _fail(f"{where}: name must be a non-empty string")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise _fail(f"{where}: name longer than {MAX_NAME_BYTES} bytes")
    if not name.isprintable():
        raise _fail(f"{where}: name {name!r} has control or non-printable characters")


def _validate(m: Manifest) -> None:
    """Every semantic rule of the spec. Types of JSON input were checked by `_from_json`."""
    if type(m.chunk_bytes) is not int or not (
        MIN_CHUNK_BYTES <= m.chunk_bytes <= MAX_CHUNK_BYTES and m.chunk_bytes & (m.chunk_bytes - 1) == 0
    ):
        raise _fail(f"chunk_bytes {m.chunk_bytes!r} must be a power of two in [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}]")
    if len(m.tensors) > MAX_TENSORS or len(m.partitions) > MAX_PARTITIONS or len(m.aliases) > MAX_ALIASES:
        raise _fail(f"over the limits of {MAX_TENSORS} tensors, {MAX_PARTITIONS} partitions, {MAX_ALIASES} aliases")
    total = 0
    for i, p in enumerate(m.partitions):
        where = f"partitions[{i}]"
        if p.file != partition_file(i):
            raise _fail(f"{where}.file: {p.file!r} must be {partition_file(i)!r}")
        total += _check_int(p.nbytes, f"{where}.nbytes", 0, MAX_TOTAL_BYTES)
        if p.nbytes % FILE_ALIGNMENT:
            raise _fail(f"{where}.nbytes: {p.nbytes} is not a multiple of {FILE_ALIGNMENT}")
        if not isinstance(p.digest, str) or not _DIGEST.fullmatch(p.digest):
            raise _fail(f"{where}.hash.digest: expected 32 lowercase hex digits")
        if len(p.chunk_digests) != -(-p.nbytes // m.chunk_bytes):
            raise _fail(f"{where}.chunks: {len(p.chunk_digests)} digests for {p.nbytes} bytes in "
                        f"{m.chunk_bytes}-byte chunks")
        if not all(isinstance(d, str) and _DIGEST.fullmatch(d) for d in p.chunk_digests):
            raise _fail(f"{where}.chunks: every digest must be 32 lowercase hex digits")
    if total > MAX_TOTAL_BYTES:
        raise _fail(f"total size {total} over the limit of {MAX_TOTAL_BYTES} bytes")

    names: set[str] = set()
    counts = [0] * len(m.partitions)
    sizeable = [0] * len(m.partitions)  # tensors with at least one byte
    ends = [0] * len(m.partitions)
    prev: TensorEntry | None = None
    for i, t in enumerate(m.tensors):
        where = f"tensors[{i}]"
        _check_name(t.name, where)
        if t.name in names:
            raise _fail(f"{where}: duplicate name {t.name!r}")
        names.add(t.name)
        where = f"{where} {t.name!r}"
        if not isinstance(t.dtype, str) or t.dtype not in DTYPE_SIZES:
            raise _fail(f"{where}: unknown dtype {t.dtype!r}")
        if len(t.shape) > MAX_RANK:
            raise _fail(f"{where}: rank {len(t.shape)} over the limit of {MAX_RANK}")
        numel = 1
        for dim in t.shape:
            _check_int(dim, f"{where}.shape", 0, MAX_TOTAL_BYTES)
            numel *= dim
            if numel * DTYPE_SIZES[t.dtype] > MAX_TOTAL_BYTES:
                raise _fail(f"{where}: shape {list(t.shape)} is over the {MAX_TOTAL_BYTES}-byte limit")
        _check_int(t.nbytes, f"{where}.nbytes", 0, MAX_TOTAL_BYTES)
        if t.nbytes != numel * DTYPE_SIZES[t.dtype]:
            raise _fail(f"{where}: nbytes {t.nbytes} != {numel} elements x {DTYPE_SIZES[t.dtype]} bytes ({t.dtype})")
        _check_int(t.partition, f"{where}.partition", 0, len(m.partitions) - 1)
        _check_int(t.offset, f"{where}.offset", 0, MAX_TOTAL_BYTES)
        if t.offset % ALIGNMENT:
            raise _fail(f"{where}: offset {t.offset} is not a multiple of the {ALIGNMENT}-byte alignment")
        part = m.partitions[t.partition]
        if t.end > part.nbytes:
            raise _fail(f"{where}: bytes [{t.offset}, {t.end}) extend past the end of {part.file} ({part.nbytes})")
        if prev is not None and (t.partition, t.offset) < (prev.partition, prev.end):
            raise _fail(f"{where}: [{t.offset}, {t.end}) in partition {t.partition} overlaps or precedes "
                        f"{prev.name!r} [{prev.offset}, {prev.end}) in partition {prev.partition}: tensors "
                        f"must not overlap and must be stored in manifest order")
        prev = t
        counts[t.partition] += 1
        ends[t.partition] = max(ends[t.partition], t.end)
        sizeable[t.partition] += t.nbytes > 0
    for p, count, nonempty, end in zip(m.partitions, counts, sizeable, ends, strict=True):
        if count == 0:
            raise _fail(f"{p.file} holds no tensor")
        if p.nbytes != round_up(end, FILE_ALIGNMENT):
            raise _fail(f"{p.file}: size {p.nbytes} must be its last tensor's end {end} padded to {FILE_ALIGNMENT}")
        if p.nbytes > PARTITION_MAX_BYTES and nonempty > 1:
            raise _fail(f"{p.file}: {p.nbytes} bytes exceeds {PARTITION_MAX_BYTES} but holds {nonempty} non-empty "
                        "tensors (only a single oversized tensor may)")

    for alias, target in m.aliases.items():
        _check_name(alias, "aliases")
        where = f"aliases[{alias!r}]"
        if alias in names:
            raise _fail(f"{where}: alias is also a stored tensor's name")
        if not isinstance(target, str):
            raise _fail(f"{where}: target must be a string")
        if target not in names:
            kind = "is itself an alias (chains and cycles are not allowed)" if target in m.aliases else "does not exist"
            raise _fail(f"{where}: target {target!r} {kind}")

    if len(m.metadata) > MAX_METADATA_ENTRIES:
        raise _fail(f"metadata: more than {MAX_METADATA_ENTRIES} entries")
    for key, value in m.metadata.items():
        _check_name(key, "metadata")
        if not isinstance(value, str) or len(value.encode("utf-8", "surrogatepass")) > MAX_METADATA_VALUE_BYTES:
            raise _fail(f"metadata[{key!r}]: value must be a string of at most {MAX_METADATA_VALUE_BYTES} bytes")

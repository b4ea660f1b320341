# long: the spec in code (its constants and limits, the Manifest type, the parser, one check per rule); one job.
"""The sllmd v1 manifest: the spec (docs/checkpoint-format.md) in code, its limits and its dtypes.

A `Manifest` that exists is valid. `Manifest.parse` checks the JSON of untrusted bytes (rule 2 and the JSON
types), and `Manifest.__post_init__` runs `RULES`, one check per rule of the spec, named after the rule's
number (also for manifests built in code, which catches writer bugs before they reach disk). Every failure
is a `ManifestError` saying what is wrong.

Pure: no file or network I/O, no clock, no torch (`sllmd.checkpoint.tensors` makes torch tensors of a
manifest's bytes). How tensors are placed in data files and hashed is `sllmd.checkpoint.layout`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from sllmd.checkpoint.errors import ManifestError

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

_DIGEST = re.compile(r"[0-9a-f]{32}")


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def partition_file(index: int) -> str:
    """The only valid file name of partition `index`: names never come from untrusted input."""
    return f"data-{index:05d}.bin"


def torch_name(dtype: str) -> str:
    """torch's name of the format's dtype `dtype` ("BF16" -> "bfloat16")."""
    return _TORCH_DTYPE_NAMES[dtype]


def dtype_of_torch_name(name: str) -> str:
    """The format's dtype of torch's dtype name ("bfloat16" -> "BF16"); `ValueError` if the format cannot
    store it."""
    for dtype, torch_dtype_name in _TORCH_DTYPE_NAMES.items():
        if torch_dtype_name == name:
            return dtype
    raise ValueError(f"dtype {name} is not supported by the sllmd checkpoint format")


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
        for check in RULES:
            check(self)
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


# ---- parsing: rule 2 and the JSON types ----------------------------------------------------------


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


def _object(raw: Any, allowed: set[str], where: str) -> Mapping[str, Any]:
    """`raw` as a JSON object with no key outside `allowed`."""
    if not isinstance(raw, dict):
        raise _fail(f"{where}: expected an object")
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise _fail(f"{where}: unknown key {unknown[0]!r}")
    return raw


def _rule2_header(doc: Any) -> Mapping[str, Any]:
    """Rule 2: a JSON object with exactly the spec's keys, this format, version and alignment."""
    if not isinstance(doc, dict):
        raise _fail("top level must be a JSON object")
    if doc.get("format") != FORMAT_NAME:
        raise _fail(f"'format' must be {FORMAT_NAME!r}, got {doc.get('format')!r}")
    version = doc.get("version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise _fail(f"unsupported version {version!r} (this reader knows {FORMAT_VERSION})")
    _object(doc, {"format", "version", "alignment", "chunk_bytes", "total_bytes", "tensors", "partitions",
                  "aliases", "metadata"}, "manifest")
    if _get(doc, "alignment", int, "manifest") != ALIGNMENT:
        raise _fail(f"alignment must be {ALIGNMENT}, got {doc['alignment']}")
    return doc


def _tensor_from_json(raw: Any, where: str) -> TensorEntry:
    raw = _object(raw, {"name", "dtype", "shape", "partition", "offset", "nbytes"}, where)
    shape = _get(raw, "shape", list, where)
    if len(shape) > MAX_RANK:  # before the tuple is built: a hostile rank costs nothing
        raise _fail(f"{where}: rank {len(shape)} over the limit of {MAX_RANK}")
    return TensorEntry(_get(raw, "name", str, where), _get(raw, "dtype", str, where), tuple(shape),
                       _get(raw, "partition", int, where), _get(raw, "offset", int, where),
                       _get(raw, "nbytes", int, where))


def _partition_from_json(raw: Any, where: str) -> PartitionEntry:
    raw = _object(raw, {"file", "nbytes", "hash", "chunks"}, where)
    hash_ = _object(_get(raw, "hash", dict, where), {"algo", "digest"}, f"{where}.hash")
    if _get(hash_, "algo", str, f"{where}.hash") != HASH_ALGO:
        raise _fail(f"{where}.hash.algo: unsupported {hash_['algo']!r} (expected {HASH_ALGO!r})")
    return PartitionEntry(_get(raw, "file", str, where), _get(raw, "nbytes", int, where),
                          _get(hash_, "digest", str, f"{where}.hash"), tuple(_get(raw, "chunks", list, where)))


def _from_json(doc: Any) -> Manifest:
    doc = _rule2_header(doc)
    raw_tensors = _get(doc, "tensors", list, "manifest")
    raw_parts = _get(doc, "partitions", list, "manifest")
    # The count limits first, so a hostile list is refused before any of it is converted.
    if len(raw_tensors) > MAX_TENSORS:
        raise _fail(f"{len(raw_tensors)} tensors, over the limit of {MAX_TENSORS}")
    if len(raw_parts) > MAX_PARTITIONS:
        raise _fail(f"{len(raw_parts)} partitions, over the limit of {MAX_PARTITIONS}")
    tensors = [_tensor_from_json(raw, f"tensors[{i}]") for i, raw in enumerate(raw_tensors)]
    parts = [_partition_from_json(raw, f"partitions[{i}]") for i, raw in enumerate(raw_parts)]
    manifest = Manifest(tensors, parts, _get(doc, "aliases", dict, "manifest", {}),
                        _get(doc, "chunk_bytes", int, "manifest"), _get(doc, "metadata", dict, "manifest", {}))
    if _get(doc, "total_bytes", int, "manifest") != manifest.total_bytes:  # rule 5
        raise _fail(f"total_bytes {doc['total_bytes']} is not the sum of partition sizes ({manifest.total_bytes})")
    return manifest


# ---- the rules, in the order they run --------------------------------------------------------------


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


def _rule5_chunk_bytes_is_a_power_of_two(m: Manifest) -> None:
    """Rule 5: `chunk_bytes` is a power of two in [4 KiB, 1 GiB]."""
    if type(m.chunk_bytes) is not int or not (
        MIN_CHUNK_BYTES <= m.chunk_bytes <= MAX_CHUNK_BYTES and m.chunk_bytes & (m.chunk_bytes - 1) == 0
    ):
        raise _fail(f"chunk_bytes {m.chunk_bytes!r} must be a power of two in [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}]")


def _limits_on_counts(m: Manifest) -> None:
    """The limits table: how many tensors, partitions and aliases a reader accepts."""
    if len(m.tensors) > MAX_TENSORS or len(m.partitions) > MAX_PARTITIONS or len(m.aliases) > MAX_ALIASES:
        raise _fail(f"over the limits of {MAX_TENSORS} tensors, {MAX_PARTITIONS} partitions, {MAX_ALIASES} aliases")


def _rule5_partition_files_and_digests(m: Manifest) -> None:
    """Rule 5: `partitions[i].file` is `data-{i:05d}.bin`, its size a multiple of 4096, its digest and one
    digest per chunk 32 lowercase hex digits; with the limit on the total size."""
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


def _rule3_tensors_are_named_typed_and_sized(m: Manifest) -> None:
    """Rule 3: names unique and printable, a known dtype, and `nbytes` = ∏shape × item size (within the
    limits on rank and size)."""
    names: set[str] = set()
    for i, t in enumerate(m.tensors):
        _check_name(t.name, f"tensors[{i}]")
        if t.name in names:
            raise _fail(f"tensors[{i}]: duplicate name {t.name!r}")
        names.add(t.name)
        where = f"tensors[{i}] {t.name!r}"
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


def _rule4_tensors_are_aligned_inside_and_in_order(m: Manifest) -> None:
    """Rule 4: every offset a multiple of 4096; each tensor inside its partition; no overlap, and
    `(partition, offset)` never decreases along the list."""
    prev: TensorEntry | None = None
    for i, t in enumerate(m.tensors):
        where = f"tensors[{i}] {t.name!r}"
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


def _rule5_partitions_hold_their_tensors(m: Manifest) -> None:
    """Rule 5: a partition holds at least one tensor, its size is its last tensor's end padded to 4096, and
    it is at most PARTITION_MAX_BYTES unless it holds a single non-empty tensor."""
    counts = [0] * len(m.partitions)
    sizeable = [0] * len(m.partitions)  # tensors with at least one byte
    ends = [0] * len(m.partitions)
    for t in m.tensors:
        counts[t.partition] += 1
        sizeable[t.partition] += t.nbytes > 0
        ends[t.partition] = max(ends[t.partition], t.end)
    for p, count, nonempty, end in zip(m.partitions, counts, sizeable, ends, strict=True):
        if count == 0:
            raise _fail(f"{p.file} holds no tensor")
        if p.nbytes != round_up(end, FILE_ALIGNMENT):
            raise _fail(f"{p.file}: size {p.nbytes} must be its last tensor's end {end} padded to {FILE_ALIGNMENT}")
        if p.nbytes > PARTITION_MAX_BYTES and nonempty > 1:
            raise _fail(f"{p.file}: {p.nbytes} bytes exceeds {PARTITION_MAX_BYTES} but holds {nonempty} non-empty "
                        "tensors (only a single oversized tensor may)")


def _rule6_aliases_name_stored_tensors(m: Manifest) -> None:
    """Rule 6: every alias target is a stored tensor's name (so no chains or cycles), and stored and alias
    names are disjoint."""
    names = {t.name for t in m.tensors}
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


def _rule2_metadata_is_string_to_string(m: Manifest) -> None:
    """Rule 2: `metadata` maps string to string (within the limits on entries and value size)."""
    if len(m.metadata) > MAX_METADATA_ENTRIES:
        raise _fail(f"metadata: more than {MAX_METADATA_ENTRIES} entries")
    for key, value in m.metadata.items():
        _check_name(key, "metadata")
        if not isinstance(value, str) or len(value.encode("utf-8", "surrogatepass")) > MAX_METADATA_VALUE_BYTES:
            raise _fail(f"metadata[{key!r}]: value must be a string of at most {MAX_METADATA_VALUE_BYTES} bytes")


# Each check may rely on those before it: rule 4 computes tensor ends from the sizes rule 3 checked, and the
# second rule-5 check indexes partitions by the numbers rule 4 checked.
RULES: tuple[Callable[[Manifest], None], ...] = (
    _rule5_chunk_bytes_is_a_power_of_two,
    _limits_on_counts,
    _rule5_partition_files_and_digests,
    _rule3_tensors_are_named_typed_and_sized,
    _rule4_tensors_are_aligned_inside_and_in_order,
    _rule5_partitions_hold_their_tensors,
    _rule6_aliases_name_stored_tensors,
    _rule2_metadata_is_string_to_string,
)

"""The v1 manifest: every validation rule fed hostile input, layout planning, hashing, round trips."""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import json
import random
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash

from sllmd.checkpoint import layout as layout_module
from sllmd.checkpoint import manifest as manifest_module
from sllmd.checkpoint.errors import ManifestError
from sllmd.checkpoint.layout import PartitionHasher, plan_layout
from sllmd.checkpoint.manifest import (
    ALIGNMENT,
    DTYPE_SIZES,
    FILE_ALIGNMENT,
    MAX_MANIFEST_BYTES,
    PARTITION_MAX_BYTES,
    RULES,
    Manifest,
    PartitionEntry,
    partition_file,
)
from sllmd.checkpoint.tensors import tensor_views

D = "0123456789abcdef" * 2  # a well-formed digest


def valid_doc() -> dict[str, Any]:
    """Three tensors in two partitions (4 KiB chunks), one alias, one metadata entry."""
    return {
        "format": "sllmd-checkpoint", "version": 1, "alignment": 4096, "chunk_bytes": 4096, "total_bytes": 12288,
        "tensors": [
            {"name": "a", "dtype": "F32", "shape": [2, 512], "partition": 0, "offset": 0, "nbytes": 4096},
            {"name": "b", "dtype": "BF16", "shape": [3], "partition": 0, "offset": 4096, "nbytes": 6},
            {"name": "c", "dtype": "U8", "shape": [100], "partition": 1, "offset": 0, "nbytes": 100},
        ],
        "partitions": [
            {"file": "data-00000.bin", "nbytes": 8192, "hash": {"algo": "xxh3_128", "digest": D}, "chunks": [D, D]},
            {"file": "data-00001.bin", "nbytes": 4096, "hash": {"algo": "xxh3_128", "digest": D}, "chunks": [D]},
        ],
        "aliases": {"tied": "a"},
        "metadata": {"source_format": "safetensors"},
    }


def encode(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def test_valid_doc_parses() -> None:
    m = Manifest.parse(encode(valid_doc()))
    assert [t.name for t in m.tensors] == ["a", "b", "c"]
    assert m.total_bytes == 12288 and m.tensor_bytes == 4202
    assert m.entry("tied") is m.entry("a") and m.entry("c").partition == 1
    assert m.chunk_ranges(0) == [(0, 4096), (4096, 8192)]
    assert m.partition_offsets() == [0, 8192]


def _set(path: str, value: Any) -> Callable[[dict], None]:
    """A mutation setting doc[path] (dotted; integers index lists); the sentinel DELETE removes it."""
    def mutate(doc: dict) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        target = doc
        for p in parents:
            target = target[p]
        if value is DELETE:
            del target[last]
        else:
            target[last] = value
    return mutate


DELETE = object()

HOSTILE = {
    # header
    "wrong format": (_set("format", "safetensors"), "'format' must be"),
    "wrong version": (_set("version", 2), "unsupported version 2"),
    "version as string": (_set("version", "1"), "unsupported version '1'"),
    "version as bool": (_set("version", True), "unsupported version True"),
    "unknown top-level key": (_set("extra", 1), "unknown key 'extra'"),
    "missing tensors": (_set("tensors", DELETE), "missing 'tensors'"),
    "tensors not a list": (_set("tensors", {"a": 1}), "tensors: expected list"),
    "alignment 64": (_set("alignment", 64), "alignment must be 4096"),
    "chunk size not a power of two": (_set("chunk_bytes", 12288), "power of two"),
    "chunk size too small": (_set("chunk_bytes", 512), "power of two"),
    "total_bytes wrong": (_set("total_bytes", 12289), "not the sum of partition sizes"),
    "total_bytes float": (_set("total_bytes", 12288.0), "total_bytes: expected int"),
    # tensors
    "tensor entry not an object": (_set("tensors.0", ["a"]), r"tensors\[0\]: expected an object"),
    "unknown tensor key": (_set("tensors.0.strides", [1]), "unknown key 'strides'"),
    "unknown dtype": (_set("tensors.0.dtype", "F12"), "unknown dtype 'F12'"),
    "complex dtype": (_set("tensors.0.dtype", "C64"), "unknown dtype 'C64'"),
    "wrong nbytes": (_set("tensors.0.nbytes", 4000), "nbytes 4000 != 1024 elements x 4 bytes"),
    "shape not a list": (_set("tensors.0.shape", "2x512"), "shape: expected list"),
    "float dim": (_set("tensors.0.shape", [2.0, 512]), "expected an integer, got float"),
    "bool dim": (_set("tensors.0.shape", [True, 1024]), "expected an integer, got bool"),
    "negative dim": (_set("tensors.0.shape", [-2, -512]), "outside"),
    "rank over limit": (_set("tensors.0.shape", [1] * 9), "rank 9 over the limit"),
    "giant shape": (_set("tensors.0.shape", [2**40, 2**40]), "over the .*-byte limit"),
    "giant dim next to zero": (_set("tensors.0.shape", [0, 10**30]), "outside"),
    "misaligned offset": (_set("tensors.1.offset", 4160), "not a multiple of the 4096-byte alignment"),
    "negative offset": (_set("tensors.0.offset", -4096), "outside"),
    "offset as string": (_set("tensors.0.offset", "0"), "offset: expected int"),
    "tensor past partition end": (_set("tensors.2.offset", 4096), "extend past the end of data-00001.bin"),
    "overlapping tensors": (_set("tensors.1.offset", 0), "overlaps"),
    "partition index out of range": (_set("tensors.2.partition", 2), r"partition: 2 is outside \[0, 1\]"),
    "partition index bool": (_set("tensors.0.partition", False), "partition: expected int"),
    "duplicate tensor name": (_set("tensors.1.name", "a"), "duplicate name 'a'"),
    "empty name": (_set("tensors.0.name", ""), "non-empty string"),
    "control character in name": (_set("tensors.0.name", "a\nb"), "non-printable"),
    "name too long": (_set("tensors.0.name", "x" * 1025), "longer than 1024 bytes"),
    # partitions
    "path traversal": (_set("partitions.0.file", "../../etc/passwd"), "must be 'data-00000.bin'"),
    "absolute partition path": (_set("partitions.0.file", "/etc/passwd"), "must be 'data-00000.bin'"),
    "partition names swapped": (_set("partitions.0.file", "data-00001.bin"), "must be 'data-00000.bin'"),
    "partition size unpadded": (_set("partitions.1.nbytes", 100), "not a multiple of 4096"),
    "partition with trailing garbage": (_set("partitions.1", {"file": "data-00001.bin", "nbytes": 8192, "hash": {
        "algo": "xxh3_128", "digest": D}, "chunks": [D, D]}), "padded to 4096"),
    "bad digest": (_set("partitions.0.hash.digest", "XYZ"), "32 lowercase hex"),
    "uppercase digest": (_set("partitions.0.hash.digest", D.upper()), "32 lowercase hex"),
    "unknown hash algo": (_set("partitions.0.hash.algo", "md5"), "unsupported 'md5'"),
    "chunk count wrong": (_set("partitions.0.chunks", [D]), "1 digests for 8192 bytes"),
    "bad chunk digest": (_set("partitions.0.chunks", [D, 7]), "every digest"),
    # aliases
    "alias target missing": (_set("aliases", {"tied": "nope"}), "target 'nope' does not exist"),
    "alias chain": (_set("aliases", {"x": "y", "y": "a"}), "itself an alias"),
    "alias cycle": (_set("aliases", {"x": "y", "y": "x"}), "chains and cycles"),
    "alias shadows a tensor": (_set("aliases", {"a": "b"}), "also a stored tensor"),
    "alias target not a string": (_set("aliases", {"x": 1}), "target must be a string"),
    "aliases not an object": (_set("aliases", ["a"]), "aliases: expected dict"),
    "metadata value not a string": (_set("metadata", {"k": 1}), "value must be a string"),
}


@pytest.mark.parametrize("mutate, message", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_manifest_rejected(mutate: Callable[[dict], None], message: str) -> None:
    doc = valid_doc()
    mutate(doc)
    with pytest.raises(ManifestError, match=message):
        Manifest.parse(encode(doc))


def test_empty_partition_rejected() -> None:
    doc = valid_doc()
    doc["partitions"].append({"file": "data-00002.bin", "nbytes": 0, "hash": {"algo": "xxh3_128", "digest": D},
                              "chunks": []})
    with pytest.raises(ManifestError, match=r"data-00002\.bin holds no tensor"):
        Manifest.parse(encode(doc))


def test_tensors_out_of_file_order_rejected() -> None:
    doc = valid_doc()
    doc["tensors"][0], doc["tensors"][2] = doc["tensors"][2], doc["tensors"][0]
    with pytest.raises(ManifestError, match="stored in manifest order"):
        Manifest.parse(encode(doc))


@pytest.mark.parametrize("data, message", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
    (b"[1, 2]", "top level must be a JSON object"),
    (b'{"format": "sllmd-checkpoint", "version": NaN}', "NaN is not allowed"),
    (b'{"format": "a", "format": "sllmd-checkpoint"}', "duplicate key 'format'"),
    (b"[" * 200_000 + b"]" * 200_000, "not valid JSON"),
    (b'{"total_bytes": ' + b"9" * 5000 + b"}", "not valid JSON"),
], ids=["garbage", "not utf-8", "list", "NaN", "duplicate key", "deep nesting", "huge integer"])
def test_non_json_rejected(data: bytes, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        Manifest.parse(data)


def test_oversized_manifest_rejected() -> None:
    with pytest.raises(ManifestError, match=r"over the \d+-byte limit"):
        Manifest.parse(b" " * (MAX_MANIFEST_BYTES + 1))


def test_too_many_tensors_and_partitions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifest_module, "MAX_TENSORS", 2)
    with pytest.raises(ManifestError, match="3 tensors, over the limit of 2"):
        Manifest.parse(encode(valid_doc()))
    monkeypatch.setattr(manifest_module, "MAX_TENSORS", 3)
    monkeypatch.setattr(manifest_module, "MAX_PARTITIONS", 1)
    with pytest.raises(ManifestError, match="2 partitions, over the limit of 1"):
        Manifest.parse(encode(valid_doc()))


def test_only_a_single_tensor_may_exceed_the_partition_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifest_module, "PARTITION_MAX_BYTES", 4096)
    with pytest.raises(ManifestError, match="only a single oversized tensor"):
        Manifest.parse(encode(valid_doc()))  # data-00000.bin: 8192 bytes, two tensors
    doc = valid_doc()
    doc["tensors"][1] = {"name": "b", "dtype": "BF16", "shape": [3], "partition": 1, "offset": 0, "nbytes": 6}
    doc["tensors"][2]["offset"] = 4096
    doc["partitions"][0] = {**doc["partitions"][0], "nbytes": 4096, "chunks": [D]}
    doc["partitions"][1] = {**doc["partitions"][1], "nbytes": 8192, "chunks": [D, D]}
    with pytest.raises(ManifestError, match="only a single oversized tensor"):
        Manifest.parse(encode(doc))


def test_zero_size_and_scalar_tensors_allowed() -> None:
    doc = valid_doc()
    doc["tensors"].insert(1, {"name": "empty", "dtype": "F16", "shape": [0, 7], "partition": 0, "offset": 4096,
                              "nbytes": 0})
    doc["tensors"].insert(0, {"name": "scalar", "dtype": "I64", "shape": [], "partition": 0, "offset": 0,
                              "nbytes": 8})
    doc["tensors"][1]["offset"] = 4096  # "a" moves after the scalar
    doc["tensors"][2]["offset"] = doc["tensors"][3]["offset"] = 8192
    doc["partitions"][0] = {**doc["partitions"][0], "nbytes": 12288, "chunks": [D, D, D]}
    doc["total_bytes"] = 16384
    m = Manifest.parse(encode(doc))
    assert [t.nbytes for t in m.tensors] == [8, 4096, 0, 6, 100]


def random_specs(rng: random.Random, count: int) -> list[tuple[str, str, tuple[int, ...]]]:
    specs = []
    for i in range(count):
        rank = rng.choice([0, 1, 1, 2, 2, 3])
        shape = tuple(rng.choice([0, 1, 3, 17, 64, 300]) for _ in range(rank))
        specs.append((f"layers.{i}.w{rng.randrange(10)}", rng.choice(sorted(DTYPE_SIZES)), shape))
    return specs


def manifest_for(specs: list, *, partition_max_bytes: int, chunk_bytes: int, rng: random.Random) -> Manifest:
    entries, sizes = plan_layout(specs, partition_max_bytes=partition_max_bytes)
    digest = lambda: f"{rng.getrandbits(128):032x}"  # noqa: E731
    parts = [PartitionEntry(partition_file(i), size, digest(), tuple(digest() for _ in range(0, size, chunk_bytes)))
             for i, size in enumerate(sizes)]
    aliases = {f"alias.{t.name}": t.name for t in entries if rng.random() < 0.2}
    return Manifest(entries, parts, aliases, chunk_bytes, {"seed": str(rng.random())})


@pytest.mark.parametrize("seed", range(30))
def test_round_trip_and_layout_invariants(seed: int) -> None:
    rng = random.Random(seed)
    specs = random_specs(rng, rng.randrange(1, 60))
    partition_max = rng.choice([4096, 8192, 65536, PARTITION_MAX_BYTES])
    m = manifest_for(specs, partition_max_bytes=partition_max, chunk_bytes=rng.choice([4096, 1 << 20]), rng=rng)
    data = m.to_json()
    again = Manifest.parse(data)
    assert again == m and again.to_json() == data
    assert [(t.name, t.dtype, t.shape) for t in m.tensors] == specs
    for t in m.tensors:
        assert t.offset % ALIGNMENT == 0
    for i, p in enumerate(m.partitions):
        held = [t for t in m.tensors if t.partition == i and t.nbytes]
        assert p.nbytes % FILE_ALIGNMENT == 0
        assert p.nbytes <= partition_max or len(held) == 1


@pytest.mark.parametrize("seed", range(5))
def test_random_byte_mutations_never_escape_as_other_errors(seed: int) -> None:
    rng = random.Random(seed)
    data = bytearray(manifest_for(random_specs(rng, 8), partition_max_bytes=8192, chunk_bytes=4096, rng=rng).to_json())
    for _ in range(300):
        mutated = bytearray(data)
        for _ in range(rng.randrange(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        with contextlib.suppress(ManifestError):  # valid or ManifestError, nothing else
            Manifest.parse(bytes(mutated))


def test_manifest_built_in_code_is_validated_too() -> None:
    m = Manifest.parse(encode(valid_doc()))
    tensors = list(m.tensors)
    tensors[1] = dataclasses.replace(tensors[1], offset=64)
    with pytest.raises(ManifestError, match="alignment"):
        Manifest(tensors, m.partitions, m.aliases, m.chunk_bytes)


def test_plan_layout_gives_oversized_tensor_its_own_partition() -> None:
    entries, sizes = plan_layout([("a", "U8", (10,)), ("big", "F32", (5000,)), ("c", "U8", (1,))],
                                 partition_max_bytes=8192)
    assert [(e.partition, e.offset) for e in entries] == [(0, 0), (1, 0), (2, 0)]
    assert sizes == [4096, 20480, 4096]


@pytest.mark.parametrize("split", [1, 1000, 4096, 5000, 100_000])
def test_partition_hasher_matches_per_chunk_xxh3(split: int) -> None:
    data = random.Random(split).randbytes(3 * 4096 + 123)
    hasher = PartitionHasher(4096)
    for start in range(0, len(data), split):
        hasher.update(data[start : start + split])
    digest, chunks = hasher.finish()
    assert digest == xxhash.xxh3_128_hexdigest(data)
    assert chunks == tuple(xxhash.xxh3_128_hexdigest(data[s : s + 4096]) for s in range(0, len(data), 4096))


def test_tensor_views_share_one_buffer() -> None:
    m = Manifest.parse(encode(valid_doc()))
    buffer = torch.zeros(m.total_bytes, dtype=torch.uint8)
    buffer[8192 : 8192 + 100] = torch.arange(100, dtype=torch.uint8)
    buffer[:4096].view(torch.float32)[:] = 1.5
    views = tensor_views(m, buffer)
    assert list(views) == ["a", "b", "c", "tied"]
    assert views["a"].shape == (2, 512) and bool((views["a"] == 1.5).all())
    assert views["b"].dtype == torch.bfloat16 and views["c"].tolist() == list(range(100))
    assert views["tied"] is views["a"]
    assert views["a"].untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    # Partitions placed elsewhere (e.g. reversed), still 4 KiB aligned.
    moved = torch.zeros(16384, dtype=torch.uint8)
    moved[:100] = torch.arange(100, dtype=torch.uint8)
    assert tensor_views(m, moved, [4096, 0])["c"].tolist() == list(range(100))
    with pytest.raises(ValueError, match="multiples of 4096"):
        tensor_views(m, moved, [64, 0])
    with pytest.raises(ValueError, match="does not fit"):
        tensor_views(m, buffer[:100])


def test_every_manifest_rule_of_the_spec_has_a_check_named_after_it() -> None:
    """Rules 2-6 of docs/checkpoint-format.md constrain the manifest (1 is how a writer publishes, 7 the other
    files); each has at least one check in RULES, named `_ruleN_...`."""
    spec = (Path(__file__).parents[1] / "docs" / "checkpoint-format.md").read_text()
    numbered = {int(n) for n in re.findall(r"(?m)^(\d+)\. ", spec)}
    checked = {int(check.__name__.split("_")[1].removeprefix("rule")) for check in RULES
               if check.__name__.startswith("_rule")}
    assert checked == numbered - {1, 7}


def test_manifest_and_layout_are_pure() -> None:
    """They import neither torch nor transformers, and no I/O or clock module (`time` is always loaded by the
    interpreter, so it is checked in their import statements)."""
    code = ("import sys, sllmd.checkpoint.manifest, sllmd.checkpoint.layout; "
            "loaded = {'torch', 'transformers', 'asyncio', 'lmdb', 'zmq', 'aiohttp'} & set(sys.modules); "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)
    for module in (manifest_module, layout_module):
        tree = ast.parse(Path(module.__file__).read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not imported & {"time", "asyncio", "lmdb", "zmq", "aiohttp", "os", "io"}, (module.__name__, imported)

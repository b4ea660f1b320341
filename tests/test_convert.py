"""Converting Hugging Face directories to sllmd v1: bit-exact tensors, ties, dtypes, atomicity, verify, CLI."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

import sllmd.checkpoint.convert as convert_module
from sllmd import cli
from sllmd.checkpoint.convert import convert
from sllmd.checkpoint.errors import (
    CheckpointNotFound,
    ChecksumMismatch,
    ConversionError,
    CorruptCheckpoint,
    ManifestError,
)
from sllmd.checkpoint.manifest import ALIGNMENT, Manifest
from sllmd.checkpoint.reader import read_manifest, read_tensors, verify

hf_logging.disable_progress_bar()


def tiny_llama(*, tie: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(10)  # sharper, so equal logits mean equal weights
    return model.to(dtype)


def save_bin(model: LlamaForCausalLM, path: Path) -> Path:
    """pytorch_model.bin the pre-safetensors way (transformers 5 only writes safetensors): ties share storage."""
    path.mkdir(parents=True)
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    return path


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def assert_tensors_equal(converted: dict[str, torch.Tensor], source: dict[str, torch.Tensor]) -> None:
    assert set(converted) == set(source)
    for name, tensor in source.items():
        assert same_bits(converted[name], tensor), name


def load_converted(path: Path) -> torch.nn.Module:
    """What the engine will do: build on the meta device, bind the checkpoint's tensors."""
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(read_tensors(path), strict=True, assign=True)
    # Non-persistent buffers (RoPE frequencies) are computed, not stored: rebuild them off meta.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model.eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(3, 40).reshape(1, -1)).logits


def test_demo_model_round_trip(demo_model_dir: Path, tmp_path: Path) -> None:
    dst = tmp_path / "ckpt"
    manifest = convert(demo_model_dir, dst)
    assert read_manifest(dst) == manifest
    assert manifest.metadata["order"] == "model"
    source = load_file(demo_model_dir / "model.safetensors")
    assert_tensors_equal(read_tensors(dst), source)
    # Tensors in the order the model uses them, not safetensors' sorted order.
    assert [t.name for t in manifest.tensors] == list(LlamaForCausalLM(AutoConfig.from_pretrained(dst)).state_dict())
    assert all(t.offset % ALIGNMENT == 0 for t in manifest.tensors)
    for path in demo_model_dir.iterdir():
        if path.name != "model.safetensors":
            assert (dst / path.name).read_bytes() == path.read_bytes(), path.name
    copied = [p.name for p in demo_model_dir.iterdir() if p.name != "model.safetensors"]
    assert sorted(p.name for p in dst.iterdir()) == sorted([*copied, "data-00000.bin", "manifest.json"])
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary left behind
    for p in manifest.partitions:
        assert (dst / p.file).stat().st_size == p.nbytes and p.nbytes % 4096 == 0
    report = verify(dst)
    assert report.num_bytes == manifest.total_bytes and report.num_partitions == 1


def test_demo_model_logits_identical(demo_model_dir: Path, tmp_path: Path) -> None:
    convert(demo_model_dir, tmp_path / "ckpt")
    original = AutoModelForCausalLM.from_pretrained(demo_model_dir).eval()
    assert torch.equal(logits(load_converted(tmp_path / "ckpt")), logits(original))


def test_sharded_safetensors_into_many_partitions(tmp_path: Path) -> None:
    model = tiny_llama(seed=1)
    model.save_pretrained(tmp_path / "src", max_shard_size="40KB")
    shards = sorted((tmp_path / "src").glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "src" / "model.safetensors.index.json").exists()
    manifest = convert(tmp_path / "src", tmp_path / "ckpt", partition_max_bytes=48 * 1024, chunk_bytes=4096)
    assert len(manifest.partitions) > 3
    assert all(len(p.chunk_digests) == p.nbytes // 4096 for p in manifest.partitions)
    source = {name: t for shard in shards for name, t in load_file(shard).items()}
    assert_tensors_equal(read_tensors(tmp_path / "ckpt"), source)
    assert [t.name for t in manifest.tensors] == list(model.state_dict())
    assert not (tmp_path / "ckpt" / "model.safetensors.index.json").exists()
    verify(tmp_path / "ckpt")
    assert torch.equal(logits(load_converted(tmp_path / "ckpt")), logits(model))


def test_bin_with_tied_embeddings_stored_once(tmp_path: Path) -> None:
    model = tiny_llama(tie=True, seed=2)
    src = save_bin(model, tmp_path / "src")
    manifest = convert(src, tmp_path / "ckpt")
    assert dict(manifest.aliases) == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "lm_head.weight" not in [t.name for t in manifest.tensors]
    assert manifest.metadata == {"source_format": "pytorch", "order": "file"}
    assert [t.name for t in manifest.tensors] == [n for n in model.state_dict() if n != "lm_head.weight"]
    embed = model.model.embed_tokens.weight
    assert manifest.tensor_bytes == sum(t.numel() * t.element_size() for t in model.state_dict().values()) - (
        embed.numel() * embed.element_size())
    tensors = read_tensors(tmp_path / "ckpt")
    assert_tensors_equal(tensors, model.state_dict())
    assert tensors["lm_head.weight"].data_ptr() == tensors["model.embed_tokens.weight"].data_ptr()
    converted = load_converted(tmp_path / "ckpt")
    assert converted.lm_head.weight.data_ptr() == converted.model.embed_tokens.weight.data_ptr()
    assert torch.equal(logits(converted), logits(model))


def test_tie_declared_in_config_needs_both_names_with_equal_bytes(tmp_path: Path) -> None:
    model = tiny_llama(tie=True, seed=3)
    model.save_pretrained(tmp_path / "dedup")  # safetensors drops lm_head.weight: nothing to alias
    manifest = convert(tmp_path / "dedup", tmp_path / "dedup-ckpt")
    assert not manifest.aliases and "lm_head.weight" not in [t.name for t in manifest.tensors]

    state = {name: t.clone() for name, t in model.state_dict().items()}  # both names, separate copies
    (tmp_path / "both").mkdir()
    model.config.save_pretrained(tmp_path / "both")
    save_file(state, tmp_path / "both" / "model.safetensors")
    manifest = convert(tmp_path / "both", tmp_path / "both-ckpt")
    assert dict(manifest.aliases) == {"lm_head.weight": "model.embed_tokens.weight"}
    assert_tensors_equal(read_tensors(tmp_path / "both-ckpt"), state)

    state["lm_head.weight"] = state["lm_head.weight"] + 1  # declared tied, but the file disagrees: keep both
    (tmp_path / "differ").mkdir()
    model.config.save_pretrained(tmp_path / "differ")
    save_file(state, tmp_path / "differ" / "model.safetensors")
    manifest = convert(tmp_path / "differ", tmp_path / "differ-ckpt")
    assert not manifest.aliases
    assert_tensors_equal(read_tensors(tmp_path / "differ-ckpt"), state)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_models(dtype: torch.dtype, tmp_path: Path) -> None:
    model = tiny_llama(dtype=dtype, seed=4)
    model.save_pretrained(tmp_path / "src")
    manifest = convert(tmp_path / "src", tmp_path / "ckpt")
    assert {t.dtype for t in manifest.tensors} == {"BF16" if dtype == torch.bfloat16 else "F16"}
    assert_tensors_equal(read_tensors(tmp_path / "ckpt"), load_file(tmp_path / "src" / "model.safetensors"))
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=dtype).eval()
    assert torch.equal(logits(load_converted(tmp_path / "ckpt")), logits(original))


def test_views_and_non_contiguous_tensors_from_bin(tmp_path: Path) -> None:
    base = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    state = {
        "transposed": base.T,
        "strided": base[::2, 1::3],
        "slice": base[1:3],  # a view at a storage offset
        "transposed_again": base.T,  # same storage and view as "transposed": an alias
        "expanded": torch.ones(3, 1, dtype=torch.bfloat16).expand(3, 4),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.empty(0, 4),
        "other_empty": torch.empty(0, 4),  # empty storages are never aliased
        "mask": torch.tensor([True, False, True]),
        "ids": torch.tensor([[1, -2], [3, 2**40]], dtype=torch.int64),
        "fp8": torch.linspace(-2, 2, 9).to(torch.float8_e4m3fn),
    }
    (tmp_path / "src").mkdir()
    torch.save(state, tmp_path / "src" / "pytorch_model.bin")
    manifest = convert(tmp_path / "src", tmp_path / "ckpt")
    assert dict(manifest.aliases) == {"transposed_again": "transposed"}
    assert [t.name for t in manifest.tensors] == [n for n in state if n != "transposed_again"]
    assert manifest.entry("fp8").dtype == "F8_E4M3" and manifest.entry("scalar").shape == ()
    assert_tensors_equal(read_tensors(tmp_path / "ckpt"), state)


def test_failure_mid_conversion_leaves_nothing(demo_model_dir: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(src: Path, dst: Path) -> None:
        assert any(dst.glob("data-*.bin"))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert_module, "_copy_non_weights", explode)
    with pytest.raises(OSError, match="No space left"):
        convert(demo_model_dir, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_killed_conversion_leaves_no_destination(demo_model_dir: Path, tmp_path: Path) -> None:
    # A conversion that stalls after writing its first tensor, then gets SIGKILL.
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "import sllmd.checkpoint.convert as c\n"
        "real = c._PartitionWriter.write_tensor\n"
        "def slow(self, entry, chunks):\n"
        "    real(self, entry, chunks)\n"
        "    time.sleep(60)\n"
        "c._PartitionWriter.write_tensor = slow\n"
        "c.convert(Path(sys.argv[1]), Path(sys.argv[2]))\n"
    )
    dst = tmp_path / "ckpt"
    repo = Path(__file__).parent.parent
    proc = subprocess.Popen([sys.executable, "-c", script, str(demo_model_dir), str(dst)], cwd=repo)
    try:
        deadline = time.monotonic() + 30
        while not list(tmp_path.glob(".ckpt.tmp-*/data-00000.bin")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(tmp_path.glob(".ckpt.tmp-*/data-00000.bin")), "conversion never started writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not dst.exists()
    assert [p.name.startswith(".ckpt.tmp-") for p in tmp_path.iterdir()] == [True]


def test_existing_destination_is_refused(demo_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(ConversionError, match="already exists"):
        convert(demo_model_dir, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == [tmp_path / "ckpt"]


@pytest.fixture(scope="module")
def chunked_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest]:
    """A two-partition checkpoint hashed in 4 KiB chunks; tests corrupt copies of it."""
    root = tmp_path_factory.mktemp("chunked")
    tiny_llama(seed=5).save_pretrained(root / "src")
    return root / "ckpt", convert(root / "src", root / "ckpt", partition_max_bytes=128 * 1024, chunk_bytes=4096)


def corrupt_copy(chunked_ckpt: tuple[Path, Manifest], tmp_path: Path) -> Path:
    src, _ = chunked_ckpt
    dst = tmp_path / "copy"
    dst.mkdir()
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    return dst


@pytest.mark.parametrize("partition, offset", [(0, 5000), (1, 0), (1, -1)], ids=["middle", "first byte", "padding"])
def test_verify_names_partition_and_range_of_a_flipped_byte(chunked_ckpt: tuple[Path, Manifest], tmp_path: Path,
                                                            partition: int, offset: int) -> None:
    _, manifest = chunked_ckpt
    assert len(manifest.partitions) >= 2
    ckpt = corrupt_copy(chunked_ckpt, tmp_path)
    verify(ckpt)
    part = manifest.partitions[partition]
    offset %= part.nbytes
    data = bytearray((ckpt / part.file).read_bytes())
    data[offset] ^= 0x01
    (ckpt / part.file).write_bytes(data)
    with pytest.raises(ChecksumMismatch) as info:
        verify(ckpt)
    start = offset // 4096 * 4096
    assert (info.value.partition, info.value.start, info.value.end) == (part.file, start, start + 4096)
    assert f"{part.file} bytes [{start}, {start + 4096})" in str(info.value)


def test_verify_detects_missing_and_truncated_files(chunked_ckpt: tuple[Path, Manifest], tmp_path: Path) -> None:
    ckpt = corrupt_copy(chunked_ckpt, tmp_path)
    with open(ckpt / "data-00001.bin", "r+b") as f:
        f.truncate(4096)
    with pytest.raises(CorruptCheckpoint, match=r"data-00001\.bin is 4096 bytes"):
        verify(ckpt)
    (ckpt / "data-00001.bin").unlink()
    with pytest.raises(CorruptCheckpoint, match=r"data-00001\.bin is missing"):
        read_tensors(ckpt)
    (ckpt / "manifest.json").unlink()
    with pytest.raises(CheckpointNotFound):
        verify(ckpt)


class NotATensor:
    """Anything torch.load(weights_only=True) must refuse to rebuild."""


def test_hostile_sources_are_refused(tmp_path: Path) -> None:
    src = tmp_path / "traversal"
    src.mkdir()
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../secret.safetensors"}}))
    with pytest.raises(ConversionError, match="not a plain file name"):
        convert(src, tmp_path / "a")

    src = tmp_path / "pickle"
    src.mkdir()
    torch.save({"w": NotATensor()}, src / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="refusing to unpickle"):
        convert(src, tmp_path / "b")

    src = tmp_path / "bad-header"
    src.mkdir()
    (src / "model.safetensors").write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(ConversionError, match="not a safetensors file"):
        convert(src, tmp_path / "c")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="no weights"):
        convert(tmp_path / "empty", tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad-header", "empty", "pickle", "traversal"]


def test_only_non_weight_top_level_files_are_copied(tmp_path: Path) -> None:
    src = tmp_path / "src"
    tiny_llama(seed=6).save_pretrained(src)
    (src / "README.md").write_text("# tiny\n")
    (src / ".gitattributes").write_text("*.bin lfs\n")
    (src / "training_args.bin").write_bytes(b"pickle")
    (src / "original").mkdir()
    (src / "original" / "consolidated.00.pth").write_bytes(b"weights")
    convert(src, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "README.md", "config.json", "data-00000.bin", "generation_config.json", "manifest.json"]


def test_progress_bar(demo_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stream = io.StringIO()
    manifest = convert(demo_model_dir, tmp_path / "a", progress_stream=stream)
    assert stream.getvalue().startswith("\rconverting [") and "100.0%" in stream.getvalue()
    assert stream.getvalue().endswith("\n") and f"{manifest.tensor_bytes / 2**20:.1f} MiB" in stream.getvalue()
    convert(demo_model_dir, tmp_path / "b", progress=True)  # stderr is not a terminal here: no bar
    assert capsys.readouterr().err == ""


def test_cli_convert_and_verify(demo_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / "ckpt"
    assert cli.main(["convert", str(demo_model_dir), str(dst), "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"{dst}: 21 tensors") and err == ""
    assert cli.main(["verify", str(dst)]) == 0
    assert capsys.readouterr().out.startswith(f"{dst}: ok, 21 tensors")

    def fails(argv: list[str], message: str) -> None:
        assert cli.main(argv) == 1
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and err.startswith("sllmd: ") and message in err, err

    fails(["convert", str(demo_model_dir), str(dst)], "already exists")
    fails(["convert", str(tmp_path / "missing"), str(tmp_path / "x")], "not a directory")
    fails(["convert", str(dst), str(tmp_path / "y")], "no weights")
    fails(["verify", str(tmp_path)], "not an sllmd checkpoint")
    data = bytearray((dst / "data-00000.bin").read_bytes())
    data[100] ^= 0xFF
    (dst / "data-00000.bin").write_bytes(data)
    fails(["verify", str(dst)], "checksum mismatch in data-00000.bin bytes [0, ")
    (dst / "manifest.json").write_bytes(b'{"format": "sllmd-checkpoint", "version": 9}')
    fails(["verify", str(dst)], "unsupported version 9")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # nothing partial from the failures


def test_cli_exit_code_in_a_real_process(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "sllmd", "verify", str(tmp_path)], capture_output=True, text=True,
                            cwd=Path(__file__).parent.parent, env={**os.environ, "PYTHONPATH": "."})
    assert result.returncode == 1
    assert result.stderr == f"sllmd: {tmp_path}: not an sllmd checkpoint (no manifest.json)\n"


def test_bad_tensor_name_rejected_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "src").mkdir()
    save_file({"ok": torch.zeros(4), "bad\nname": torch.zeros(4)}, tmp_path / "src" / "model.safetensors")
    monkeypatch.setattr(convert_module, "_PartitionWriter", None)  # any write attempt would crash differently
    with pytest.raises(ManifestError, match="non-printable"):
        convert(tmp_path / "src", tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]

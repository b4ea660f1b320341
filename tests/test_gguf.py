"""GGUF import (`sllmd.checkpoint.gguf.convert_gguf`, `sllmd convert MODEL.gguf DST`): the demo model written as a
GGUF (tests/gguf_builder.py, F32 and Q8_0) converts to a checkpoint that serves exactly what transformers' own GGUF
loading computes, with its tokenizer and chat template; unusable files fail with one line and leave nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from gguf import GGMLQuantizationType
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from sllmd import cli
from sllmd.checkpoint.errors import ConversionError
from sllmd.checkpoint.gguf import convert_gguf, read_gguf_metadata
from sllmd.checkpoint.reader import read_manifest, read_tensors, verify
from sllmd.engine.hf_model import build_model
from sllmd.engine.transformers import TransformersEngine
from sllmd.serving.textgen import Tokenizer
from sllmd.tools.demo_model import CHAT_TEMPLATE
from sllmd.types import SamplingParams
from tests.gguf_builder import write_llama_gguf

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

REPO = Path(__file__).parent.parent
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Can you tell me the way?"}]


@pytest.fixture(scope="module")
def ggufs(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo model as GGUF files, each alone in a directory: {"F32": path, "Q8_0": path}."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.Q8_0):
        (root / qtype.name).mkdir()
        out[qtype.name] = write_llama_gguf(demo_model_dir, root / qtype.name / f"demo-{qtype.name}.gguf", qtype=qtype)
    return out


def transformers_gguf_model(path: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """transformers' own reading of the GGUF, fully dequantised (as it does without the `kernels` package)."""
    kwargs = {"quantization_config": transformers.GgufConfig(dequantize=True)} if hasattr(
        transformers, "GgufConfig") else {}
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype, **kwargs).eval()


def converted_model(ckpt: Path) -> torch.nn.Module:
    """What the engine serves: the checkpoint's config, its tensors bound by sllmd's loader path."""
    return build_model(ckpt, read_tensors(ckpt), torch.device("cpu"), torch.float32)


def prompt_ids(tokenizer_dir: Path) -> list[int]:
    return list(AutoTokenizer.from_pretrained(tokenizer_dir).apply_chat_template(
        MESSAGES, add_generation_prompt=True)["input_ids"])


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


async def served_greedy(ckpt: Path, ids: list[int], max_tokens: int) -> list[int]:
    engine = TransformersEngine(ckpt, "cpu")
    await engine.start()
    try:
        return [t async for t in engine.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0))]
    finally:
        await engine.stop()


def test_metadata_reader(ggufs: dict[str, Path]) -> None:
    metadata = read_gguf_metadata(ggufs["Q8_0"])
    assert metadata["general.architecture"] == "llama"
    assert metadata["llama.block_count"] == 2
    assert metadata["tokenizer.ggml.model"] == "gpt2"
    assert metadata["tokenizer.ggml.tokens"] == 512  # arrays are given as their length
    assert metadata["tokenizer.chat_template"] == CHAT_TEMPLATE


def test_f32_gguf_converts_to_the_original_weights_bit_for_bit(ggufs: dict[str, Path], demo_model_dir: Path,
                                                               tmp_path: Path) -> None:
    dst = tmp_path / "ckpt"
    manifest = convert_gguf(ggufs["F32"], dst)
    assert read_manifest(dst) == manifest
    # llama.cpp's Q/K row permutation, undone by transformers: the demo model's exact bytes come back.
    original = load_file(demo_model_dir / "model.safetensors")
    tensors = read_tensors(dst)
    assert set(tensors) == set(original)
    for name, tensor in original.items():
        assert torch.equal(tensors[name], tensor), name
    assert {t.dtype for t in manifest.tensors} == {"F32"}
    verify(dst)
    assert sorted(p.name for p in dst.iterdir()) == ["chat_template.jinja", "config.json", "data-00000.bin",
                                                     "generation_config.json", "manifest.json", "tokenizer.json",
                                                     "tokenizer_config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # the hidden work directory is gone


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
async def test_converted_checkpoint_serves_what_transformers_computes_from_the_gguf(
        ggufs: dict[str, Path], demo_model_dir: Path, tmp_path: Path, qtype: str) -> None:
    gguf = ggufs[qtype]
    dst = tmp_path / "ckpt"
    convert_gguf(gguf, dst)
    reference = transformers_gguf_model(gguf)
    ids = prompt_ids(demo_model_dir)
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits
        got = converted_model(dst)(torch.tensor([ids])).logits
    assert torch.equal(got, expected)
    if qtype == "Q8_0":  # really quantised: close to the original model, not equal
        original = AutoModelForCausalLM.from_pretrained(demo_model_dir).eval()
        with torch.no_grad():
            assert not torch.equal(original(torch.tensor([ids])).logits, expected)
    # The engine's greedy tokens equal transformers' generate() on the GGUF (the demo model never emits EOS).
    x = torch.tensor([ids])
    generated = reference.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False,
                                   min_new_tokens=16)[0, len(ids):].tolist()
    assert await served_greedy(dst, ids, 16) == generated


def test_tokenizer_and_chat_template_survive(ggufs: dict[str, Path], demo_model_dir: Path, tmp_path: Path) -> None:
    dst = tmp_path / "ckpt"
    convert_gguf(ggufs["Q8_0"], dst)
    assert (dst / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    tokenizer = Tokenizer.from_dir(dst)
    original = Tokenizer.from_dir(demo_model_dir)
    assert tokenizer.has_chat_template
    assert prompt_ids(dst) == prompt_ids(demo_model_dir)
    assert tokenizer.eos_token_ids == original.eos_token_ids
    text = "The morning was cold, so we lit the stove. 42 <|user|>"
    assert tokenizer.encode(text) == original.encode(text)  # BOS added as the demo tokenizer does
    assert tokenizer.hf.convert_ids_to_tokens(list(range(512))) == original.hf.convert_ids_to_tokens(list(range(512)))


def test_dtype_bfloat16(ggufs: dict[str, Path], tmp_path: Path) -> None:
    manifest = convert_gguf(ggufs["Q8_0"], tmp_path / "ckpt", dtype="bfloat16")
    assert {t.dtype for t in manifest.tensors} == {"BF16"}
    reference = transformers_gguf_model(ggufs["Q8_0"], torch.bfloat16).state_dict()
    tensors = read_tensors(tmp_path / "ckpt")
    assert set(tensors) == set(reference)
    assert all(torch.equal(tensors[name], reference[name]) for name in reference)
    with pytest.raises(ConversionError, match="'float64' is not one of float32, float16, bfloat16"):
        convert_gguf(ggufs["Q8_0"], tmp_path / "other", dtype="float64")


def test_cli_converts_a_gguf_in_a_real_process(ggufs: dict[str, Path], tmp_path: Path) -> None:
    dst = tmp_path / "ckpt"
    command = [sys.executable, "-m", "sllmd", "convert", str(ggufs["Q8_0"]), str(dst), "--dtype", "float16"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": "."})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{dst}: 21 tensors, 0 aliases, 1 partitions")
    assert result.stderr == ""  # no transformers chatter, no bars when stderr is not a terminal
    assert {t.dtype for t in read_manifest(dst).tensors} == {"F16"}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_unsupported_architecture_is_named(demo_model_dir: Path, tmp_path: Path) -> None:
    gguf = write_llama_gguf(demo_model_dir, tmp_path / "odd.gguf", architecture="sllmdnosucharch")
    dst = tmp_path / "out" / "ckpt"
    with pytest.raises(ConversionError) as info:
        convert_gguf(gguf, dst)
    message = str(info.value)
    assert "'sllmdnosucharch'" in message and "cannot read" in message and "\n" not in message
    assert not dst.exists() and leftovers(dst.parent) == []


def test_weights_transformers_leaves_unset_fail_the_conversion(demo_model_dir: Path, tmp_path: Path) -> None:
    gguf = write_llama_gguf(demo_model_dir, tmp_path / "partial.gguf", omit={"blk.1.ffn_down.weight"})
    with pytest.raises(ConversionError, match=r"left 1 weights .* unset \(e\.g\. model\.layers\.1\.mlp\.down_proj"):
        convert_gguf(gguf, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["partial.gguf"]


def test_cli_failures_are_one_line_and_leave_nothing(ggufs: dict[str, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    def fails(argv: list[str], message: str) -> None:
        assert cli.main(["convert", *argv, "--no-progress"]) == 1
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and err.startswith("sllmd: ") and message in err, err

    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 this is a zip, not a GGUF" * 10)
    fails([str(not_gguf), str(tmp_path / "a")], "not a GGUF file")
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(ggufs["F32"].read_bytes()[:200])
    fails([str(truncated), str(tmp_path / "b")], "not a valid GGUF file")
    fails([str(tmp_path / "missing.gguf"), str(tmp_path / "c")], "not a file")
    (tmp_path / "exists").mkdir()
    fails([str(ggufs["F32"]), str(tmp_path / "exists")], "already exists")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf", "exists", "weights.gguf"]
    assert list((tmp_path / "exists").iterdir()) == []


def test_missing_gguf_package_is_a_clear_error(ggufs: dict[str, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transformers.utils, "is_gguf_available", lambda *args: False)
    with pytest.raises(ConversionError) as info:
        convert_gguf(ggufs["F32"], tmp_path / "ckpt")
    assert str(info.value) == "GGUF import needs the gguf package: pip install 'sllmd[gguf]'"
    assert list(tmp_path.iterdir()) == []


def test_failure_while_converting_leaves_nothing(ggufs: dict[str, Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import sllmd.checkpoint.convert as convert_module

    def broken(src: Path, dst: Path, **kwargs: object) -> None:
        assert (src / "model.safetensors").is_file() and src.parent.name.startswith(".ckpt.gguf-")
        raise ConversionError("disk on fire")

    monkeypatch.setattr(convert_module, "convert", broken)  # what convert_gguf imports when it runs
    with pytest.raises(ConversionError, match="disk on fire"):
        convert_gguf(ggufs["F32"], tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


async def test_deploying_a_gguf_transformers_cannot_read_is_a_400(demo_model_dir: Path, tmp_path: Path) -> None:
    from tests.nodes import running_node

    odd = write_llama_gguf(demo_model_dir, tmp_path / "odd.gguf", architecture="sllmdnosucharch")
    not_gguf = tmp_path / "fake.gguf"
    not_gguf.write_bytes(b"not a gguf at all" * 100)
    async with running_node(tmp_path / "node") as node:
        for path, words in ((odd, "'sllmdnosucharch'"), (not_gguf, "not a GGUF file")):
            body = {"name": path.stem, "checkpoint": str(path)}
            async with node.http.post(f"{node.url}/admin/models", json=body) as response:
                reply = await response.json()
            assert response.status == 400 and reply["error"]["param"] == "checkpoint", reply
            assert words in reply["error"]["message"] and "\n" not in reply["error"]["message"], reply
        assert node.node.deployments.store.entries() == []
        async with node.http.get(f"{node.url}/admin/models") as response:
            assert (await response.json())["models"] == []

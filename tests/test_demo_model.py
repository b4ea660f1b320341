"""Real (unmocked) tests of the demo model builder: layout, loading, generation, determinism, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from sllmd.tools.demo_model import SPECIAL_TOKENS, build_demo_model, main

NEW_TOKENS = 32


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir: Path):
    return AutoTokenizer.from_pretrained(demo_model_dir)


@pytest.fixture(scope="module")
def model(demo_model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(demo_model_dir).eval()


def _greedy(model, tokenizer, text: str, *, add_special_tokens: bool = True) -> list[int]:
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=add_special_tokens)
    with torch.no_grad():
        out = model.generate(
            input_ids=enc.input_ids,
            attention_mask=enc.attention_mask,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
        )
    return out[0, enc.input_ids.shape[1] :].tolist()


def _no_tmp_siblings(path: Path) -> bool:
    return not [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.tmp-")]


def test_layout(demo_model_dir: Path) -> None:
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (demo_model_dir / name).is_file(), name
    assert _no_tmp_siblings(demo_model_dir)
    with safe_open(demo_model_dir / "model.safetensors", framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    assert dtypes == {"F32"}


def test_config_matches_tokenizer(demo_model_dir: Path, tokenizer) -> None:
    cfg = json.loads((demo_model_dir / "config.json").read_text())
    gen = json.loads((demo_model_dir / "generation_config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == cfg["head_dim"] == 64
    assert (cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["intermediate_size"]) == (2, 2, 256)
    assert cfg["max_position_embeddings"] == 1024
    assert cfg["tie_word_embeddings"] is False
    assert cfg["vocab_size"] == len(tokenizer)
    for key, token_id in (
        ("bos_token_id", tokenizer.bos_token_id),
        ("eos_token_id", tokenizer.eos_token_id),
        ("pad_token_id", tokenizer.pad_token_id),
    ):
        assert cfg[key] == gen[key] == token_id, key
    assert len({cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]}) == 3


def test_tokenizer(tokenizer) -> None:
    assert 400 <= len(tokenizer) <= 600
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == SPECIAL_TOKENS[:3]
    for token in SPECIAL_TOKENS:
        assert tokenizer.convert_ids_to_tokens(tokenizer.encode(token, add_special_tokens=False)) == [token]
    # Byte-level BPE: arbitrary UTF-8 survives encode/decode.
    text = "Hello, wörld! 世界 🙂\n\ttabs  and  spaces"
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_chat_template(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<s><|system|>\nBe brief.</s>\n<|user|>\nHi there</s>\n<|assistant|>\n"
    no_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert not no_prompt.endswith("<|assistant|>\n")
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert ids == tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("prompt", ["Hello, my name is", "The", "chat"])
def test_greedy_generation_is_long_and_varied(model, tokenizer, prompt: str) -> None:
    if prompt == "chat":
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Tell me a story."}], tokenize=False, add_generation_prompt=True
        )
        new = _greedy(model, tokenizer, text, add_special_tokens=False)
    else:
        new = _greedy(model, tokenizer, prompt)
    assert len(new) == NEW_TOKENS
    assert tokenizer.eos_token_id not in new
    assert len(set(new)) >= 8
    decoded = tokenizer.decode(new)
    assert decoded.strip() and decoded.isprintable()


def test_sampling_depends_on_seed_and_never_emits_specials(model, tokenizer) -> None:
    enc = tokenizer("Hello, my name is", return_tensors="pt")
    plain_sampling = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}  # no truncation of the distribution
    samples = set()
    for seed in range(4):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=True, **plain_sampling)
        new = out[0, enc.input_ids.shape[1] :].tolist()
        assert len(new) == NEW_TOKENS
        assert not set(new) & set(tokenizer.all_special_ids)
        samples.add(tuple(new))
    assert len(samples) >= 3


def test_deterministic(demo_model_dir: Path, tmp_path: Path) -> None:
    again = build_demo_model(tmp_path / "again", seed=0)
    other = build_demo_model(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (demo_model_dir / name).read_bytes(), name
    assert (other / "tokenizer.json").read_bytes() == (demo_model_dir / "tokenizer.json").read_bytes()
    assert (other / "model.safetensors").read_bytes() != (demo_model_dir / "model.safetensors").read_bytes()


def test_refuses_non_empty_dir(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="non-empty"):
        build_demo_model(target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert (target / "keep.txt").read_text() == "precious"
    assert _no_tmp_siblings(target)


def test_empty_existing_dir_is_filled(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    assert build_demo_model(target) == target
    assert (target / "model.safetensors").is_file()
    assert _no_tmp_siblings(target)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "nested" / "model"
    assert main([str(target), "--seed", "3"]) == 0
    out, err = capsys.readouterr()
    assert out == f"{target}\n"
    assert (target / "config.json").is_file()

    assert main([str(target)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and str(target) in err

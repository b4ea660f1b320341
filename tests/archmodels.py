"""Tiny random Hugging Face causal LMs of many architectures, in standard layout, built offline.

`build(arch, out_dir, ...)` writes a model directory `AutoModelForCausalLM.from_pretrained` loads: config.json,
generation_config.json, safetensors weights (one file, or shards + index with `sharded=True`) and the tokenizer
of sllmd's demo model (byte-level BPE, vocabulary 512, `<s>` BOS added on encode, `</s>` EOS, a chat template).
Every model has 2 layers, heads of 64 dimensions (vLLM rejects head_dim 16), vocab_size 512, special-token ids
valid for that vocabulary, and weighs at most ~2 MB in float32.

Random-init weights at the usual 0.02 std make greedy decoding repeat one token or run into EOS at once. So, as
`sllmd.tools.demo_model` does, every weight of the base model is scaled up (sharper attention and MLP outputs make the
argmax move from step to step) and the logits are brought to a spread at which temperature-0.8 sampling still
differs from greedy; the LM head rows of special tokens other than BOS and of byte fragments that are not printable
ASCII are zeroed: their logit is 0 while the real tokens' maximum is far above, so output is readable text that
runs to max_tokens. The builder then checks its own greedy output on a few prompts in the saved dtype (finite
logits, at least 4 distinct ids in 12 tokens, no EOS); a draw that fails is redrawn from the next sub-seed, so the
result is deterministic for a given (arch, dtype, seed), and every architecture gets other weights.

`base_layout=True` writes the state dict the way the Hub's original `gpt2` and `facebook/opt-*` checkpoints are
laid out: only the base model's tensors, without the `transformer.`/`model.` prefix, no separate LM head (it is
tied to the input embeddings), written with safetensors directly; gpt2's carries its causal-mask buffers
(`h.N.attn.bias`) as the Hub's does. `hub_names=True` (gpt_neox only) saves the LM head as `embed_out.weight`,
the name Pythia checkpoints on the Hub use (transformers 5 calls it `lm_head`).

`build_unsupported(kind, out_dir)`: models no causal-LM backend may serve: "bert" (a BertForMaskedLM, an encoder
that transformers would map to a causal head) and "unknown" (a model_type nobody knows).
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sllmd.tools.demo_model import SPECIAL_TOKENS, VOCAB_SIZE, build_demo_model

ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "phi3", "opt", "gpt2", "gpt_neox", "falcon")
BASE_LAYOUT_ARCHS = ("gpt2", "opt")  # the Hub's original checkpoints of these are laid out so
DTYPES = ("float32", "float16", "bfloat16")
UNSUPPORTED = ("bert", "unknown")

BOS_ID, EOS_ID, PAD_ID = 0, 1, 2  # ids of <s>, </s>, <pad> in the demo tokenizer (checked when it is copied)
HIDDEN, HEADS, HEAD_DIM, FFN, LAYERS, POSITIONS = 128, 2, 64, 256, 2, 256
SHARD_BYTES = 400_000  # max_shard_size for sharded=True: 3+ shards of a float32 model

# Prompts the builder checks its greedy output on (and tests may use).
PROMPTS = ("Hello, my name is", "The morning was cold, so", "Numbers such as 1, 2")
_CHECK_TOKENS = 12
_MIN_DISTINCT = 4
_MAX_DRAWS = 20
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
_SPECIAL = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}


def _llama(**common: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_attention_heads=HEADS, num_key_value_heads=1,
                       head_dim=HEAD_DIM, tie_word_embeddings=False, **common)


def _qwen2(**common: Any) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=HIDDEN, intermediate_size=FFN, num_attention_heads=HEADS, num_key_value_heads=1,
                       tie_word_embeddings=True, use_sliding_window=False, **common)


def _qwen3(**common: Any) -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(hidden_size=HIDDEN, intermediate_size=FFN, num_attention_heads=HEADS, num_key_value_heads=1,
                       head_dim=HEAD_DIM, tie_word_embeddings=False, use_sliding_window=False, **common)


def _mistral(**common: Any) -> Any:
    from transformers import MistralConfig

    return MistralConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_attention_heads=HEADS, num_key_value_heads=1,
                         head_dim=HEAD_DIM, sliding_window=None, tie_word_embeddings=False, **common)


def _gemma2(**common: Any) -> Any:
    from transformers import Gemma2Config

    # Layer 0 slides over 16 tokens, layer 1 is global: the prompts plus 12 tokens run past the window.
    return Gemma2Config(hidden_size=HIDDEN, intermediate_size=FFN, num_attention_heads=HEADS, num_key_value_heads=1,
                        head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM, sliding_window=16,
                        layer_types=["sliding_attention", "full_attention"], **common)


def _phi3(**common: Any) -> Any:
    from transformers import Phi3Config

    return Phi3Config(hidden_size=HIDDEN, intermediate_size=FFN, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                      original_max_position_embeddings=POSITIONS, sliding_window=None, tie_word_embeddings=False,
                      **common)


def _opt(**common: Any) -> Any:
    from transformers import OPTConfig

    return OPTConfig(hidden_size=HIDDEN, ffn_dim=FFN, num_attention_heads=HEADS, word_embed_proj_dim=HIDDEN,
                     do_layer_norm_before=True, tie_word_embeddings=True, **common)


def _gpt2(**common: Any) -> Any:
    from transformers import GPT2Config

    return GPT2Config(n_embd=HIDDEN, n_inner=FFN, n_head=HEADS, n_positions=POSITIONS, tie_word_embeddings=True,
                      **common)


def _gpt_neox(**common: Any) -> Any:
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_attention_heads=HEADS, rotary_pct=0.25,
                         use_parallel_residual=True, tie_word_embeddings=False, **common)


def _falcon(**common: Any) -> Any:
    from transformers import FalconConfig

    # Falcon-7B's shape: multi-query attention, parallel attention/MLP, rotary, no biases.
    return FalconConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, multi_query=True, parallel_attn=True,
                        new_decoder_architecture=False, alibi=False, bias=False, tie_word_embeddings=True, **common)


# Per architecture: (config factory, scale of the base model's weights, scale of the logits: of an untied LM head's
# weights, or of a tied model's final norm).
# Scales were picked so that greedy output varies in float32, float16 and bfloat16 (finite, never EOS), and
# temperature-0.8 sampling differs from greedy. Gemma 2 takes less: its embeddings are scaled by sqrt(hidden).
_CONFIGS: dict[str, tuple[Callable[..., Any], float, float]] = {
    "llama": (_llama, 12.0, 1.5),
    "qwen2": (_qwen2, 12.0, 0.125),
    "qwen3": (_qwen3, 12.0, 1.5),
    "mistral": (_mistral, 12.0, 1.5),
    "gemma2": (_gemma2, 4.0, 1.0),
    "phi3": (_phi3, 12.0, 1.5),
    "opt": (_opt, 12.0, 0.125),
    "gpt2": (_gpt2, 12.0, 0.125),
    "gpt_neox": (_gpt_neox, 12.0, 1.5),
    "falcon": (_falcon, 12.0, 0.125),
}
# The final norm of models whose LM head is tied to the (scaled-up) input embeddings: their logits are ~8x as
# spread as an untied head's, so temperature-0.8 sampling would always pick the argmax. The logit scale multiplies
# this norm's weight and bias instead (a power of two: the logits scale exactly, the argmax stays).
_FINAL_NORM = {"qwen2": "model.norm", "opt": "model.decoder.final_layer_norm", "gpt2": "transformer.ln_f",
               "falcon": "transformer.ln_f"}

# Norms that multiply by (1 + weight), initialised to weight 0: scaling alone would leave them at 1, and the
# (sqrt(hidden)-scaled) tied embeddings would dominate the residual stream, so greedy output repeats one token.
_UNIT_OFFSET_NORMS = ("gemma2",)

_tokenizer_dir: Path | None = None


def tokenizer_dir() -> Path:
    """The demo model's directory (built once per process, in a temporary directory removed at exit)."""
    global _tokenizer_dir
    if _tokenizer_dir is None:
        root = Path(tempfile.mkdtemp(prefix="sllmd-archmodels-"))
        atexit.register(shutil.rmtree, root, True)
        path = build_demo_model(root / "demo", seed=0)
        config = json.loads((path / "config.json").read_text())
        assert config["vocab_size"] == VOCAB_SIZE, config
        assert {k: config[k] for k in _SPECIAL} == _SPECIAL, config
        _tokenizer_dir = path
    return _tokenizer_dir


def _copy_tokenizer(out_dir: Path) -> None:
    for name in _TOKENIZER_FILES:
        if (tokenizer_dir() / name).is_file():
            shutil.copyfile(tokenizer_dir() / name, out_dir / name)


def _muted_ids() -> list[int]:
    """Ids the model must not emit: specials other than BOS, byte fragments that are not printable ASCII."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(), local_files_only=True)
    specials = set(tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))) - {BOS_ID}
    muted = []
    for i in range(VOCAB_SIZE):
        text = tokenizer.decode([i])
        if i in specials or (i != BOS_ID and not (text and text.isascii() and text.isprintable())):
            muted.append(i)
    return muted


def _config(arch: str, dtype: str) -> Any:
    factory = _CONFIGS[arch][0]
    common = {"vocab_size": VOCAB_SIZE, "dtype": dtype, **_SPECIAL}
    if arch == "gpt2":
        common |= {"n_layer": LAYERS}
    else:
        common |= {"num_hidden_layers": LAYERS, "max_position_embeddings": POSITIONS}
    config = factory(**common)
    assert config.num_hidden_layers == LAYERS and config.vocab_size == VOCAB_SIZE, config
    return config


def _random_model(arch: str, config: Any, seed: int, muted: list[int]) -> Any:
    from transformers import AutoModelForCausalLM

    _, base_scale, head_scale = _CONFIGS[arch]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    head = model.get_output_embeddings().weight
    tied = head is model.get_input_embeddings().weight
    with torch.no_grad():
        for name, param in model.base_model.named_parameters():
            param.mul_(base_scale)
            if arch in _UNIT_OFFSET_NORMS and name.endswith("norm.weight"):
                param.add_(base_scale - 1.0)  # the norm multiplies by (1 + weight): make that base_scale too
        if not tied:
            head.mul_(head_scale)
        elif head_scale != 1.0:
            norm = model.get_submodule(_FINAL_NORM[arch])
            norm.weight.mul_(head_scale)
            if getattr(norm, "bias", None) is not None:
                norm.bias.mul_(head_scale)
        head[muted] = 0.0
    return model


def _greedy(model: Any, prompt_ids: list[int]) -> tuple[list[int], bool]:
    """(greedy ids, whether every logit was finite)."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=_CHECK_TOKENS,
                             do_sample=False, output_scores=True,
                             return_dict_in_generate=True, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    finite = all(bool(torch.isfinite(s).any(dim=-1).all()) for s in out.scores)
    return out.sequences[0, len(prompt_ids):].tolist(), finite


def _good_output(model: Any) -> bool:
    from sllmd.serving.textgen import Tokenizer

    tokenizer = Tokenizer.from_dir(tokenizer_dir())
    for prompt in PROMPTS:
        tokens, finite = _greedy(model, tokenizer.encode(prompt))
        if not finite or len(set(tokens)) < _MIN_DISTINCT or EOS_ID in tokens:
            return False
    return True


def _draw(arch: str, dtype: str, seed: int) -> Any:
    """The first sub-seed's model whose greedy output in `dtype` is good, cast to `dtype`."""
    muted = _muted_ids()
    for draw in range(_MAX_DRAWS):
        sub_seed = (seed * len(ARCHS) + ARCHS.index(arch)) * _MAX_DRAWS + draw  # archs differ, even llama/mistral
        model = _random_model(arch, _config(arch, dtype), sub_seed, muted)
        with torch.no_grad():  # parameters only: from_pretrained(dtype=...) keeps float32 buffers (rotary inv_freq)
            for param in model.parameters():
                param.data = param.data.to(getattr(torch, dtype))
        model.config.dtype = dtype
        if _good_output(model):
            return model
    raise RuntimeError(f"no random {arch} in {dtype} with varied greedy output in {_MAX_DRAWS} draws")


def _generation_config(model: Any) -> None:
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(do_sample=False, **_SPECIAL)


def _save_base_layout(arch: str, model: Any, out_dir: Path) -> None:
    """The Hub's original gpt2 / facebook/opt-* layout: base model tensors, no prefix, no LM head."""
    if arch not in BASE_LAYOUT_ARCHS:
        raise ValueError(f"base_layout is for {', '.join(BASE_LAYOUT_ARCHS)}, not {arch}")
    base = model.base_model
    assert model.get_output_embeddings().weight is base.get_input_embeddings().weight, "base layout needs tied heads"
    tensors = {name: t.detach().clone().contiguous() for name, t in base.state_dict().items()}
    if arch == "gpt2":  # the Hub's gpt2 still carries each layer's causal-mask buffer
        mask = torch.tril(torch.ones(POSITIONS, POSITIONS, dtype=model.dtype)).view(1, 1, POSITIONS, POSITIONS)
        for i in range(LAYERS):
            tensors[f"h.{i}.attn.bias"] = mask.clone()
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)


def _save_hub_names(model: Any, out_dir: Path) -> None:
    """GPT-NeoX as Pythia's Hub checkpoints name it: the LM head is `embed_out`."""
    tensors = {name: t.detach().clone().contiguous() for name, t in model.state_dict().items()}
    tensors["embed_out.weight"] = tensors.pop("lm_head.weight")
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)


def build(arch: str, out_dir: Path, *, dtype: str = "float32", sharded: bool = False, base_layout: bool = False,
          hub_names: bool = False, seed: int = 0) -> Path:
    """Write a tiny random `arch` model (one of ARCHS) with weights stored in `dtype` to `out_dir` (created; must
    not hold a model yet) and return `out_dir`. Deterministic for given arguments."""
    from transformers.utils import logging as hf_logging

    if arch not in _CONFIGS:
        raise ValueError(f"unknown arch {arch!r}; one of {', '.join(ARCHS)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}")
    if sum((sharded, base_layout, hub_names)) > 1:
        raise ValueError("sharded, base_layout and hub_names are exclusive")
    if hub_names and arch != "gpt_neox":
        raise ValueError("hub_names is for gpt_neox")
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        raise FileExistsError(f"{out_dir} already holds a model")
    out_dir.mkdir(parents=True, exist_ok=True)
    model = _draw(arch, dtype, seed)
    _generation_config(model)
    hf_logging.disable_progress_bar()
    if base_layout:
        _save_base_layout(arch, model, out_dir)
    elif hub_names:
        _save_hub_names(model, out_dir)
    else:
        model.save_pretrained(out_dir, max_shard_size=SHARD_BYTES if sharded else "50GB")
        if sharded:
            assert len(list(out_dir.glob("*.safetensors"))) >= 2, "expected several shards"
            assert (out_dir / "model.safetensors.index.json").is_file()
    _copy_tokenizer(out_dir)
    return out_dir


def build_unsupported(kind: str, out_dir: Path) -> Path:
    """A model directory no causal-LM backend may serve (kind in UNSUPPORTED); returns `out_dir`."""
    from transformers import BertConfig, BertForMaskedLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if kind == "bert":
        config = BertConfig(vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                            num_attention_heads=HEADS, intermediate_size=FFN, max_position_embeddings=POSITIONS,
                            pad_token_id=PAD_ID)
        torch.manual_seed(0)
        BertForMaskedLM(config).save_pretrained(out_dir)
    elif kind == "unknown":
        config = {"architectures": ["SllmdMysteryForCausalLM"], "model_type": "sllmd_mystery", "vocab_size": VOCAB_SIZE,
                  "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "max_position_embeddings": POSITIONS, **_SPECIAL}
        (out_dir / "config.json").write_text(json.dumps(config, indent=2))
        save_file({"embed.weight": torch.zeros(VOCAB_SIZE, HIDDEN)}, str(out_dir / "model.safetensors"),
                  metadata={"format": "pt"})
    else:
        raise ValueError(f"unknown kind {kind!r}; one of {', '.join(UNSUPPORTED)}")
    _copy_tokenizer(out_dir)
    return out_dir

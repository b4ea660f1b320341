"""Build a tiny, deterministic Llama-style causal LM for tests and demos, with no model hub.

Contract of `build_demo_model(out_dir, seed=...)`:

* writes a standard Hugging Face model directory (`config.json`, `generation_config.json`,
  float32 `model.safetensors`, fast tokenizer files with a chat template) that
  `AutoTokenizer` / `AutoModelForCausalLM.from_pretrained` load offline (head_dim 64, as vLLM needs);
* is deterministic: the same seed gives byte-identical weights and tokenizer files;
* is atomic: everything is written and fsynced in a hidden sibling directory that is then
  renamed into place, so `out_dir` is either absent/empty or complete;
* refuses to touch an existing non-empty `out_dir` (`FileExistsError`);
* takes a few seconds on a CPU.

The weights are random, scaled so greedy decoding produces varied text and temperature-1 sampling
differs from seed to seed. The model never emits special tokens (so no EOS: every request runs to
max_tokens) nor non-printable-ASCII byte fragments (so every token decodes to readable text on
its own), which is what serving tests need: predictable token counts, clean streaming.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from sllmd.fsutil import publish_dir

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

# Hand-written training text for the tokenizer. Its only job is to give BPE common English
# fragments to merge, so the demo model's output looks like words rather than raw bytes.
_CORPUS = """\
Hello, my name is Ada and I live in a small house near the river.
The morning was cold, so we lit the stove and made a pot of strong tea.
Can you tell me the way to the train station? It is past the bakery on the left.
Every spring the farmers plant wheat, barley and beans in the long fields.
She opened the window and listened to the birds singing in the old oak tree.
Our team shipped the new release on Friday after three weeks of careful testing.
The server answered every request quickly, even when the load was very high.
Please remember to water the plants while I am away for the weekend.
He wrote a short letter to his sister, asking about her new job in the city.
A good question is often more useful than a quick answer.
The children built a castle out of sand and watched the tide wash it away.
If the build fails, read the first error message before changing anything else.
They walked along the coast until the sun went down behind the hills.
My favourite books are about travel, history, and the people who make things.
What time does the museum open on Sunday? I think it opens at ten o'clock.
The recipe needs two eggs, a cup of flour, some butter and a pinch of salt.
Thank you for your help yesterday; the meeting went much better than expected.
Numbers such as 1, 2, 3, 10, 42, 100 and 2024 appear in many ordinary sentences.
The assistant should answer clearly, politely and with as few words as needed.
Where there is a queue, there is usually someone counting how long it takes.
In winter the lake freezes and the whole village comes out to skate on it.
The library keeps old maps, newspapers and photographs of the town.
I would like a table for four people at seven, near the window if possible.
Rain fell all night, and by morning the streets were shining and quiet.
Good software is tested, documented, and easy to change when the world changes.
The cat slept on the warm stones while the dog chased leaves in the garden.
We measured the time of each step and found that loading the model was slowest.
Could you explain how this works in simple terms, with one small example?
The market sells fresh fish, bright vegetables, bread, cheese and flowers.
After the concert we talked for hours about music, friends and the future.
"""

SPECIAL_TOKENS = ("<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>")
BOS, EOS, PAD = SPECIAL_TOKENS[:3]
VOCAB_SIZE = 512
_MAX_POSITIONS = 1024

# Role-tagged turns, each closed by EOS; a trailing "<|assistant|>\n" asks the model to answer.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('demo model roles are system, user and assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Multiplier applied to the random init of every layer below the LM head. At the stock 0.02 std
# greedy decoding cycles through a handful of tokens; scaling sharpens attention and MLP outputs
# enough that the argmax moves around from step to step.
_WEIGHT_SCALE = 12.0
# The LM head is scaled separately: it sets the logit spread, hence how random temperature-1
# sampling is (too sharp and every seed samples the same text), without changing the argmax.
_HEAD_SCALE = 1.5
# Logit penalty, in units of the bias feature (about 1), for tokens the model must never emit.
_MUTE_PENALTY = 100.0


def _train_tokenizer() -> Tokenizer:
    """Train a byte-level BPE on `_CORPUS`.

    The trainer is deterministic for a fixed input order (checked across processes and
    RAYON_NUM_THREADS settings), so tokenizer.json is byte-identical on every build.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols, so any UTF-8 text encodes without an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Like Llama: plain encodes get BOS prepended; the chat template writes its own BOS.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def _build_tokenizer() -> PreTrainedTokenizerFast:
    """Wrap the trained BPE as a transformers fast tokenizer with special tokens and chat template."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(SPECIAL_TOKENS[3:]),
        chat_template=CHAT_TEMPLATE,
        model_max_length=_MAX_POSITIONS,
    )


def _build_model(tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    """Seeded random float32 Llama, rescaled for varied output, never emitting special/unprintable tokens."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in (BOS, EOS, PAD)}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,  # vLLM's attention kernels reject small head sizes such as 16
        max_position_embeddings=_MAX_POSITIONS,
        tie_word_embeddings=False,
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    inner, head = model.model, model.lm_head.weight
    with torch.no_grad():
        for param in inner.parameters():
            param.mul_(_WEIGHT_SCALE)
        head.mul_(_HEAD_SCALE)
        # Llama has no output bias, so make one: residual dimension 0 is a constant (set in the
        # embedding, never written by attention or MLP), so after the final RMSNorm it is a
        # positive feature h0 on every position. Calibrate its norm weight to h0 ~ 1 on the corpus.
        inner.embed_tokens.weight[:, 0] = 1.0
        for layer in inner.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        calib = tokenizer(_CORPUS, truncation=True, max_length=_MAX_POSITIONS, return_tensors="pt")
        h0 = inner(calib.input_ids).last_hidden_state[0, :, 0].median().item()
        # Rounded so float noise between CPUs cannot change the saved bytes.
        inner.norm.weight[0] /= float(f"{h0:.2g}")
        # Tokens never to emit, even when sampling: specials (so output always runs to max_tokens,
        # never stopping at EOS) and byte fragments that are not printable ASCII (so every
        # streamed chunk is valid, readable UTF-8). They get only a large negative bias.
        specials = set(tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)))
        muted = [i for i in range(len(tokenizer)) if i in specials or not _printable(tokenizer.decode([i]))]
        head[:, 0] = 0.0
        head[muted] = 0.0
        head[muted, 0] = -_MUTE_PENALTY
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD], do_sample=False
    )
    return model


def _printable(text: str) -> bool:
    return text != "" and text.isascii() and text.isprintable()


def _save_quietly(model: LlamaForCausalLM, path: Path) -> None:
    """save_pretrained without its tqdm bar, which would clutter CLI and test output."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(path)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def build_demo_model(out_dir: Path, *, seed: int = 0) -> Path:
    """Write the demo model to `out_dir` atomically and return `out_dir`.

    Raises `FileExistsError` if `out_dir` exists and is not an empty directory; it is left as is.
    The parent directory is created if needed.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"refusing to overwrite non-empty {out_dir}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        tokenizer = _build_tokenizer()
        model = _build_model(tokenizer, seed)
        _save_quietly(model, tmp)
        tokenizer.save_pretrained(tmp)
        try:
            # Also covers another builder winning a race after the check above.
            publish_dir(tmp, out_dir)
        except FileExistsError:
            raise FileExistsError(f"refusing to overwrite non-empty {out_dir}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """CLI: `sllmd demo-model DIR [--seed N]`. Prints the model path; exit 1 if DIR is non-empty."""
    parser = argparse.ArgumentParser(
        prog="sllmd demo-model", description="Write a tiny random Llama-style model for tests and demos."
    )
    parser.add_argument("dir", type=Path, help="output directory (must not exist or be empty)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    args = parser.parse_args(argv)
    try:
        path = build_demo_model(args.dir, seed=args.seed)
    except FileExistsError as exc:
        print(f"sllmd demo-model: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0

"""`Tokenizer` calls a fast tokenizer's Rust tokenizer directly; its ids and text must be exactly what
transformers' own `encode`/`decode` give, and `TextStream`'s deltas exactly the full decode, for the
tokenizer kinds models ship: byte-level BPE (GPT-2, Llama 3, Qwen), SentencePiece-style Unigram with byte
fallback (Llama 2, Mistral, Gemma) and WordPiece (BERT-style), each trained here on a small corpus."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from sllmd.serving.textgen import TextStream, Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Serverless inference starts models in seconds, not minutes!",
    "Ünïcödé tëxt, 日本語のテキスト, emoji 🚀🔥 and numbers 12345.",
    "def f(x):\n    return x * 2  # code, tabs\tand newlines\n",
    "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e; na\u00efve fa\u00e7ade.",
] * 20
SPECIALS = ["<s>", "</s>", "<unk>", "<pad>"]


def _byte_level_bpe() -> RustTokenizer:
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _unigram_byte_fallback() -> RustTokenizer:
    tok = RustTokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(
        vocab_size=500, special_tokens=SPECIALS + byte_tokens, unk_token="<unk>", byte_fallback=True))
    return tok


def _wordpiece() -> RustTokenizer:
    tok = RustTokenizer(models.WordPiece(unk_token="<unk>"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=300, special_tokens=SPECIALS))
    return tok


KINDS = {"byte_level_bpe": _byte_level_bpe, "unigram_byte_fallback": _unigram_byte_fallback, "wordpiece": _wordpiece}


@pytest.fixture(scope="module", params=[*KINDS, "demo"])
def pair(request, tmp_path_factory, demo_model_dir: Path) -> tuple[Tokenizer, object]:
    """(sllmd's Tokenizer, transformers' tokenizer loaded separately from the same directory)."""
    if request.param == "demo":
        path = demo_model_dir
    else:
        path = tmp_path_factory.mktemp(request.param)
        PreTrainedTokenizerFast(tokenizer_object=KINDS[request.param](), bos_token="<s>", eos_token="</s>",
                                unk_token="<unk>", pad_token="<pad>").save_pretrained(path)
    return Tokenizer.from_dir(path), AutoTokenizer.from_pretrained(path, local_files_only=True)


def _random_text(rng: random.Random) -> str:
    words = " ".join(CORPUS[:5]).split(" ")
    parts = [rng.choice(words) for _ in range(rng.randint(1, 12))]
    if rng.random() < 0.3:
        parts.insert(rng.randint(0, len(parts)), rng.choice(SPECIALS))  # a special spelled in the prompt
    if rng.random() < 0.3:
        parts.append("".join(chr(rng.choice([rng.randint(32, 0x2FF), rng.randint(0x3040, 0x30FF),
                                             rng.randint(0x1F300, 0x1F5FF)])) for _ in range(rng.randint(1, 5))))
    return rng.choice([" ", "  ", "\n", ""]).join(parts)


def test_encode_and_decode_are_transformers_own(pair) -> None:
    tok, hf = pair
    bos = [hf.bos_token_id] if tok.encode("a")[:1] == [hf.bos_token_id] and hf.bos_token_id is not None else []
    rng = random.Random(7)
    for _ in range(200):
        text = _random_text(rng)
        assert tok.encode(text) == bos + hf.encode(text, add_special_tokens=False), text
        ids = [rng.randrange(len(hf)) for _ in range(rng.randint(0, 30))]
        want = hf.decode([i for i in ids if i not in tok.eos_token_ids], skip_special_tokens=True,
                         clean_up_tokenization_spaces=False)
        assert tok.decode(ids) == want, ids


def test_specials_split_only_when_asked(pair) -> None:
    """The fallback chat rendering splits special-token strings; the next encode must not."""
    tok, hf = pair
    text = "hello </s> world"
    split = tok._encode(text, split_special_tokens=True)
    assert split == hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert tok._encode(text, split_special_tokens=False) == hf.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("seed", range(3))
def test_streamed_text_is_the_full_decode(pair, seed: int) -> None:
    tok, _ = pair
    rng = random.Random(seed)
    for _ in range(30):
        ids = tok.encode(_random_text(rng))[-40:] if rng.random() < 0.6 else [
            rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 40))]
        stream = TextStream(tok)
        text = "".join(stream.push(i) for i in ids) + stream.finish()
        assert text == tok.decode(ids), ids

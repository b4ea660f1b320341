"""Text ↔ tokens for every backend: tokenising, chat templates, incremental detokenising, stops.

Engines only see token ids (`sllmd.engine.base`); this module is the one place that turns request
text into prompt ids and generated ids back into streamed text. It is pure: no I/O beyond loading
a local tokenizer directory, no asyncio.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2

from sllmd.errors import ContextLengthExceeded, InvalidRequest

if TYPE_CHECKING:
    from sllmd.serving.request import ChatMessage

# Without a chat template, a conversation is rendered as plain text, one "<Role>: <content>" line
# per message, then "Assistant:" for the model to continue, e.g. "System: Be brief.\nUser: Hi\n
# Assistant:". BOS is prepended when the tokenizer normally adds it.
FALLBACK_ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
# A stream holding more than this many tokens without producing clean text is flushed anyway, which
# bounds the per-push cost for degenerate output (invalid UTF-8, runs of skipped special tokens).
MAX_PENDING_TOKENS = 16


class Tokenizer:
    """A Hugging Face tokenizer plus the few model facts text generation needs."""

    def __init__(self, hf_tokenizer: Any, *, extra_eos_token_ids: Iterable[int] = ()) -> None:
        """Wrap a loaded `transformers` tokenizer; `extra_eos_token_ids` adds stop ids beyond its EOS."""
        self.hf = hf_tokenizer
        # A fast tokenizer's Rust tokenizer, called directly on the request path: transformers' wrapper
        # around it (batching, argument checks, BatchEncoding) cost several times the tokenising itself.
        # What the wrapper would set per call is set here once: no truncation, no padding.
        self._backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if self._backend is not None:
            self._backend.no_truncation()
            self._backend.no_padding()
        eos = {int(i) for i in extra_eos_token_ids}
        if hf_tokenizer.eos_token_id is not None:
            eos.add(int(hf_tokenizer.eos_token_id))
        self._eos = frozenset(eos)
        bos = hf_tokenizer.bos_token_id
        probe = hf_tokenizer.encode("a", add_special_tokens=True)
        self._bos: int | None = bos if bos is not None and probe[:1] == [bos] else None

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load the tokenizer of a local model directory (never the hub). EOS ids come from the
        tokenizer and from `generation_config.json`'s `eos_token_id` (an int or a list)."""
        from transformers import AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {path}")
        hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
        extra: list[int] = []
        gen_config = path / "generation_config.json"
        if gen_config.is_file():
            eos = json.loads(gen_config.read_text()).get("eos_token_id")
            extra = [eos] if isinstance(eos, int) else [i for i in eos or () if isinstance(i, int)]
        return cls(hf, extra_eos_token_ids=extra)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Ids that end generation; never rendered as text."""
        return self._eos

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows, added and special tokens included."""
        return len(self.hf)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with BOS first iff the tokenizer normally adds it; no other specials.
        Special-token strings inside `text` are recognised (completions prompts may spell them)."""
        ids = self._encode(text, split_special_tokens=False)
        return ids if self._bos is None else [self._bos, *ids]

    def _encode(self, text: str, *, split_special_tokens: bool) -> list[int]:
        """Ids of `text` without added specials; special-token strings in it are specials unless split."""
        backend = self._backend
        if backend is None:
            return self.hf(text, add_special_tokens=False, split_special_tokens=split_special_tokens)["input_ids"]
        if backend.encode_special_tokens != split_special_tokens:  # a switch transformers' calls flip too
            backend.encode_special_tokens = split_special_tokens
        return backend.encode(text, add_special_tokens=False).ids

    def render_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Prompt ids for a conversation, ending where the assistant's reply should start.

        Uses the tokenizer's chat template (`add_generation_prompt=True`); control-token strings
        inside message contents are encoded as plain text, so a user cannot forge turns. A template
        that rejects the conversation (e.g. no system role) raises `InvalidRequest`. Without a
        template, see `FALLBACK_ROLE_NAMES`.
        """
        if not self.has_chat_template:
            text = "".join(f"{FALLBACK_ROLE_NAMES[m.role]}: {m.content}\n" for m in messages) + "Assistant:"
            ids = self._encode(text, split_special_tokens=True)
            return ids if self._bos is None else [self._bos, *ids]
        conversation = [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
                        for m in messages]
        try:
            out = self.hf.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                              return_dict=True, sanitize_control_tokens=True)
        except jinja2.TemplateError as e:
            raise InvalidRequest(f"The model's chat template rejected the messages: {e}",
                                 param="messages") from None
        return list(out["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, without special or EOS tokens and without whitespace clean-up."""
        ids = [i for i in ids if i not in self._eos]
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=True)
        return self.hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def check_prompt_ids(self, ids: Sequence[int], *, param: str = "prompt") -> None:
        """Refuse user-supplied token ids the model has no embedding for."""
        size = self.vocab_size
        for i, tok in enumerate(ids):
            if not 0 <= tok < size:
                raise InvalidRequest(f"Invalid '{param}[{i}]': token id {tok} is outside the vocabulary "
                                     f"[0, {size}).", param=f"{param}[{i}]")


def resolve_max_tokens(prompt_len: int, max_tokens: int | None, context_length: int, *,
                       param: str = "messages") -> int:
    """The completion budget for a prompt of `prompt_len` tokens, OpenAI-style.

    `max_tokens=None` means "whatever fits". Raises `ContextLengthExceeded` (naming `param`) when
    the prompt leaves no room or prompt + `max_tokens` exceeds `context_length`, and
    `InvalidRequest` for an empty prompt.
    """
    if prompt_len == 0:
        raise InvalidRequest("The prompt is empty after tokenisation.", param=param)
    limit = f"This model's maximum context length is {context_length} tokens. However, "
    if max_tokens is None and prompt_len >= context_length:
        raise ContextLengthExceeded(f"{limit}your prompt has {prompt_len} tokens, which leaves no room "
                                    "for the completion. Please reduce the length of the prompt.", param=param)
    if max_tokens is not None and prompt_len + max_tokens > context_length:
        raise ContextLengthExceeded(f"{limit}you requested {prompt_len + max_tokens} tokens ({prompt_len} in "
                                    f"the prompt, {max_tokens} for the completion). Please reduce the length "
                                    "of the prompt or the maximum number of tokens.", param=param)
    return context_length - prompt_len if max_tokens is None else max_tokens


class TextStream:
    """Turns generated token ids into text deltas, one push at a time, applying stop strings.

    Each `push` decodes only a sliding window of recent ids (`_ids`, where `_ids[:_read]` is the
    last chunk already turned into text and `_read` is a clean UTF-8 boundary), so its
    cost is independent of how long the output already is. Text is held back while it ends in an
    incomplete UTF-8 sequence (decoded as U+FFFD) or in something that could begin a stop string.

    Contract: the concatenation of every `push` result and `finish()` equals
    `tokenizer.decode(all ids)` cut before the first stop string to occur (the one that ends first;
    on a tie, the longest). This holds for byte-level and byte-fallback tokenizers except after
    `MAX_PENDING_TOKENS` ids without one clean character, where U+FFFD may be emitted early. On a stop match,
    `finish_reason` becomes "stop" and `is_done` True; later pushes and `finish()` return "".
    EOS ids are skipped; whether to stop on them is the caller's business (they are engine stop ids).
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self._tok = tokenizer
        self._matchers = [_StopMatcher(s) for s in dict.fromkeys(stop) if s]
        self._ids: list[int] = []  # the window: left context, then ids not yet turned into text
        self._read = 0  # ids before it have been turned into text
        self._prefix_text = ""  # decode(_ids[:_read])
        self._held = ""  # final text not yet returned: it might start a stop string
        self.finish_reason: str | None = None
        self.is_done = False

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text that is now final (possibly "")."""
        if self.is_done or token_id in self._tok.eos_token_ids:
            return ""
        self._ids.append(token_id)
        window = self._tok.decode(self._ids)
        if len(self._ids) - self._read > MAX_PENDING_TOKENS:  # degenerate output: flush, drop context
            delta = window[len(self._prefix_text) :]
            self._ids, self._read, self._prefix_text = [], 0, ""
            return self._emit(delta, final=False)
        if len(window) <= len(self._prefix_text) or window.endswith("\ufffd"):
            return ""  # nothing new yet, or a character still incomplete
        delta = window[len(self._prefix_text) :]
        # Slide: the ids just turned into text become the next window's left context (tokenizers
        # such as SentencePiece render a token differently at the start of a sequence).
        del self._ids[: self._read]
        self._read = len(self._ids)
        self._prefix_text = self._tok.decode(self._ids)
        return self._emit(delta, final=False)

    def finish(self) -> str:
        """At the end of generation, return everything still held back (unless a stop matched)."""
        if self.is_done:
            return ""
        out = self._emit(self._tok.decode(self._ids)[len(self._prefix_text) :], final=True)
        self.is_done = True
        return out

    def _emit(self, delta: str, *, final: bool) -> str:
        """Feed final text through the stop matchers; return what can be released now."""
        if not self._matchers:  # most requests: no stop strings, nothing to hold back
            return delta
        text = self._held + delta
        for pos, ch in enumerate(delta, start=len(self._held) + 1):
            hits = [len(m.stop) for m in self._matchers if m.feed(ch)]
            if hits:  # the first stop to complete wins; on a tie, the longest (earliest start)
                self._held, self.finish_reason, self.is_done = "", "stop", True
                return text[: pos - max(hits)]
        keep = 0 if final else max((m.state for m in self._matchers), default=0)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep]


class _StopMatcher:
    """Knuth–Morris–Pratt matcher: O(1) amortised per character, however long the stop string.

    `state` is the length of the longest suffix of the text fed so far that is a prefix of `stop`.
    """

    def __init__(self, stop: str) -> None:
        self.stop = stop
        self.state = 0
        self._fail = [0] * len(stop)
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self._fail[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self._fail[i] = k

    def feed(self, ch: str) -> bool:
        """Advance by one character; True when `stop` has just been completed."""
        k = self.state
        while k and ch != self.stop[k]:
            k = self._fail[k - 1]
        if ch == self.stop[k]:
            k += 1
        if k == len(self.stop):
            self.state = self._fail[k - 1]
            return True
        self.state = k
        return False

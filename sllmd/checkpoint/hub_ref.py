"""Names of models on the Hugging Face Hub, as sllmd sources spell them: pure, no network.

`parse_hub_ref` tells Hub-shaped text (`Qwen/Qwen2.5-0.5B-Instruct`, `org/name@rev`, `hf://gpt2`,
`org/name/model-q4.gguf`) from paths and URLs; `HubRef.source` is its canonical spelling, and
`parse_hub_ref(ref.source) == ref` for every valid `HubRef`. The client that resolves and downloads them is
`sllmd.checkpoint.hub`.
"""

from __future__ import annotations

from dataclasses import dataclass

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

HF_SCHEME = "hf://"


@dataclass(frozen=True, slots=True)
class HubRef:
    """A model on the Hub: a repo at a revision (branch, tag or commit sha; None = "main"), either the
    model snapshot (`filename` None) or one file of it (e.g. a `.gguf`). Invalid values raise `ValueError`."""

    repo_id: str
    revision: str | None = None
    filename: str | None = None

    def __post_init__(self) -> None:
        try:
            validate_repo_id(self.repo_id)
        except HFValidationError as exc:
            raise ValueError(f"invalid Hub repo id {self.repo_id!r}: {_first_line(exc)}") from None
        if self.revision is not None and (not self.revision or any(c.isspace() for c in self.revision)):
            raise ValueError(f"invalid revision {self.revision!r}: it must be non-empty, without spaces")
        if self.filename is not None:
            check_filename(self.filename)
            # hf://gpt2/x.gguf would read back as the repo "gpt2/x.gguf"
            if "/" not in self.repo_id:
                raise ValueError(f"a file needs the ORG/NAME repo form, not {self.repo_id!r}")

    @property
    def source(self) -> str:
        """The canonical spelling: `hf://REPO[/FILE][@REV]`."""
        text = HF_SCHEME + self.repo_id
        if self.filename is not None:
            text += "/" + self.filename
        if self.revision is not None:
            text += "@" + self.revision
        return text

    def __str__(self) -> str:
        return self.source


def parse_hub_ref(text: str) -> HubRef | None:
    """The Hub ref `text` spells, or None when it is not Hub-shaped (an absolute or `./` path, a URL, a
    single word). Hub-shaped text that is invalid raises `ValueError` with a one-line reason.

    Recognised: `hf://REPO[@REV]` (REPO is ORG/NAME, or a legacy single name like `gpt2`),
    `hf://ORG/NAME/PATH/TO/FILE[@REV]`, and the bare `ORG/NAME[@REV]` and `ORG/NAME/FILE.gguf[@REV]`.
    The revision follows the first `@`, so file paths cannot contain one."""
    text = text.strip()
    if text.startswith(HF_SCHEME):
        body, revision = _split_revision(text[len(HF_SCHEME) :], text)
        segments = body.split("/")
        if not body or "" in segments:
            raise ValueError(f"invalid Hub reference {text!r}: expected hf://ORG/NAME[/FILE][@REVISION]")
        if len(segments) <= 2:
            return HubRef(body, revision)
        return HubRef("/".join(segments[:2]), revision, "/".join(segments[2:]))
    if "://" in text or text.startswith(("/", ".", "~", "\\")) or "/" not in text:
        return None
    body, revision = _split_revision(text, text)
    segments = body.split("/")
    if "" in segments:
        return None  # `org/`, `a//b`: a path, not an id
    if len(segments) == 2:
        return HubRef(body, revision)
    if len(segments) == 3 and segments[2].lower().endswith(".gguf"):
        return HubRef("/".join(segments[:2]), revision, segments[2])
    return None


def check_filename(filename: str) -> None:
    segments = filename.split("/")
    if not filename or any(seg in ("", ".", "..") for seg in segments) or "@" in filename or "\\" in filename:
        raise ValueError(f"invalid file path in repo {filename!r}: expected a relative path like dir/model.gguf, "
                         "without '@', '\\', '.' or '..' parts")


def _split_revision(body: str, text: str) -> tuple[str, str | None]:
    if "@" not in body:
        return body, None
    body, revision = body.split("@", 1)
    if not revision:
        raise ValueError(f"invalid Hub reference {text!r}: empty revision after '@'")
    return body, revision



def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

"""How a tool command reports a failure: one `sllmd: ...` line on stderr and exit status 1."""

from __future__ import annotations

import sys

from sllmd.checkpoint.errors import CheckpointError


def report_failure(exc: BaseException) -> int:
    """Print `exc` as one line on stderr (with its type where it is not an expected error); returns 1."""
    known = isinstance(exc, CheckpointError | OSError)
    message = str(exc) if known else f"{type(exc).__name__}: {exc}"
    print("sllmd: " + " ".join(message.split()), file=sys.stderr)
    return 1

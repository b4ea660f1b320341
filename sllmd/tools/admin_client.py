"""What `sllmd ps` and `sllmd ls` share: a node's address and key from flags or environment, one GET of its
admin API, and output as aligned columns or JSON.

The client is the standard library's urllib: these commands must start in milliseconds, so they import
nothing of the daemon but `human_bytes`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8343"  # server.port's default
TIMEOUT_S = 10.0
NONE = "-"  # a cell with no value


class AdminCallFailed(Exception):
    """A call to the admin API got no usable answer; the message is one line, for people."""


def client_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser with --url (env SLLMD_URL), --api-key (env SLLMD_API_KEY) and --json."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--url", default=os.environ.get("SLLMD_URL", DEFAULT_URL),
                        help=f"any node's HTTP address (env SLLMD_URL; default {DEFAULT_URL})")
    parser.add_argument("--api-key", default=os.environ.get("SLLMD_API_KEY"),
                        help="one of the server's api_keys, sent as a bearer token (env SLLMD_API_KEY)")
    parser.add_argument("--json", action="store_true", help="print a JSON list of objects instead of columns")
    return parser


def get_json(base_url: str, path: str, api_key: str | None) -> Any:
    """GET `path` of the node at `base_url` and decode its JSON body. Raises AdminCallFailed when the node
    cannot be reached, answers with an error status (its error message is the reason) or with no JSON."""
    url = base_url.rstrip("/") + path
    headers = {"Accept": "application/json"} | ({"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        request = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        raise AdminCallFailed(f"{url} answered {exc.code}: {_error_message(exc)}") from None
    except urllib.error.URLError as exc:
        raise AdminCallFailed(f"cannot reach {url}: {exc.reason}") from None
    except (OSError, ValueError) as exc:  # a timeout or reset mid-answer, a malformed URL, a body not JSON
        raise AdminCallFailed(f"{url}: {exc}") from None


def _error_message(exc: urllib.error.HTTPError) -> str:
    """The OpenAI-shaped error body's message, else the status's reason phrase."""
    try:
        return str(json.load(exc)["error"]["message"])
    except (OSError, ValueError, TypeError, KeyError):
        return str(exc.reason)


def run_command(prog: str, produce: Callable[[], None]) -> int:
    """Run `produce`; an AdminCallFailed, or an answer not shaped as the admin API's (a missing key, a value
    of the wrong type), becomes one `PROG: reason` line on stderr and exit status 1."""
    try:
        produce()
    except AdminCallFailed as exc:
        reason = str(exc)
    except (KeyError, TypeError, AttributeError) as exc:
        reason = f"unexpected answer, not sllmd's admin API? ({type(exc).__name__}: {exc})"
    else:
        return 0
    print(f"{prog}: " + " ".join(reason.split()), file=sys.stderr)
    return 1


def print_rows(rows: Sequence[dict[str, Any]], columns: dict[str, Callable[[dict[str, Any]], str]],
               as_json: bool) -> None:
    """`rows` as a JSON list, or as one header line of `columns`' names and one line per row of what each
    column's function makes of it, left-aligned with two spaces between columns."""
    if as_json:
        print(json.dumps(list(rows), indent=2))
        return
    table = [list(columns)] + [[cell(row) for cell in columns.values()] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        print("  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip())


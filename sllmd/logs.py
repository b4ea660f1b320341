"""Structured logs: one JSON object per line (journald-friendly), or plain text for a terminal.

Fields passed with `extra={...}` become keys of the JSON object.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in vars(record).items() if k not in _RECORD_FIELDS)
        line = f"{self.formatTime(record)} {record.levelname:<7} {record.name}: {record.getMessage()} {fields}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line.rstrip()


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiohttp.access", "httpx", "httpx2"):  # httpx2: huggingface_hub's client, a line per request
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # transformers logs through a handler of its own, in plain text, and resets its level when first
    # imported; its environment switch is the one setting that sticks. Its warnings (e.g. a prompt
    # longer than the model's context, which we reject with a 400 anyway) are noise in a daemon's log.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

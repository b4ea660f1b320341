"""Shared pytest fixtures for the sllmd test suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sllmd.tools.demo_model import build_demo_model

# Daemons started by tests (they inherit this environment) probe with a small synthetic checkpoint: the
# probe still runs in every one of them, at a fraction of the default's cost.
os.environ.setdefault("SLLMD_STORE_PROBE_MB", "16")


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny deterministic Llama-style model directory (seed 0), built once per session."""
    return build_demo_model(tmp_path_factory.mktemp("demo") / "model", seed=0)

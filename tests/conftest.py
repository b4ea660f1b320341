"""Shared pytest fixtures for the sllmd test suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from sllmd.demo_model import build_demo_model


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny deterministic Llama-style model directory (seed 0), built once per session."""
    return build_demo_model(tmp_path_factory.mktemp("demo") / "model", seed=0)

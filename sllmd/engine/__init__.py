"""Inference backends behind one contract (`base.Engine`)."""

from __future__ import annotations

from pathlib import Path

from sllmd.engine.base import Backend, Engine


def create_engine(backend: Backend, checkpoint_dir: Path, device: str) -> Engine:
    """A new, not yet started engine. Heavy backends are imported only when used."""
    if backend is Backend.DUMMY:
        from sllmd.engine.dummy import DummyEngine

        return DummyEngine(checkpoint_dir)
    if backend is Backend.TRANSFORMERS:
        from sllmd.engine.transformers import TransformersEngine

        return TransformersEngine(checkpoint_dir, device)
    raise ValueError(f"unknown backend {backend}")

"""The tokenizer of every deployed checkpoint, loaded once per node and kept in memory."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sllmd.checkpoint.fetch import is_url
from sllmd.checkpoint.store import CheckpointStore, checkpoint_id
from sllmd.serving.textgen import Tokenizer


class Tokenizers:
    """One loaded tokenizer per checkpoint source, loaded off the event loop from the store's copy of it
    (v1 checkpoints carry the tokenizer files) and kept even if that copy is evicted later. A local source
    the store lacks serves its own files; a URL (or a local source that is gone) the store lacks is fetched
    first, from a peer if one has it. A failed load is forgotten, so a later call retries."""

    def __init__(self, store: CheckpointStore) -> None:
        self.store = store
        self._loaded: dict[str, asyncio.Future[Tokenizer]] = {}  # source -> its tokenizer, loading or loaded

    async def get(self, checkpoint: str) -> Tokenizer:
        future = self._loaded.get(checkpoint)
        if future is None:
            future = self._loaded[checkpoint] = asyncio.ensure_future(self._load(checkpoint))
        try:
            return await asyncio.shield(future)
        except Exception:
            if self._loaded.get(checkpoint) is future:
                del self._loaded[checkpoint]
            raise

    def forget(self, checkpoint: str) -> None:
        self._loaded.pop(checkpoint, None)

    async def _load(self, checkpoint: str) -> Tokenizer:
        cid = checkpoint_id(checkpoint)
        if self.store.contains(cid):
            directory = self.store.path_of(cid)
        elif not is_url(checkpoint) and Path(checkpoint).is_dir():
            directory = Path(checkpoint)
        else:
            directory = (await self.store.ensure(checkpoint))[0]
        return await asyncio.to_thread(Tokenizer.from_dir, directory)

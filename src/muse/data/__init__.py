"""muse.data: corpus sources -> train/val split -> token shards (`muse prepare`), and resumable loaders.

    from muse.data import PrepareConfig, TokenLoader, bytes_per_token
    from muse.data.prepare import prepare   # (a package attribute named `prepare` is the submodule)
    meta = prepare(PrepareConfig(out="runs/demo"))                 # writes runs/demo/data/
    loader = TokenLoader("runs/demo", "train", batch_size=16, seq_len=256)
    x, y = loader.next_batch()

sources.py (documents from the embedded corpus or local files), shards.py (token file format),
prepare.py (the pipeline), loader.py (batches; the only module here that imports torch).
Names are resolved lazily so that `muse prepare` does not pay for importing torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Document": "muse.data.sources",
    "Corpus": "muse.data.sources",
    "load_corpus": "muse.data.sources",
    "clean_play_markdown": "muse.data.sources",
    "ShardWriter": "muse.data.shards",
    "open_shards": "muse.data.shards",
    "PrepareConfig": "muse.data.prepare",
    "TokenLoader": "muse.data.loader",
    "bytes_per_token": "muse.data.loader",
    "read_meta": "muse.data.loader",
    "resolve_data_dir": "muse.data.loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'muse.data' has no attribute {name!r}")

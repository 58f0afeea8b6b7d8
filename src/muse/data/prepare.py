"""The prepare pipeline: corpus -> train/val split -> BPE tokenizer -> token shards + meta.json in RUN/data.

    meta = prepare(PrepareConfig(out="runs/demo"))            # the Shakespeare corpus
    meta = prepare(PrepareConfig(out="runs/x", paths=("notes/",), vocab_size=8192))

What `<out>/data/` holds afterwards (docs/data.md has the details):
    tokenizer.json                 trained on the train split only (or a copy of --tokenizer)
    train_000.bin/.json, ...       EOT doc EOT doc ... as uint16/uint32 (shards.py)
    val_000.bin/.json, ...
    meta.json                      per split documents/bytes/tokens/bytes_per_token, vocab, dtype,
                                   tokenizer sha256, the input fingerprint, the muse version
Outputs are a pure function of the inputs and flags (no timestamps), so a rerun is byte-identical. The
fingerprint (sha256 over every document's name and text and every flag that changes the output) makes
a rerun with the same inputs a no-op and protects a directory prepared from something else unless
`force`. The directory is built in a temporary sibling and renamed into place (atomic).

This module knows the pipeline; reading text is sources.py, the file format is shards.py, reading
batches back is loader.py. It does not know about models or torch.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from muse import __version__
from muse.common.errors import DataError, OutputExistsError, UsageError
from muse.common.logging import get_logger, progress, progress_enabled
from muse.common.paths import atomic_dir, atomic_write_json, ensure_writable_dir, read_json
from muse.data.shards import (
    DEFAULT_SHARD_TOKENS,
    SPLITS,
    ShardWriter,
    dtype_for_vocab,
    dtype_name,
    shard_infos,
)
from muse.data.sources import Corpus, Document, load_corpus
from muse.tokenizer.special import MIN_VOCAB_SIZE

FORMAT = "muse.data/1"
META_FILENAME = "meta.json"
TOKENIZER_FILENAME = "tokenizer.json"
DATA_DIRNAME = "data"

# Documents are cut into chunks of about this many characters for encoding: encode_batch parallelises
# over its inputs, so one big file would otherwise run on one core, and HF builds a per-token Encoding
# (ids, token strings, masks) for a whole input, which for a 1 GB document would not fit in memory.
CHUNK_CHARS = 1 << 16
# Characters handed to one encode_batch call (64 chunks: enough to keep 16+ cores busy). Measured on a
# 20 MB single-file corpus: peak RSS 690 MB with 256K/8M, 410 MB with 64K/4M, same speed.
BATCH_CHARS = 1 << 22

log = get_logger(__name__)


@dataclass
class PrepareConfig:
    out: str = "runs/demo"  # the run directory; data goes to <out>/data
    paths: Sequence[str] = ()  # local files/directories; empty -> `corpus`
    corpus: str | None = None  # a named corpus; None and no paths -> shakespeare
    vocab_size: int | None = None  # None -> muse.tokenizer.default_vocab_size(train bytes)
    tokenizer: str | None = None  # reuse this tokenizer.json instead of training one
    text_field: str = "text"  # the field holding the text in .jsonl/.parquet inputs
    val_fraction: float = 0.05  # of documents (at least one when there are two or more)
    seed: int = 0  # picks which documents go to val
    shard_tokens: int = DEFAULT_SHARD_TOKENS  # tokens per shard file
    force: bool = False  # replace <out>/data even if it was prepared from other inputs

    def validate(self) -> None:
        if self.paths and self.corpus:
            raise UsageError("give either PATHS or --corpus, not both")
        if not (isinstance(self.val_fraction, int | float) and 0 < self.val_fraction < 1):
            raise UsageError(f"--val-fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")
        if self.vocab_size is not None and self.tokenizer is not None:
            raise UsageError("give either --vocab-size (train a tokenizer) or --tokenizer (reuse one), not both")
        if self.vocab_size is not None and self.vocab_size < MIN_VOCAB_SIZE:
            raise UsageError(
                f"--vocab-size {self.vocab_size} is too small: the minimum is {MIN_VOCAB_SIZE} (256 bytes + "
                "16 special tokens); pass a larger one or leave it out for a size fitted to the corpus"
            )
        if self.shard_tokens < 1:
            raise UsageError(f"shard_tokens must be at least 1, got {self.shard_tokens}")


# --------------------------------------------------------------------------------------------------
# Split


def _split_key(seed: int, name: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{name}".encode()).digest()


def split_documents(docs: Sequence[Document], val_fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """(train, val), each in the input order.

    Two or more documents: the `round(val_fraction * n)` documents (at least 1, at most n - 1) whose
    sha256(seed, name) sorts first go to val. Hashing names, not positions, keeps a document on the
    same side when others are added or removed. A single document is cut in two at a line start near
    (1 - val_fraction) of its length, so one big .txt file still gets a validation split.
    """
    n = len(docs)
    if n == 1:
        return _split_one(docs[0], val_fraction)
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    ranked = sorted(range(n), key=lambda i: _split_key(seed, docs[i].name))
    val_idx = set(ranked[:n_val])
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]
    return train, val


def _split_one(doc: Document, val_fraction: float) -> tuple[list[Document], list[Document]]:
    text = doc.text
    target = min(len(text) - 1, max(1, int(len(text) * (1 - val_fraction))))
    cut = text.find("\n", target - 1)
    cut = target if cut < 0 or cut + 1 >= len(text) else cut + 1
    if len(text) < 2:
        cut = len(text)
    return [Document(f"{doc.name}[train]", text[:cut])], [Document(f"{doc.name}[val]", text[cut:])]


# --------------------------------------------------------------------------------------------------
# Tokenize


def chunk_text(text: str, chunk_chars: int = CHUNK_CHARS) -> list[str]:
    """Cut `text` into pieces of about `chunk_chars` at positions no BPE piece can cross.

    A cut is made only right after a newline that is followed by a letter. The split regex
    (muse.tokenizer.SPLIT_PATTERN) ends every pre-token that contains a newline at that newline, and a
    word's optional leading character may not be a newline, so encoding the pieces separately gives
    exactly the ids of encoding the whole (tests/test_prepare.py checks this against the whole).
    """
    if len(text) <= chunk_chars:
        return [text]
    pieces, start = [], 0
    while len(text) - start > chunk_chars:
        pos = start + chunk_chars
        while True:
            nl = text.find("\n", pos)
            if nl < 0 or nl + 1 >= len(text):
                nl = -1
                break
            if text[nl + 1].isalpha():
                break
            pos = nl + 1
        if nl < 0:
            break
        pieces.append(text[start : nl + 1])
        start = nl + 1
    pieces.append(text[start:])
    return pieces


def _batches(docs: Sequence[Document], chunk_chars: int) -> Iterator[list[tuple[bool, str]]]:
    """Groups of (starts_a_document, chunk) holding about BATCH_CHARS characters each."""
    batch, size = [], 0
    for doc in docs:
        for i, chunk in enumerate(chunk_text(doc.text, chunk_chars)):
            batch.append((i == 0, chunk))
            size += len(chunk)
            if size >= BATCH_CHARS:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def tokenize_documents(tok, docs: Sequence[Document], chunk_chars: int = CHUNK_CHARS, desc: str = "") -> Iterator[np.ndarray]:
    """The token stream `EOT doc EOT doc ...` of `docs`, as consecutive int64 arrays."""
    eot = tok.eot_id
    total = sum(len(d.text) for d in docs)
    with progress(total=total, desc=desc or "tokenize", unit="char", unit_scale=True) as bar:
        for batch in _batches(docs, chunk_chars):
            ids = tok.encode_batch([chunk for _, chunk in batch])
            n = sum(map(len, ids)) + sum(1 for start, _ in batch if start)
            parts = ([eot] if start else [] for start, _ in batch)
            flat = itertools.chain.from_iterable(itertools.chain.from_iterable(zip(parts, ids)))
            yield np.fromiter(flat, dtype=np.int64, count=n)
            bar.update(sum(len(chunk) for _, chunk in batch))


# --------------------------------------------------------------------------------------------------
# Fingerprint and the up-to-date check


def fingerprint(corpus: Corpus, cfg: PrepareConfig, tokenizer_sha256: str | None) -> str:
    """sha256 over the format, the muse version, every output-affecting flag and every document."""
    h = hashlib.sha256()
    settings = {
        "format": FORMAT,
        "muse": __version__,
        "val_fraction": float(cfg.val_fraction),
        "seed": int(cfg.seed),
        "vocab_size": cfg.vocab_size,
        "tokenizer_sha256": tokenizer_sha256,
        "shard_tokens": int(cfg.shard_tokens),
        "skipped": [list(s) for s in corpus.skipped],
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    for doc in corpus.documents:
        for part in (doc.name.encode(), doc.text.encode()):
            h.update(len(part).to_bytes(8, "little"))  # length-prefixed: no two inputs frame alike
            h.update(part)
    return h.hexdigest()


def _existing_state(data_dir: Path, fp: str) -> str:
    """'absent', 'current' (same fingerprint, files intact), 'damaged' (same fingerprint) or 'other'."""
    if not data_dir.exists():
        return "absent"
    try:
        meta = read_json(data_dir / META_FILENAME)
    except (OSError, ValueError):
        return "other"
    if not isinstance(meta, dict) or meta.get("fingerprint") != fp:
        return "other"
    try:
        for split in SPLITS:
            shard_infos(data_dir, split)
    except (DataError, OSError):
        return "damaged"
    return "current" if (data_dir / TOKENIZER_FILENAME).is_file() else "damaged"


# --------------------------------------------------------------------------------------------------
# The pipeline


def data_dir_of(out: str | os.PathLike) -> Path:
    return Path(out) / DATA_DIRNAME


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _nbytes(docs: Sequence[Document]) -> int:
    return sum(len(d.text.encode("utf-8")) for d in docs)


def prepare(cfg: PrepareConfig) -> dict:
    """Run the pipeline; returns meta.json's content plus `data_dir` and `up_to_date` (not stored)."""
    from muse.tokenizer import Tokenizer, default_vocab_size, train_bpe

    cfg.validate()
    corpus = load_corpus(cfg.paths, cfg.corpus, text_field=cfg.text_field)
    given_tok = Tokenizer.from_file(cfg.tokenizer) if cfg.tokenizer else None
    given_sha = hashlib.sha256(given_tok.to_str().encode()).hexdigest() if given_tok else None
    fp = fingerprint(corpus, cfg, given_sha)

    data_dir = data_dir_of(cfg.out)
    state = _existing_state(data_dir, fp)
    if state == "current" and not cfg.force:
        meta = read_json(data_dir / META_FILENAME)
        return {**meta, "data_dir": str(data_dir), "up_to_date": True}
    if state == "damaged" and not cfg.force:
        raise OutputExistsError(f"{data_dir} was prepared from these inputs but its files are damaged; pass --force to rebuild it")
    if state == "other" and not cfg.force:
        raise OutputExistsError(
            f"{data_dir} already holds data prepared from other inputs or flags; "
            "pass --force to replace it, or choose another --out"
        )
    ensure_writable_dir(cfg.out)

    train_docs, val_docs = split_documents(corpus.documents, cfg.val_fraction, cfg.seed)
    split_docs = {"train": train_docs, "val": val_docs}
    n_bytes = {s: _nbytes(d) for s, d in split_docs.items()}

    if given_tok is not None:
        tok = given_tok
    else:
        vocab = cfg.vocab_size or default_vocab_size(n_bytes["train"])
        log.info("training a %d-token BPE on the train split (%.1f MB, %d documents)", vocab, n_bytes["train"] / 1e6, len(train_docs))
        tok = train_bpe([d.text for d in train_docs], vocab, show_progress=progress_enabled())

    splits = {}
    with atomic_dir(data_dir, overwrite=True) as tmp:
        tok.save(tmp / TOKENIZER_FILENAME)
        for split, docs in split_docs.items():
            with ShardWriter(tmp, split, tok.vocab_size, cfg.shard_tokens) as writer:
                for arr in tokenize_documents(tok, docs, desc=f"tokenize {split}"):
                    writer.write(arr)
            tokens = sum(s.count for s in writer.shards)
            splits[split] = {
                "documents": len(docs),
                "bytes": n_bytes[split],
                "tokens": tokens,
                "bytes_per_token": round(n_bytes[split] / tokens, 4),  # tokens >= 1: an EOT per document
                "shards": len(writer.shards),
            }
        meta = {
            "format": FORMAT,
            "created_by": f"muse {__version__}",
            "fingerprint": fp,
            "source": list(map(str, cfg.paths)) if cfg.paths else (cfg.corpus or "shakespeare"),
            "vocab_size": tok.vocab_size,
            "dtype": dtype_name(dtype_for_vocab(tok.vocab_size)),
            "eot_id": tok.eot_id,
            "tokenizer": {
                "file": TOKENIZER_FILENAME,
                "sha256": _sha256_file(tmp / TOKENIZER_FILENAME),
                "from": str(cfg.tokenizer) if cfg.tokenizer else "trained on the train split",
            },
            "settings": {
                "val_fraction": cfg.val_fraction,
                "seed": cfg.seed,
                "vocab_size": cfg.vocab_size,
                "shard_tokens": cfg.shard_tokens,
                "text_field": cfg.text_field,
            },
            "splits": splits,
            "val_documents": [d.name for d in val_docs[:20]],
            "skipped": [s._asdict() for s in corpus.skipped],
            "ignored_files": corpus.ignored_files,
        }
        atomic_write_json(tmp / META_FILENAME, meta)
    return {**meta, "data_dir": str(data_dir), "up_to_date": False}

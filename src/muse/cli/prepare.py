"""Turn a corpus into a BPE tokenizer and token shards in RUN/data (default corpus: Shakespeare's plays).

Text comes from --corpus (shakespeare, the default) or from PATHS: .txt/.md files, .jsonl/.parquet files
(one document per row, field --text-field) and directories of them. Documents are split into train and
val, a tokenizer is trained on train only (or --tokenizer reuses one), and both splits are written as
token shards with meta.json. Rerunning with the same inputs and flags does nothing; other inputs need
--force to replace existing data. Binary and non-UTF-8 files are skipped and reported.
"""

from __future__ import annotations

import argparse
import json
import sys

EXAMPLES = """examples:
  muse prepare --out runs/demo                          # Shakespeare, vocab sized to the corpus
  muse prepare notes/ --out runs/notes --vocab-size 8192
  muse prepare chats.jsonl --text-field content --out runs/chats --val-fraction 0.01
  muse prepare more.txt --out runs/x2 --tokenizer runs/demo/data/tokenizer.json
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="*", metavar="PATHS", help=".txt/.md/.jsonl/.parquet files or directories of them")
    p.add_argument("--corpus", help="a built-in corpus instead of PATHS: shakespeare (the default)")
    p.add_argument("--out", default="runs/demo", help="run directory; data goes to OUT/data (default runs/demo)")
    p.add_argument("--vocab-size", type=int, help="tokenizer vocab size, at least 272 (default: sized to the corpus)")
    p.add_argument("--tokenizer", metavar="PATH", help="reuse this tokenizer.json (or a data dir holding one) instead of training")
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.parquet rows (default text)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="fraction of documents held out for validation (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="chooses which documents go to validation (default 0)")
    p.add_argument("--force", action="store_true", help="replace OUT/data even if it was prepared from other inputs")
    p.add_argument("--json", action="store_true", help="print one JSON object (meta.json plus data_dir, up_to_date)")


def _table(meta: dict) -> str:
    rows = [("split", "documents", "tokens", "bytes", "bytes/token")]
    for split, s in meta["splits"].items():
        rows.append((split, f"{s['documents']:,}", f"{s['tokens']:,}", f"{s['bytes']:,}", f"{s['bytes_per_token']:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows
    )


def run(args) -> int:
    from muse.data.prepare import PrepareConfig, prepare

    cfg = PrepareConfig(
        out=args.out,
        paths=tuple(args.paths),
        corpus=args.corpus,
        vocab_size=args.vocab_size,
        tokenizer=args.tokenizer,
        text_field=args.text_field,
        val_fraction=args.val_fraction,
        seed=args.seed,
        force=args.force,
    )
    meta = prepare(cfg)
    for s in meta["skipped"]:
        print(f"muse prepare: warning: skipped {s['path']} ({s['reason']})", file=sys.stderr)
    if meta["ignored_files"]:
        print(f"muse prepare: note: ignored {meta['ignored_files']} files in directories that are hidden or not "
              ".txt/.md/.jsonl/.parquet", file=sys.stderr)
    if args.json:
        print(json.dumps(meta))
        return 0
    data_dir = meta["data_dir"]
    if meta["up_to_date"]:
        print(f"{data_dir} is up to date (same inputs and flags); nothing to do")
    else:
        print(f"prepared {data_dir}")
    print(_table(meta))
    print(f"vocab {meta['vocab_size']:,} ({meta['dtype']}), tokenizer {data_dir}/{meta['tokenizer']['file']}")
    print(f"next: muse train {args.out}")
    return 0

"""Import a local Hugging Face model directory as a Muse checkpoint in OUT/STAGE/step_000000.

DIR holds config.json (LlamaForCausalLM, Qwen3ForCausalLM or GPT2LMHeadModel), the weights
(model.safetensors or pytorch_model.bin, sharded or not) and a Muse tokenizer.json (a model exported by
`muse export` has one; otherwise pass --tokenizer). Features Muse's decoder does not compute (rope
scaling, biases, other activations, sliding windows) are refused with the config key that asks for them.
Afterwards `muse sample OUT` and every command that takes a run directory accept OUT.
"""

from __future__ import annotations

import argparse
import json
import sys

EXAMPLES = """examples:
  muse import runs/demo/export/hf --out runs/demo-again
  muse import ~/hf/my-llama --out runs/my-llama --tokenizer runs/demo/data/tokenizer.json
  muse import ~/hf/my-llama --out runs/my-llama --dtype bfloat16 --max-seq-len 4096 --force
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="DIR", help="local Hugging Face model directory (what save_pretrained wrote)")
    p.add_argument("--out", required=True, help="run directory to write; the checkpoint goes to OUT/STAGE/step_000000")
    p.add_argument("--stage", default="base", help="stage directory name (default base; e.g. sft for a chat model)")
    p.add_argument("--tokenizer", metavar="PATH", help="Muse tokenizer.json (or a directory holding one) to use "
                   "instead of DIR/tokenizer.json")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="convert the weights (default: as stored)")
    p.add_argument("--max-seq-len", type=int, help="context length (default: the config's max_position_embeddings)")
    p.add_argument("--force", action="store_true", help="replace OUT/STAGE if it already holds checkpoints")
    p.add_argument("--json", action="store_true", help="print one JSON object with the result")


def run(args) -> int:
    from muse.checkpoint.hf_import import import_hf
    from muse.common.errors import UsageError

    if args.max_seq_len is not None and args.max_seq_len <= 0:
        raise UsageError("--max-seq-len must be positive")
    result = import_hf(args.src, args.out, tokenizer=args.tokenizer, stage=args.stage, dtype=args.dtype,
                       max_seq_len=args.max_seq_len, overwrite=args.force)
    if args.json:
        print(json.dumps(result))
    else:
        cfg = result["config"]
        print(f"imported {args.src} ({result['architecture']}, {result['params']:,} parameters, {result['dtype']}) "
              f"-> {result['checkpoint']}")
        print(f"  {cfg['n_layer']} layers, d_model {cfg['d_model']}, {cfg['n_head']} heads ({cfg['n_kv_head']} kv), "
              f"vocab {cfg['vocab_size']:,}, context {cfg['max_seq_len']:,}")
        target = args.out if args.stage == "base" else f"{args.out}/{args.stage}"
        print(f"next: muse sample {target} --prompt \"...\"")
    sys.stdout.flush()
    return 0

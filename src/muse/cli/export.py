"""Export a checkpoint as a Hugging Face model directory (transformers, vLLM, lm-evaluation-harness load it).

CHECKPOINT is a run directory (the newest checkpoint of --stage, by default of the stage trained last:
docs/checkpoints.md), a stage directory or a checkpoint directory. The output holds config.json
(LlamaForCausalLM; Qwen3ForCausalLM for a model with QK-norm, GPT2LMHeadModel for the gpt2 baseline),
model.safetensors (sharded above --max-shard-size), the tokenizer with Muse's chat template, and
generation_config.json. It is written atomically. docs/interop.md has the commands for transformers,
vLLM and lm-eval, and the caveats.
"""

from __future__ import annotations

import argparse
import json
import sys

EXAMPLES = """examples:
  muse export runs/demo                                  # -> runs/demo/export/hf
  muse export runs/demo --stage sft --out hf/demo-chat --dtype bfloat16
  muse export runs/demo/base/step_000600 --out hf/demo --max-shard-size 2GB --force
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="run directory, stage directory (runs/x/base) or checkpoint directory")
    p.add_argument("--format", default="hf", choices=["hf"], help="output format: hf (Hugging Face, the default)")
    p.add_argument("--out", help="output directory (default RUN/export/hf, or RUN/export/hf-STAGE)")
    p.add_argument("--stage", help="stage to take from a run directory (base, sft, dpo, grpo, ...; default: the one "
                   "trained last)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="convert the weights (default: as saved)")
    p.add_argument("--max-shard-size", default="5GB", help="largest weight file, e.g. 5GB (default), 500MB, 2GiB")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true", help="print one JSON object with the result")


def run(args) -> int:
    from muse.checkpoint.hf import parse_size
    from muse.checkpoint.hf_export import export_hf

    max_shard_size = parse_size(args.max_shard_size)
    result = export_hf(args.checkpoint, args.out, stage=args.stage, dtype=args.dtype,
                       max_shard_size=max_shard_size, overwrite=args.force)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"exported {result['checkpoint']} -> {result['out']} ({result['architecture']}, {result['dtype']}, "
              f"{result['bytes'] / 1e6:,.1f} MB of weights)")
        print(f"load it: AutoModelForCausalLM.from_pretrained({result['out']!r}); serve it: vllm serve {result['out']}")
    sys.stdout.flush()
    return 0

"""Sample text from a checkpoint (a run directory: the newest checkpoint of the stage trained last, or --stage)."""

from __future__ import annotations

import argparse
import json
import sys

EXAMPLES = """examples:
  muse sample runs/demo --prompt "ROMEO:" --max-tokens 200
  muse sample runs/demo/base/step_000600 --prompt "To be" --temperature 0.8 --top-k 50 --seed 1
  muse sample runs/demo --prompt "KING:" --num-samples 3 --json
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="run directory, stage directory (runs/x/base) or checkpoint directory")
    p.add_argument("--stage", help="stage to take from a run directory (base, sft, ...; default: the one trained last)")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a new document)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, mps, auto, ...")
    p.add_argument("--json", action="store_true", help="one JSON object per sample")


def run(args) -> int:
    from muse.common.errors import UsageError

    if args.max_tokens <= 0:
        raise UsageError("--max-tokens must be positive")
    if args.temperature < 0:
        raise UsageError("--temperature must be >= 0")
    if not 0 < args.top_p <= 1:
        raise UsageError("--top-p must be in (0, 1]")
    if args.top_k < 0 or args.num_samples <= 0:
        raise UsageError("--top-k must be >= 0 and --num-samples positive")

    from muse.checkpoint import get_stage, load
    from muse.common.device import pick_device
    from muse.infer.generate import generate
    from muse.tokenizer.text import prompt_ids as text_prompt_ids

    model, tok, meta = load(args.checkpoint, device=pick_device(args.device),
                            stages=None if args.stage is None else (get_stage(args.stage).name,))
    prompt_ids = text_prompt_ids(tok, args.prompt)  # the text edge every caller shares (muse.tokenizer.text)
    if len(prompt_ids) >= model.config.max_seq_len:
        raise UsageError(f"the prompt is {len(prompt_ids)} tokens; this model's context is {model.config.max_seq_len}")
    for i in range(args.num_samples):
        seed = None if args.seed is None else args.seed + i
        ids = generate(model, prompt_ids, max_new_tokens=args.max_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, seed=seed, stop_ids=[tok.eot_id])
        finish = "stop" if ids and ids[-1] == tok.eot_id else "length"
        text = tok.decode([t for t in ids if t != tok.eot_id])
        if args.json:
            print(json.dumps({"prompt": args.prompt, "text": text, "tokens": len(ids), "finish_reason": finish,
                              "checkpoint": str(meta.get("path"))}))
        else:
            if i:
                print("-" * 40)
            print(args.prompt + text)
    sys.stdout.flush()
    return 0

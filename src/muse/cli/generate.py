"""Offline batch generation: prompts.jsonl -> out.jsonl through the batching engine.

Each input line is a JSON object with a "prompt" (text to continue; with --chat, a user message) or
"messages" (a chat, [{"role": ..., "content": ...}], answered by the assistant). Every output line
keeps all the input fields and adds "text" (the generated text, special tokens removed), "tokens"
(how many tokens were generated) and "finish_reason" ("stop" or "length"). With --n > 1 each input
line gives n output lines, with "index" 0..n-1. The output file is written atomically at the end. A run
directory means the newest checkpoint of the stage trained last (docs/checkpoints.md); --stage picks another.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

EXAMPLES = """examples:
  muse generate runs/demo --input prompts.jsonl --output out.jsonl --max-tokens 200
  muse generate runs/demo/sft --input chats.jsonl --output replies.jsonl --chat --temperature 0
  muse generate runs/demo --input prompts.jsonl --output samples.jsonl --n 4 --seed 1

prompts.jsonl:
  {"prompt": "ROMEO:", "id": 1}
  {"messages": [{"role": "user", "content": "Who is the king?"}]}
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="run directory, stage directory (runs/x/sft) or checkpoint directory")
    p.add_argument("--stage", help="stage to take from a run directory (base, sft, dpo, grpo, ...; default: the one "
                   "trained last, docs/checkpoints.md)")
    p.add_argument("--input", required=True, help="JSONL file: one object per line with 'prompt' or 'messages'")
    p.add_argument("--output", required=True, help="JSONL file to write (replaced atomically)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens to generate per sample at most")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None, help="line i uses seed + i * n (reproducible output)")
    p.add_argument("--n", type=int, default=1, help="samples per input line")
    p.add_argument("--chat", action="store_true",
                   help="send each 'prompt' as a user message in the chat format and stop at <|end|>")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps, auto (default)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences generated concurrently")


def _read_rows(path: Path) -> list[tuple[int, dict]]:
    from muse.common.errors import UsageError

    if not path.is_file():
        raise UsageError(f"input file {path} does not exist; pass a JSONL file with one object per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not UTF-8 text ({e.reason}); pass a JSONL file") from None
    rows = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path} line {n}: not valid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise UsageError(f"{path} line {n}: expected a JSON object with 'prompt' or 'messages', "
                             f"got {type(row).__name__}")
        rows.append((n, row))
    if not rows:
        raise UsageError(f"{path} has no prompts; write one JSON object per line")
    return rows


def _prompt_ids(tok, row: dict, chat: bool, where: str) -> tuple[list[int], bool]:
    """(prompt token ids, is_chat) for one input row; UsageError naming the line otherwise."""
    from muse.common.errors import MuseError, UsageError
    from muse.tokenizer import render_prompt
    from muse.tokenizer.text import prompt_ids

    try:
        if "messages" in row:
            return render_prompt(tok, row["messages"]), True
        prompt = row.get("prompt")
        if not isinstance(prompt, str):
            raise UsageError("needs a 'prompt' string or a 'messages' list"
                             + ("" if prompt is None else f" ('prompt' is a {type(prompt).__name__})"))
        if chat:
            return render_prompt(tok, [{"role": "user", "content": prompt}]), True
        return prompt_ids(tok, prompt), False  # the text edge every caller shares (muse.tokenizer.text)
    except MuseError as e:
        raise UsageError(f"{where}: {e}") from None


def run(args) -> int:
    from muse.common.errors import UsageError

    if args.max_tokens <= 0 or args.n <= 0 or args.max_num_seqs <= 0:
        raise UsageError("--max-tokens, --n and --max-num-seqs must be positive")
    in_path, out_path = Path(args.input), Path(args.output)
    rows = _read_rows(in_path)

    from muse.checkpoint import resolve_stage
    from muse.common.device import pick_device
    from muse.common.paths import atomic_write_text
    from muse.infer.engine import LLM, EngineConfig
    from muse.infer.sampling_params import SamplingParams
    from muse.tokenizer import END_ID

    # Pick the checkpoint here (sizes checked); loading it verifies every hash.
    ckpt = resolve_stage(args.checkpoint, args.stage, fast=True)
    llm = LLM(str(ckpt), EngineConfig(max_num_seqs=args.max_num_seqs), device=pick_device(args.device))
    tok, max_len = llm.tokenizer, llm.engine.max_model_len
    prompts, params = [], []
    for i, (n, row) in enumerate(rows):
        where = f"{in_path} line {n}"
        ids, is_chat = _prompt_ids(tok, row, args.chat, where)
        if len(ids) >= max_len:
            raise UsageError(f"{where}: the prompt is {len(ids)} tokens but the model's context is {max_len}; "
                             f"shorten it")
        try:
            params.append(SamplingParams(
                max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                seed=None if args.seed is None else args.seed + i * args.n, n=args.n,
                stop_token_ids=(END_ID,) if is_chat else ()))
        except UsageError as e:  # a bad flag: the same for every line, so name the flag, not the line
            raise UsageError(f"{e} (check --temperature, --top-p, --top-k)") from None
        prompts.append(ids)

    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - t0
    lines, total = [], 0
    for (_, row), out in zip(rows, outs):
        for c in out.outputs:
            extra = {"text": c.text, "tokens": len(c.token_ids), "finish_reason": c.finish_reason}
            if args.n > 1:
                extra["index"] = c.index
            lines.append(json.dumps({**row, **extra}, ensure_ascii=False) + "\n")
            total += len(c.token_ids)
    atomic_write_text(out_path, "".join(lines))
    print(f"wrote {len(lines)} completions to {out_path} ({total} tokens in {seconds:.1f} s, "
          f"{total / max(seconds, 1e-9):.0f} tokens/s)")
    return 0

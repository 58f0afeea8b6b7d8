"""CPU training throughput: `muse train` vs a minimal plain-PyTorch GPT-2 training loop of the same shape.

The baseline (below, ~60 lines) is what one writes from the GPT-2 paper and nanoGPT: LayerNorm, learned
positions, GELU MLP, causal SDPA attention, tied embeddings, AdamW, fp32, random windows from the same
token shards. Muse runs as the real command (`muse train --json`), whose tokens/s counts training steps
only (evaluation and checkpointing excluded); the baseline is timed the same way (after warm-up steps).
Both use the same d_model, n_layer, heads, vocab, seq_len and batch, on the same machine, alternating
`--repeats` times so drift from other load hits both.

  python bench/train_cpu.py --data runs/sp --depth 6 --steps 30 [--muse-args "--compile"]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT2(nn.Module):
    def __init__(self, vocab, d, n_layer, h, T):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(T, d)
        self.blocks = nn.ModuleList(Block(d, h) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for b in self.blocks:
            x = b(x)
        logits = self.ln_f(x) @ self.wte.weight.T
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def baseline_tokens_per_s(data: Path, vocab: int, d: int, n_layer: int, h: int, T: int, B: int, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    tokens = np.memmap(data / "train_000.bin", dtype=np.uint16, mode="r")
    model = GPT2(vocab, d, n_layer, h, T)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(0)
    t0 = None
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        starts = rng.integers(0, len(tokens) - T - 1, B)
        w = torch.from_numpy(np.stack([tokens[s:s + T + 1].astype(np.int64) for s in starts]))
        loss = model(w[:, :-1], w[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * B * T / (time.perf_counter() - t0)


def muse_tokens_per_s(data_run: Path, depth: int, T: int, B: int, steps: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        run.mkdir()
        os.symlink((data_run / "data").resolve(), run / "data")
        cmd = [sys.executable, "-m", "muse", "train", str(run), "--depth", str(depth), "--seq-len", str(T),
               "--batch-size", str(B), "--max-steps", str(steps), "--eval-every", "0", "--save-every", "0",
               "--set", "eval_batches=1", "--set", f"log_every={steps}", "--device", "cpu", "--json", *extra]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ, MUSE_NO_PROGRESS="1"))
        return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="runs/sp", help="a run dir prepared by `muse prepare`")
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--muse-args", default="", help="extra flags for muse train, e.g. --compile")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from muse.model import ModelConfig, count_params

    data = Path(args.data) / "data"
    meta = json.loads((data / "meta.json").read_text())
    vocab = meta["vocab_size"]
    cfg = ModelConfig.from_depth(args.depth, vocab, max_seq_len=args.seq_len)
    d, h = cfg.d_model, cfg.n_head
    base, muse = [], []
    for _ in range(args.repeats):
        base.append(baseline_tokens_per_s(data, vocab, d, args.depth, h, args.seq_len, args.batch_size, args.steps, args.warmup))
        # muse's own warm-up: its first logged window includes step 1; use enough steps that it is noise
        r = muse_tokens_per_s(Path(args.data), args.depth, args.seq_len, args.batch_size, args.steps + args.warmup,
                              shlex.split(args.muse_args))
        muse.append(r["tokens_per_s"])
    gpt2_params = count_params(ModelConfig.from_depth(args.depth, vocab, arch="gpt2", max_seq_len=args.seq_len))
    b, m = statistics.median(base), statistics.median(muse)
    print(f"machine: {os.cpu_count()} cpus, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"shape: depth {args.depth}, d_model {d}, heads {h}, vocab {vocab}, seq {args.seq_len}, batch {args.batch_size}; "
          f"params muse {count_params(cfg):,} / gpt2 {gpt2_params:,}")
    print("| run | tokens/s (median) | all |")
    print("|---|---|---|")
    print(f"| plain PyTorch GPT-2 loop (baseline) | {b:,.0f} | {', '.join(f'{x:,.0f}' for x in base)} |")
    print(f"| muse train {args.muse_args} | {m:,.0f} | {', '.join(f'{x:,.0f}' for x in muse)} |")
    print(f"ratio muse / baseline: {m / b:.2f}x")
    assert math.isfinite(m / b)


if __name__ == "__main__":
    main()

"""Training throughput and MFU of Muse's model + optimizer on one device, on synthetic tokens.

Each configuration builds the model and optimizer through the library (muse.model, muse.train.optim), runs
`--warmup` steps (compile happens there), then times `--steps` optimizer steps with a device sync at both
ends. MFU = model FLOPs per token (6N + attention, muse.model.flops_per_token) x tokens/s / the chip's dense
bf16 peak (muse.common.device.PEAKS). The data are random token ids: MFU does not depend on them.

  python bench/mfu.py --config llama+muon --config gpt2+adamw --depth 24 --d-model 1024 --seq-len 2048 --compile

`--fsdp` adds, for each configuration and in the same run, the distributed path at world size 1: FSDP2
(fully_shard over a 1-process group, bf16 compute / fp32 reduce) with each block compiled - exactly what
`muse train --nproc N` runs per GPU, minus the other GPUs - next to the plain single-device model:

  python bench/mfu.py --config llama+muon --fsdp     # ~370M params (depth 24, d_model 1024), seq 2048

`--loss-chunk N` (repeatable: one row per value) sets the model's chunked cross-entropy (rows per chunk;
0 = the plain loss over the whole (tokens, vocab) logits tensor; default 1024, what `muse train` uses).
Every row runs the same seed and batches, and records its per-step losses, so two rows' curves compare
(`--compare-losses` prints the largest difference between the first row's curve and each other's):

  python bench/mfu.py --config llama+muon --compile --loss-chunk 0 --loss-chunk 1024 --steps 200 --compare-losses
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from muse.common.device import device_info, dtype_policy, pick_device, synchronize  # noqa: E402
from muse.model import ModelConfig, build_model, count_params, flops_per_token  # noqa: E402
from muse.train.optim import OptimConfig, build_optimizer  # noqa: E402


def run_one(arch: str, optim: str, args, device, info, fsdp: bool = False, loss_chunk: int = 1024) -> dict:
    torch.manual_seed(0)
    over = {"d_model": args.d_model} if args.d_model else {}
    cfg = ModelConfig.from_depth(args.depth, args.vocab_size, arch=arch, max_seq_len=args.seq_len, **over)
    model = build_model(cfg, device=device)
    model.loss_chunk = loss_chunk
    if fsdp:  # the multi-process training path on one process: FSDP2 + per-block compile
        from muse.distributed.mesh import single_rank_mesh
        from muse.distributed.parallelize import ParallelConfig, parallelize

        model = parallelize(model, single_rank_mesh(device), ParallelConfig(mode="fsdp", compile=True),
                            policy=dtype_policy(device), device=device)
        step_model = model
    else:
        if args.compile:  # what `muse train --compile` does: each block compiled (one graph, reused)
            from muse.distributed.parallelize import apply_compile

            apply_compile(model)
        step_model = model
    opt = build_optimizer(model, OptimConfig(name=optim).for_width(cfg.d_model) if optim == "muon" else OptimConfig(name=optim))
    bf16 = device.type != "cpu"
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    g = torch.Generator(device="cpu").manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1), generator=g).to(device) for _ in range(4)]

    def step(i):
        b = batches[i % len(batches)]
        with ctx:
            loss = step_model(b[:, :-1], b[:, 1:])
        loss.backward()
        opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    losses = [step(i).detach() for i in range(args.warmup)]
    synchronize(device)
    t0 = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        losses.append(step(i).detach())  # kept on the device: no sync inside the timed steps
    synchronize(device)
    dt = time.perf_counter() - t0
    loss = losses[-1]
    tps = args.steps * args.batch_size * args.seq_len / dt
    fpt = flops_per_token(cfg, args.seq_len)
    row = {
        "config": f"{arch}+{optim}", "mode": "fsdp2+compile" if fsdp else "plain" + ("+compile" if args.compile else ""),
        "params": count_params(cfg), "d_model": cfg.d_model, "n_layer": cfg.n_layer,
        "seq_len": args.seq_len, "batch_size": args.batch_size, "compile": args.compile or fsdp, "tokens_per_s": round(tps, 1),
        "achieved_tflops": round(tps * fpt / 1e12, 2), "mfu": round(tps * fpt / info.peak_flops, 4) if info.peak_flops else None,
        "loss": float(loss), "device": info.name, "loss_chunk": loss_chunk,
        "losses": [round(float(x), 5) for x in losses],
    }
    if device.type == "cuda":
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        torch.cuda.reset_peak_memory_stats()
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=[], help="ARCH+OPTIM, e.g. llama+muon (repeatable)")
    p.add_argument("--depth", type=int, default=24)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="torch.compile each block of the plain model")
    p.add_argument("--fsdp", action="store_true", help="also run FSDP2 (world size 1) + per-block compile")
    p.add_argument("--device", default="auto")
    p.add_argument("--loss-chunk", type=int, action="append", default=None,
                   help="rows per chunk of the chunked cross-entropy, 0 = plain (repeatable: one row each)")
    p.add_argument("--compare-losses", action="store_true",
                   help="print the largest per-step loss difference of each row against the first")
    p.add_argument("--json-out")
    args = p.parse_args()
    device = pick_device(args.device)
    info = device_info(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for c in args.config or ["llama+muon", "gpt2+adamw"]:
        for fsdp in (False, True) if args.fsdp else (False,):
            for chunk in args.loss_chunk or [1024]:
                rows.append(run_one(*c.split("+"), args, device, info, fsdp=fsdp, loss_chunk=chunk))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "losses"}), flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    print(f"| config | mode | loss chunk | params | tokens/s | TFLOP/s | MFU | peak mem GiB |  ({info.name}, seq {args.seq_len}, batch {args.batch_size})")
    print("|---|---|---:|---|---|---|---|---|")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        print(f"| {r['config']} | {r['mode']} | {r['loss_chunk']} | {r['params'] / 1e6:.0f}M | {r['tokens_per_s']:,.0f} "
              f"| {r['achieved_tflops']} | {mfu} | {r.get('peak_mem_gib', '-')} |")
    if args.compare_losses:
        ref = rows[0]
        for r in rows[1:]:
            diff = max(abs(a - b) for a, b in zip(ref["losses"], r["losses"]))
            print(f"loss curves, {r['config']} {r['mode']} loss chunk {r['loss_chunk']} vs loss chunk {ref['loss_chunk']}: "
                  f"largest per-step difference {diff:.4f} over {len(r['losses'])} steps "
                  f"(final {ref['losses'][-1]:.4f} vs {r['losses'][-1]:.4f})")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1))
    if args.fsdp:
        from muse.distributed.mesh import shutdown

        shutdown()


if __name__ == "__main__":
    main()

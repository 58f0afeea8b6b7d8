"""Plain autoregressive generation for one prompt at a time: the reference the engine is tested against.

`generate(model, prompt_ids, ...)` prefills the prompt into a contiguous KV cache, then decodes one token
per forward pass; `use_cache=False` recomputes the whole sequence every token (the slowest, simplest
reference). Sampling is temperature, top-k and top-p (nucleus) from a per-call seeded generator, so the
same seed gives the same sample. Works on token ids only; text lives at the edges (cli, server).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from muse.model import KVCache


def sample_token(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> int:
    """One token id from a (V,) row of logits. temperature 0 is greedy (argmax)."""
    logits = logits.float()
    if temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if top_k and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, dim=-1)
        drop = cum - sorted_p > top_p  # keep the smallest prefix whose mass reaches top_p (always >= 1 token)
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, idx, sorted_p)
        probs = probs / probs.sum()
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@torch.no_grad()
def generate_stream(model, prompt_ids: Sequence[int], *, max_new_tokens: int = 128, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                    stop_ids: Sequence[int] = (), use_cache: bool = True) -> Iterator[int]:
    """Yield generated token ids one at a time (stop ids are yielded, then generation ends)."""
    cfg = model.config
    device = next(model.parameters()).device
    ids = list(prompt_ids)
    if not ids:
        raise ValueError("generation needs at least one prompt token")
    max_new_tokens = min(max_new_tokens, cfg.max_seq_len - len(ids))
    if max_new_tokens <= 0:
        return
    gen = torch.Generator()
    gen.manual_seed(seed if seed is not None else torch.seed())
    stop = set(stop_ids)
    cache = None
    if use_cache:
        dtype = next(model.parameters()).dtype
        cache = KVCache.for_model(cfg, batch_size=1, max_seq_len=len(ids) + max_new_tokens, device=device, dtype=dtype)
        logits = model(torch.tensor([ids], device=device), kv_cache=cache)[0, -1]
    for i in range(max_new_tokens):
        if not use_cache:
            logits = model(torch.tensor([ids], device=device))[0, -1]
        tok = sample_token(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
        ids.append(tok)
        yield tok
        if tok in stop or i == max_new_tokens - 1:
            return
        if use_cache:
            logits = model(torch.tensor([[tok]], device=device), kv_cache=cache)[0, -1]


def generate(model, prompt_ids: Sequence[int], **kw) -> list[int]:
    """All generated ids (see generate_stream for the arguments)."""
    return list(generate_stream(model, prompt_ids, **kw))

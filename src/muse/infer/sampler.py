"""Batched sampling: each row of logits with its own temperature, filters, penalties and seed.

A *row* is one position to sample: a request's last known token, or one draft position being
verified (speculative decoding). The runner describes each row with a `SamplingRow`; `SamplingBatch`
turns a step's rows into tensors once; the functions below work on (R, V) float32 logits.

Order of operations (each on what the previous one left):
  1. penalties, on the raw logits: repetition (CTRL: a seen token's logit is divided by the penalty
     when positive, multiplied when negative; seen = prompt + output), then presence and frequency
     (OpenAI: subtract once / per occurrence, output tokens only);
  2. stop tokens (eos unless ignore_eos, stop_token_ids) get -inf while fewer than min_tokens tokens
     were generated;
  3. greedy rows (temperature ~ 0) take the argmax here;
  4. temperature; top-k (keep logits >= the k-th largest, ties kept, as muse.infer.generate); top-p
     (keep the smallest most-likely prefix whose mass reaches top_p, on the top-k renormalised
     distribution); min-p (drop tokens below min_p * p(most likely)); softmax.
Logprobs (`token_logprobs`) are those of the raw model distribution (before 1-4), as vLLM reports
them by default.

Randomness. A row's sample is argmax(p / E) with E ~ Exp(1) i.i.d. per token (the exponential race,
exactly a draw from p). E comes from a generator seeded with `seed_key(seed, position, stream)`:
a function of the request's seed and the position of the token being produced, nothing else. So a
seeded request samples the same tokens whatever its batch mates, whatever the step boundaries, and
again after a preemption recomputes it. Unseeded requests get a random seed from the runner.

Knows nothing about requests, blocks or the model; only SamplingParams and token ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from muse.infer.sampling_params import SamplingParams

_M64 = (1 << 64) - 1
STREAM_SAMPLE, STREAM_ACCEPT, STREAM_DRAFT = 0, 1, 2  # independent randomness for one position


def _mix64(x: int) -> int:
    """splitmix64's finaliser (Steele et al. 2014): a bijective, well-mixed 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def seed_key(seed: int, position: int, stream: int = STREAM_SAMPLE) -> int:
    """A 63-bit generator seed from (request seed, token position, stream); any int seed works."""
    return _mix64(_mix64(_mix64(seed & _M64) ^ position) ^ stream) >> 1


def uniform(seed: int, position: int, stream: int) -> float:
    """A uniform in [0, 1) determined by (seed, position, stream), computed on the host."""
    return seed_key(seed, position, stream) / float(1 << 63)


def exponential_noise(keys: Sequence[int], vocab_size: int, device) -> torch.Tensor:
    """(R, V) Exp(1) noise, row i from a generator seeded with keys[i] (on `device`)."""
    device = torch.device(device)
    gen = torch.Generator(device=device)
    out = torch.empty(len(keys), vocab_size, device=device)
    for i, key in enumerate(keys):
        gen.manual_seed(key)
        out[i].exponential_(generator=gen)
    # exponential_ may return exactly 0; p / 0 would be inf (or nan for p = 0) and win the argmax
    return out.clamp_min_(torch.finfo(out.dtype).tiny)


def is_plain_greedy(params: SamplingParams, num_generated: int, stop_ids: Sequence[int] = ()) -> bool:
    """True when a row's token is just the argmax of its raw logits: greedy, no penalties, and no
    stop token masked (min_tokens reached, or nothing to mask). `sample` returns exactly that; the
    runner skips building a SamplingBatch for a step whose rows are all like this."""
    return (params.is_greedy and params.repetition_penalty == 1.0 and params.presence_penalty == 0.0
            and params.frequency_penalty == 0.0 and (num_generated >= params.min_tokens or not stop_ids))


@dataclass
class SamplingRow:
    """One position to sample and everything about the request that decides how."""

    params: SamplingParams
    seed: int                          # the request's seed (the runner picks one for unseeded requests)
    position: int                      # position of the token this row produces
    num_prompt_tokens: int
    history: Sequence[int] = ()        # tokens at positions < position (read only when penalties are on)
    stop_ids: tuple[int, ...] = ()     # masked while fewer than min_tokens tokens were generated

    @property
    def plain_greedy(self) -> bool:
        return is_plain_greedy(self.params, self.position - self.num_prompt_tokens, self.stop_ids)

    @property
    def has_penalties(self) -> bool:
        p = self.params
        return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


class SamplingBatch:
    """The rows of one step as tensors (built once; every function below reads it)."""

    def __init__(self, rows: Sequence[SamplingRow], vocab_size: int, device):
        self.rows, self.vocab_size, self.device = list(rows), vocab_size, device
        params = [r.params for r in rows]
        self.greedy_list = [p.is_greedy for p in params]
        self.all_greedy = all(self.greedy_list)
        self.greedy = torch.tensor(self.greedy_list, dtype=torch.bool, device=device)
        t = lambda xs, dt=torch.float32: torch.tensor(xs, dtype=dt, device=device)  # noqa: E731
        self.temperature = t([1.0 if p.is_greedy else p.temperature for p in params])[:, None]
        self.top_k = t([p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params], torch.long)
        self.top_p = t([p.top_p for p in params])
        self.min_p = t([p.min_p for p in params])
        random_rows = [not g for g in self.greedy_list]
        self.use_top_k = any(r and 0 < p.top_k < vocab_size for r, p in zip(random_rows, params))
        self.use_top_p = any(r and p.top_p < 1.0 for r, p in zip(random_rows, params))
        self.use_min_p = any(r and p.min_p > 0.0 for r, p in zip(random_rows, params))
        self.use_penalties = any(r.has_penalties for r in rows)
        # (row, token) pairs to mask below min_tokens
        self.stop_mask = [(i, tok) for i, r in enumerate(rows)
                          if r.position - r.num_prompt_tokens < r.params.min_tokens for tok in r.stop_ids]

    def keys(self, stream: int = STREAM_SAMPLE) -> list[int]:
        return [seed_key(r.seed, r.position, stream) for r in self.rows]


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition, presence and frequency penalties (see the module docstring); a new tensor."""
    R, V = logits.shape
    rows_i, seen_tok, out_i, out_tok = [], [], [], []
    for i, r in enumerate(batch.rows):
        if not r.has_penalties:
            continue
        hist = list(r.history[:r.position])
        seen_tok.extend(hist)
        rows_i.extend([i] * len(hist))
        out = hist[r.num_prompt_tokens:]
        out_tok.extend(out)
        out_i.extend([i] * len(out))
    dev = logits.device
    seen = torch.zeros(R, V, dtype=torch.bool, device=dev)
    seen[torch.tensor(rows_i, dtype=torch.long, device=dev), torch.tensor(seen_tok, dtype=torch.long, device=dev)] = True
    counts = torch.zeros(R, V, device=dev)
    counts.index_put_((torch.tensor(out_i, dtype=torch.long, device=dev), torch.tensor(out_tok, dtype=torch.long, device=dev)),
                      torch.ones(len(out_tok), device=dev), accumulate=True)
    p = [r.params for r in batch.rows]
    rep = torch.tensor([x.repetition_penalty for x in p], device=dev)[:, None]
    pres = torch.tensor([x.presence_penalty for x in p], device=dev)[:, None]
    freq = torch.tensor([x.frequency_penalty for x in p], device=dev)[:, None]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    return logits - pres * (counts > 0) - freq * counts


def masked_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Steps 1-2: penalties and the min_tokens stop mask (greedy rows take the argmax of this)."""
    logits = logits.float()
    if batch.use_penalties:
        logits = apply_penalties(logits, batch)
    if batch.stop_mask:
        logits = logits.clone() if not batch.use_penalties else logits
        rows, toks = zip(*batch.stop_mask)
        logits[list(rows), list(toks)] = float("-inf")
    return logits


def filter_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Step 4 without the softmax: temperature, then top-k, top-p, min-p as -inf."""
    logits = logits / batch.temperature
    neg_inf = float("-inf")
    if batch.use_top_k or batch.use_top_p:
        srt = logits.sort(dim=-1, descending=True).values
        if batch.use_top_k:
            kth = srt.gather(1, (batch.top_k - 1)[:, None])  # (R, 1)
            logits = logits.masked_fill(logits < kth, neg_inf)
            srt = srt.masked_fill(srt < kth, neg_inf)
        if batch.use_top_p:
            p = srt.softmax(-1)
            drop = (p.cumsum(-1) - p) > batch.top_p[:, None]  # the most likely token is never dropped
            n_keep = (~drop).sum(-1, keepdim=True)
            cutoff = srt.gather(1, n_keep - 1)
            on = (batch.top_p < 1.0)[:, None]
            logits = logits.masked_fill(on & (logits < cutoff), neg_inf)
    if batch.use_min_p:
        p = logits.softmax(-1)
        logits = logits.masked_fill(p < batch.min_p[:, None] * p.amax(-1, keepdim=True), neg_inf)
    return logits


def target_probs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The distribution each row samples from (R, V): one-hot at the argmax for greedy rows."""
    masked = masked_logits(logits, batch)
    greedy = torch.zeros_like(masked).scatter_(1, masked.argmax(-1, keepdim=True), 1.0)
    if batch.all_greedy:
        return greedy
    probs = filter_logits(masked, batch).softmax(-1)
    return torch.where(batch.greedy[:, None], greedy, probs)


def sample_from_probs(probs: torch.Tensor, keys: Sequence[int]) -> torch.Tensor:
    """(R,) one draw per row of probs (R, V) by the exponential race with per-row keyed noise."""
    noise = exponential_noise(keys, probs.size(1), probs.device)
    return (probs / noise).argmax(-1)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """(R,) sampled token ids for raw logits (R, V)."""
    masked = masked_logits(logits, batch)
    greedy = masked.argmax(-1)
    if batch.all_greedy:
        return greedy
    idx = [i for i, g in enumerate(batch.greedy_list) if not g]
    probs = filter_logits(masked, batch)[idx].softmax(-1)
    keys = [k for k, g in zip(batch.keys(STREAM_SAMPLE), batch.greedy_list) if not g]
    greedy[idx] = sample_from_probs(probs, keys)
    return greedy


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's logprob under the raw model distribution, its rank, and the top alternatives."""

    token_id: int
    logprob: float
    rank: int                              # 1 = the most likely token
    top: tuple[tuple[int, float], ...]     # (token id, logprob), most likely first

    def as_dict(self) -> dict:
        return {"token_id": self.token_id, "logprob": self.logprob, "rank": self.rank,
                "top": [list(t) for t in self.top]}


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor | Sequence[int],
                   num_top: Sequence[int]) -> list[TokenLogprob]:
    """One TokenLogprob per row of raw logits (R, V): the logprob of token_ids[i] and the top num_top[i]."""
    if len(num_top) == 0:
        return []
    lp = torch.log_softmax(logits.float(), dim=-1)
    tok = torch.as_tensor(token_ids, dtype=torch.long, device=lp.device)
    chosen = lp.gather(1, tok[:, None])                                 # (R, 1)
    rank = (lp > chosen).sum(-1) + 1
    k = min(max(num_top), lp.size(1))
    top_v, top_i = lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], lp[:, :0].long())
    chosen, rank, top_v, top_i, tok = (x.tolist() for x in (chosen[:, 0], rank, top_v, top_i, tok))
    return [TokenLogprob(tok[i], chosen[i], rank[i], tuple(zip(top_i[i][:n], top_v[i][:n])))
            for i, n in enumerate(num_top)]

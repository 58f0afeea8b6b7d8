"""Speculative decoding: who proposes draft tokens, and how the target model verifies them.

Proposers (the runner calls them after sampling, for every request that sampled this step):
  - `NgramProposer` (prompt lookup, Saxena 2023): find the most recent earlier occurrence of the
    sequence's last n tokens (n = max_n .. min_n) and propose the tokens that followed it. Free, and
    good on inputs that repeat (code edits, summaries, extraction).
  - `DraftModelProposer`: a smaller model with the same vocabulary. It keeps its own paged K/V pool
    with the SAME block ids as the target's: every step it `mirror`s the target's forward over the
    step's tokens, so a prefix-cache hit or a preemption means the same thing in both pools. To
    propose k tokens after the newest token t (position P) it runs k small passes over
    [t], [t, e1], .. [t, e1 .. e_{k-1}] that read its pool for positions < P and write nothing
    (the slots past the scheduled tokens are not allocated); k(k+1)/2 draft tokens per request,
    cheap for a small draft and small k.

Verification (`rejection_sample`, Leviathan et al. 2023; Chen et al. 2023): draft i is accepted with
probability min(1, p_i(d_i) / q_i(d_i)) (p: the target's sampling distribution at that position,
after penalties/temperature/filters; q: the proposer's; an n-gram draft is a point mass, q = 1). At the
first rejection the token is drawn from normalize(max(0, p_i - q_i)); if every draft is accepted a
bonus token is drawn from p_k. The emitted tokens are distributed exactly as sampling from the target
one token at a time. Greedy rows use one-hot p (and q), so a draft is kept iff it equals the target's
argmax and the output is token for token that of plain greedy decoding.

Randomness follows the sampler: acceptance uniforms and the final draw are keyed by (seed, position),
so seeded requests are reproducible whatever the batch. (They are not the same tokens as without
speculation: the draws are used differently, the distribution is the same.)
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from muse.common.errors import ConfigError
from muse.infer.paged_cache import PagedKVPool, PagedStep, SeqSpan, StepPlan
from muse.infer.sampler import (
    STREAM_ACCEPT,
    STREAM_DRAFT,
    STREAM_SAMPLE,
    SamplingBatch,
    SamplingRow,
    exponential_noise,
    seed_key,
    target_probs,
    uniform,
)
from muse.infer.sampling_params import SamplingParams

METHODS = ("ngram", "draft")


@dataclass
class SpeculativeConfig:
    """Speculative decoding settings: the proposer and how many tokens it proposes per step."""

    method: str = "ngram"          # "ngram" (prompt lookup) or "draft" (a smaller model)
    num_tokens: int = 4            # drafts proposed per request per step
    ngram_min: int = 1             # prompt lookup: shortest suffix to match
    ngram_max: int = 3             # prompt lookup: longest suffix to match (tried first)
    draft_model: Any = None        # method "draft": an nn.Module with the target's vocabulary

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"speculative method {self.method!r} is not known; use one of {', '.join(METHODS)}")
        if isinstance(self.num_tokens, bool) or not isinstance(self.num_tokens, int) or self.num_tokens < 1:
            raise ConfigError(f"speculative num_tokens must be a positive integer, got {self.num_tokens!r}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ConfigError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min}, {self.ngram_max}")
        if self.method == "draft" and self.draft_model is None:
            raise ConfigError("speculative method 'draft' needs a draft_model (a smaller model with the same "
                              "vocabulary); pass one or use method 'ngram'")


@dataclass
class DraftInput:
    """What a proposer gets for one request: its known tokens (the newest is the one just sampled)."""

    request_id: str
    token_ids: Sequence[int]
    max_tokens: int                # propose at most this many
    params: SamplingParams
    seed: int
    num_prompt_tokens: int
    block_ids: Sequence[int]
    stop_ids: tuple[int, ...] = ()


class NgramProposer:
    """Prompt-lookup drafts: continue the most recent earlier match of the last n tokens."""

    def __init__(self, num_tokens: int = 4, min_n: int = 1, max_n: int = 3):
        self.num_tokens, self.min_n, self.max_n = num_tokens, min_n, max_n

    def propose_one(self, token_ids: Sequence[int], k: int) -> list[int]:
        L = len(token_ids)
        if k <= 0 or L < 2:
            return []
        # int32 bytes + bytes.rfind: the search runs in C; matches must start on a 4-byte boundary
        data = array("i", token_ids).tobytes()
        for n in range(min(self.max_n, L - 1), self.min_n - 1, -1):
            pat = data[4 * (L - n):]
            end = 4 * (L - 1)  # the match must end before the last token: something must follow it
            pos = data.rfind(pat, 0, end)
            while pos >= 0 and pos % 4:
                pos = data.rfind(pat, 0, pos + len(pat) - 1)
            if pos >= 0:
                i = pos // 4 + n
                return list(token_ids[i:i + k])
        return []

    def mirror(self, input_ids: torch.Tensor, plan: StepPlan) -> None:
        pass  # stateless

    def propose(self, items: Sequence[DraftInput]) -> list[tuple[list[int], torch.Tensor | None]]:
        """Per item: (draft ids, None): a point-mass proposal."""
        return [(self.propose_one(it.token_ids, min(self.num_tokens, it.max_tokens)), None) for it in items]


class DraftModelProposer:
    """Drafts sampled from a smaller model that shares the target's block ids (see the module doc)."""

    def __init__(self, model, num_tokens: int, num_blocks: int, block_size: int, device,
                 max_batched_query: int = 64):
        self.model, self.num_tokens, self.device = model, num_tokens, device
        self.vocab_size = model.config.vocab_size
        self.max_len = model.config.max_seq_len
        self.max_batched_query = max_batched_query
        dtype = next(model.parameters()).dtype
        self.pool = PagedKVPool.for_model(model.config, num_blocks, block_size, device, dtype)

    @torch.no_grad()
    def mirror(self, input_ids: torch.Tensor, plan: StepPlan) -> None:
        """Run the draft over the target's step (same tokens, same slots): its pool stays in step."""
        empty = torch.empty(0, dtype=torch.long, device=input_ids.device)
        self.model(input_ids[None], kv_cache=PagedStep(self.pool, plan, logits_indices=empty))

    @torch.no_grad()
    def propose(self, items: Sequence[DraftInput]) -> list[tuple[list[int], torch.Tensor | None]]:
        """Per item: (draft ids, their draft distributions (k, V)), sampled like the target would."""
        ks = [max(0, min(self.num_tokens, it.max_tokens, self.max_len - len(it.token_ids)))
              for it in items]
        drafts: list[list[int]] = [[] for _ in items]
        probs: list[list[torch.Tensor]] = [[] for _ in items]
        bs = self.pool.block_size
        for j in range(1, max(ks, default=0) + 1):
            live = [i for i, k in enumerate(ks) if k >= j]
            spans, ids, rows = [], [], []
            for i in live:
                it = items[i]
                P = len(it.token_ids) - 1  # position of the newest (just sampled) token
                spans.append(SeqSpan(P, j, it.block_ids))
                ids.append(it.token_ids[-1])
                ids.extend(drafts[i])
                rows.append(SamplingRow(it.params, it.seed, P + j, it.num_prompt_tokens,
                                        list(it.token_ids) + drafts[i], it.stop_ids))
            plan = StepPlan(spans, bs, self.device, write=False, max_batched_query=self.max_batched_query)
            last = torch.tensor([sum(s.num_tokens for s in spans[:n + 1]) - 1 for n in range(len(spans))],
                                device=self.device)
            logits = self.model(torch.tensor([ids], device=self.device),
                                kv_cache=PagedStep(self.pool, plan, logits_indices=last))[0]
            batch = SamplingBatch(rows, self.vocab_size, self.device)
            q = target_probs(logits, batch)  # (R, V); one-hot for greedy rows
            keys = [seed_key(r.seed, r.position, STREAM_DRAFT) for r in rows]
            toks = sample_rows(q, keys, batch.greedy_list).tolist()
            for n, i in enumerate(live):
                drafts[i].append(toks[n])
                probs[i].append(q[n])
        return [(d, torch.stack(p) if p else None) for d, p in zip(drafts, probs)]


def sample_rows(probs: torch.Tensor, keys: Sequence[int], greedy: Sequence[bool]) -> torch.Tensor:
    """(R,) draws from probs (R, V); greedy rows (one-hot probs) take the argmax without noise."""
    out = probs.argmax(-1)
    idx = [i for i, g in enumerate(greedy) if not g]
    if idx:
        noise = exponential_noise([keys[i] for i in idx], probs.size(1), probs.device)
        out[idx] = (probs[idx] / noise).argmax(-1)
    return out


def rejection_sample(target: torch.Tensor, draft_ids: torch.Tensor, draft_probs: torch.Tensor | None,
                     num_drafts: Sequence[int], seeds: Sequence[int], first_positions: Sequence[int],
                     greedy: Sequence[bool] | None = None) -> list[list[int]]:
    """Verify drafts; per row the accepted drafts plus one token drawn by the target.

    target (R, K+1, V): the target's sampling distributions at each draft position and after the last
    (one-hot for greedy rows); draft_ids (R, K), padded past num_drafts[r]; draft_probs (R, K, V) or
    None for point-mass proposals; first_positions[r]: position of row r's first draft token.
    """
    R, K1, V = target.shape
    K = K1 - 1
    dev = target.device
    n_acc = [0] * R
    if K > 0:
        d = draft_ids[:, :K, None]
        p_d = target[:, :K].gather(2, d)[..., 0]                                     # (R, K)
        q_d = torch.ones_like(p_d) if draft_probs is None else draft_probs.gather(2, d)[..., 0]
        u = torch.tensor([[uniform(seeds[r], first_positions[r] + i, STREAM_ACCEPT) for i in range(K)]
                          for r in range(R)], device=dev)
        valid = torch.arange(K, device=dev)[None, :] < torch.tensor(list(num_drafts), device=dev)[:, None]
        accept = (u * q_d < p_d) & valid  # u < p/q without dividing by q
        n_acc = accept.long().cumprod(-1).sum(-1).tolist()
    rows = torch.arange(R, device=dev)
    a = torch.tensor(n_acc, device=dev)
    p_final = target[rows, a]                                                        # (R, V)
    rejected = [n_acc[r] < num_drafts[r] for r in range(R)]
    if any(rejected):
        if draft_probs is None:
            q_final = torch.zeros(R, V, device=dev)
            q_final[rows, draft_ids[rows, a.clamp(max=max(K - 1, 0))]] = 1.0
        else:
            q_final = draft_probs[rows, a.clamp(max=max(K - 1, 0))]
        resid = (p_final - q_final).clamp_min(0)
        mass = resid.sum(-1, keepdim=True)
        # mass 0 only through rounding (a rejection implies q > p somewhere, so p > q elsewhere)
        resid = torch.where(mass > 0, resid / mass.clamp_min(1e-30), p_final)
        rej = torch.tensor(rejected, device=dev)[:, None]
        p_final = torch.where(rej, resid, p_final)
    keys = [seed_key(seeds[r], first_positions[r] + n_acc[r], STREAM_SAMPLE) for r in range(R)]
    final = sample_rows(p_final, keys, greedy if greedy is not None else [False] * R).tolist()
    drafts = draft_ids.tolist()
    return [drafts[r][:n_acc[r]] + [final[r]] for r in range(R)]

"""SamplingParams: how one request wants its tokens chosen and when it wants to stop (torch-free).

A frozen dataclass, validated on construction: a bad value raises `UsageError` naming the field, so a
server can answer 400 with the message as is. Defaults follow vLLM's (max_tokens 16, temperature 1,
every filter off). What a request may ask for is bounded (`MAX_N`, `MAX_LOGPROBS`,
`MAX_STOP_TOKEN_IDS`): every step pays for each of them, for every request in the batch, so one request
must not be able to slow all the others down. Token ids are checked against the vocabulary by the
engine when it takes the request in (this module does not know the vocabulary).

This module only *carries* the settings: the model runner applies temperature, top-k/p, min-p,
penalties, seeds and logprobs; the scheduler and `Request` apply the stop rules (stop ids, eos,
min/max tokens). It knows nothing about text: stop *strings* live at the edges
(tokenizer, server), which turn them into token-level checks or truncate detokenized text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

from muse.common.errors import UsageError

# Below this temperature sampling is argmax; dividing logits by ~0 would overflow.
GREEDY_TEMPERATURE = 1e-5

# Bounds on what one request may ask for.
MAX_N = 128                 # parallel samples (OpenAI's limit); each is a sequence in the scheduler
MAX_LOGPROBS = 20           # top alternatives per token (OpenAI's top_logprobs and vLLM's max_logprobs)
# Distinct stop ids. Each is scanned on every token, and masked in every sampled row below
# min_tokens: 60,000 repeated ids once took 97 s and slowed every other request. Edges add their own
# ids to a client's (stop strings of one token, the chat end token), so this leaves room above the
# 64 a server lets a client send.
MAX_STOP_TOKEN_IDS = 128


def _int(name: str, value, *, lo: int | None = None, hi: int | None = None, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    # bool is an Integral in Python; `max_tokens=True` is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, Integral):
        kind = "an integer or None" if optional else "an integer"
        raise UsageError(f"sampling parameter {name} must be {kind}, got {value!r}")
    if lo is not None and value < lo:
        raise UsageError(f"sampling parameter {name} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise UsageError(f"sampling parameter {name} must be <= {hi}, got {value}")
    return int(value)


def _stop_ids(values) -> tuple[int, ...]:
    """Distinct stop ids in first-seen order; at most MAX_STOP_TOKEN_IDS of them."""
    seen: dict[int, None] = {}
    for t in values:
        seen[_int("stop_token_ids[]", t, lo=0)] = None
        if len(seen) > MAX_STOP_TOKEN_IDS:  # stop reading: the list may be huge
            raise UsageError(f"sampling parameter stop_token_ids may hold at most {MAX_STOP_TOKEN_IDS} "
                             f"distinct token ids")
    return tuple(seen)


def _float(name: str, value, lo: float, hi: float, *, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise UsageError(f"sampling parameter {name} must be a finite number, got {value!r}")
    if value < lo or value > hi or (lo_open and value == lo):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise UsageError(f"sampling parameter {name} must be in {interval}, got {value}")
    return float(value)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling and stopping settings (see the field comments for the ranges)."""

    max_tokens: int | None = 16          # tokens to generate at most; None = up to the model's max length
    min_tokens: int = 0                  # stop ids and eos are ignored until this many tokens were generated
    temperature: float = 1.0             # 0 = greedy (argmax)
    top_p: float = 1.0                   # nucleus mass in (0, 1]; 1 = off
    top_k: int = 0                       # keep the k most likely tokens; 0 (or -1, OpenAI style) = off
    min_p: float = 0.0                   # drop tokens below min_p * p(most likely); 0 = off
    repetition_penalty: float = 1.0      # > 1 discourages tokens already in prompt or output (CTRL-style)
    presence_penalty: float = 0.0        # OpenAI: subtract once from any token already generated
    frequency_penalty: float = 0.0       # OpenAI: subtract per occurrence in the generated tokens
    seed: int | None = None              # per-request RNG seed: same seed, same sample, whatever the batch
    stop_token_ids: tuple[int, ...] = ()  # generation ends after emitting one of these (it is kept)
    n: int = 1                           # parallel samples sharing the prompt's KV blocks
    logprobs: int | None = None          # per generated token: its logprob and the top-`logprobs` ones
    prompt_logprobs: int | None = None   # per prompt token: its logprob and the top-`prompt_logprobs`
    # With prompt_logprobs: report only prompt positions k >= this (>= 1), the logprob of token k given
    # tokens < k. The tokens before position start - 1 may then come from the prefix cache (None = 1:
    # every prompt position after the first, and no prefix-cache hits).
    prompt_logprobs_start: int | None = None
    ignore_eos: bool = False             # keep generating after eos (benchmarks)

    def __post_init__(self):
        # frozen: normalised values are written with object.__setattr__
        set_ = lambda name, value: object.__setattr__(self, name, value)
        set_("max_tokens", _int("max_tokens", self.max_tokens, lo=1, optional=True))
        set_("min_tokens", _int("min_tokens", self.min_tokens, lo=0))
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise UsageError(f"sampling parameter min_tokens ({self.min_tokens}) must be <= "
                             f"max_tokens ({self.max_tokens})")
        set_("temperature", _float("temperature", self.temperature, 0.0, math.inf))
        set_("top_p", _float("top_p", self.top_p, 0.0, 1.0, lo_open=True))
        top_k = _int("top_k", self.top_k, lo=-1)
        set_("top_k", 0 if top_k == -1 else top_k)
        set_("min_p", _float("min_p", self.min_p, 0.0, 1.0))
        set_("repetition_penalty", _float("repetition_penalty", self.repetition_penalty, 0.0, math.inf,
                                          lo_open=True))
        set_("presence_penalty", _float("presence_penalty", self.presence_penalty, -2.0, 2.0))
        set_("frequency_penalty", _float("frequency_penalty", self.frequency_penalty, -2.0, 2.0))
        set_("seed", _int("seed", self.seed, optional=True))
        if isinstance(self.stop_token_ids, (str, bytes)) or not hasattr(self.stop_token_ids, "__iter__"):
            raise UsageError(f"sampling parameter stop_token_ids must be a list of token ids, "
                             f"got {self.stop_token_ids!r}")
        set_("stop_token_ids", _stop_ids(self.stop_token_ids))
        set_("n", _int("n", self.n, lo=1, hi=MAX_N))
        set_("logprobs", _int("logprobs", self.logprobs, lo=0, hi=MAX_LOGPROBS, optional=True))
        set_("prompt_logprobs", _int("prompt_logprobs", self.prompt_logprobs, lo=0, hi=MAX_LOGPROBS,
                                     optional=True))
        set_("prompt_logprobs_start", _int("prompt_logprobs_start", self.prompt_logprobs_start, lo=1,
                                           optional=True))
        if self.prompt_logprobs_start is not None and self.prompt_logprobs is None:
            raise UsageError("sampling parameter prompt_logprobs_start needs prompt_logprobs (how many top "
                             "alternatives per prompt token; 0 for none)")
        if not isinstance(self.ignore_eos, bool):
            raise UsageError(f"sampling parameter ignore_eos must be true or false, got {self.ignore_eos!r}")

    @property
    def first_prompt_logprob(self) -> int:
        """The first prompt position whose logprob is reported (position 0 has none). The scheduler lets a
        request with prompt logprobs hit the prefix cache only below position first_prompt_logprob - 1,
        whose logits predict that token."""
        return self.prompt_logprobs_start or 1

    @property
    def is_greedy(self) -> bool:
        """True when the runner should take the argmax (temperature ~ 0)."""
        return self.temperature < GREEDY_TEMPERATURE

"""Request: one sequence the engine is generating, as the scheduler sees it (token ids only, torch-free).

A request is its prompt, the tokens generated so far, its `SamplingParams`, and the bookkeeping the
scheduler advances: `status`, `num_computed_tokens` (tokens whose K/V are in the cache), the block
hashes of its full blocks (filled by the KV manager), `num_cached_tokens` (prefix-cache hits at its
first admission, for usage reporting) and `spec_token_ids` (draft tokens waiting to be verified).

The one rule the scheduler applies to every request: `num_computed_tokens` catches up with
`num_tokens` (prompt + output). A fresh request has 0 computed; a decode step has exactly 1 to
compute (the last sampled token); a preempted request is reset to 0 and recomputes.

n > 1: each parallel sample is its own Request (`fan_out` makes children "<id>#0".."<id>#{n-1}"
with `parent_id` and `index` set and n = 1). The children have identical prompts, so the prefix
cache and block reference counts make them share the prompt's full blocks; nothing else is special.
This module does not know about blocks, tensors, text or the runner.
"""

from __future__ import annotations

import dataclasses
import enum
import sys
from collections.abc import Sequence

from muse.infer.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"                  # back in the waiting queue, will recompute from scratch
    FINISHED_STOPPED = "finished_stopped"    # emitted eos or a stop token id
    FINISHED_LENGTH = "finished_length"      # max_tokens or the model's max length reached
    FINISHED_ABORTED = "finished_aborted"    # aborted by the client
    FINISHED_ERROR = "finished_error"        # the runner failed on this request alone (the others go on)

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        """The finish reason: "stop", "length" (OpenAI's), "abort", "error", or None while unfinished."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


class Request:
    """One sequence: prompt + output token ids, sampling params, and the scheduler's bookkeeping."""

    def __init__(self, request_id: str, prompt_token_ids: Sequence[int],
                 sampling_params: SamplingParams | None = None, *, eos_token_id: int | None = None,
                 parent_id: str | None = None, index: int = 0):
        self.request_id = str(request_id)
        self.prompt_token_ids: list[int] = list(prompt_token_ids)
        self.sampling_params = sampling_params if sampling_params is not None else SamplingParams()
        # None = the scheduler fills in its config's eos id at add_request
        self.eos_token_id = eos_token_id
        self.parent_id = parent_id          # set on the children of an n > 1 request
        self.index = index                  # which of the parent's n samples this is
        self.output_token_ids: list[int] = []
        self._all_token_ids: list[int] = list(self.prompt_token_ids)
        self.status = RequestStatus.WAITING
        self.stop_reason: int | None = None  # the stop token id that finished it (not set for eos)
        # Generation limit; the scheduler lowers it to max_model_len - prompt length at add_request.
        mt = self.sampling_params.max_tokens
        self.max_tokens: int = sys.maxsize if mt is None else mt
        # Scheduler / KV-manager bookkeeping
        self.arrival_index = -1             # order of add_request; set by the scheduler
        self.num_computed_tokens = 0        # tokens whose K/V are in this request's blocks
        self.num_cached_tokens = -1         # prefix-cache hit tokens at first admission (-1: not yet)
        self.block_hashes: list[bytes] = []  # hash chain of its full blocks of known tokens
        self.spec_token_ids: list[int] = []  # draft tokens proposed for the next step
        self.num_prompt_logprobs_sent = 0   # prompt positions 1 .. this one were reported (or skipped)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.value}, prompt={self.num_prompt_tokens}, "
                f"output={self.num_output_tokens}, computed={self.num_computed_tokens})")

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Known tokens: prompt + output (drafts not included)."""
        return len(self._all_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt + output token ids. The live list: read it, don't mutate it (use append_output)."""
        return self._all_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)

    def check_stop(self) -> RequestStatus | None:
        """The finished status the newest output token implies, or None to keep going.

        A stop (eos unless ignore_eos, or a stop id) counts only once min_tokens were generated, and
        wins over the length limit when both happen on the same token: the model did finish.
        """
        params = self.sampling_params
        if self.num_output_tokens >= params.min_tokens and self.output_token_ids:
            last = self.output_token_ids[-1]
            if last == self.eos_token_id and not params.ignore_eos:
                return RequestStatus.FINISHED_STOPPED
            if last in params.stop_token_ids:
                self.stop_reason = last
                return RequestStatus.FINISHED_STOPPED
        if self.num_output_tokens >= self.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

    def fan_out(self) -> list[Request]:
        """n > 1: one child Request per sample ("<id>#0".."<id>#{n-1}", n = 1 each); n == 1: [self].

        With a seed, child i gets seed + i: equal seeds would make the n samples identical.
        """
        params = self.sampling_params
        if params.n == 1:
            return [self]
        children = []
        for i in range(params.n):
            seed = None if params.seed is None else params.seed + i
            child_params = dataclasses.replace(params, n=1, seed=seed)
            children.append(Request(f"{self.request_id}#{i}", self.prompt_token_ids, child_params,
                                    eos_token_id=self.eos_token_id, parent_id=self.request_id, index=i))
        return children

"""The two generation front ends, /v1/completions and /v1/chat/completions, over one skeleton.

`Generation.handle` is the whole life of a request (serving.py has the steps); a front end supplies
only what differs: how its body becomes prompts and sampling parameters (`prepare`, run after the
rate limit and with tokenizing off the event loop) and how outputs are rendered (`chunk`, `finish`,
`usage_chunk`, `choice`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response

from muse.common.errors import MuseError
from muse.infer.sampler import TokenLogprob
from muse.infer.sampling_params import SamplingParams
from muse.server.jobs import Choice, Job, job_usage
from muse.server.protocol import ApiError, ChatRequest, CompletionRequest, invalid
from muse.server.serving import SafeJSONResponse, Serving
from muse.server.state import ServedModel
from muse.server.text import chat_logprobs, completion_logprobs
from muse.tokenizer import render_prompt
from muse.tokenizer.special import END_ID
from muse.tokenizer.text import prompt_ids


@dataclass
class Prepared:
    prompts: list[list[int]]
    params: SamplingParams
    texts: list[str] | None = None      # completions: each prompt's text, for echo
    # echo + logprobs over several prompts (share_prompt_logprobs): each prompt's own params, and the
    # number L of leading tokens it shares with prompt 0, whose logprobs of positions 1 .. L - 1 it reuses
    prompt_params: list[SamplingParams] | None = None
    shared: list[int] | None = None


class Generation(Serving):
    endpoint = ""
    prefix = ""
    body_model: type = CompletionRequest

    async def handle(self, request: Request) -> Response:
        key = self.authenticate(request, cached=True)  # admit() checks the key again, in the database
        model_name = None
        try:
            grant = self.take_request(request, key)
            try:
                body = await self.parse(request, self.body_model)
                model_name = body.model
                served = self.find_model(key, body.model)
                body.unsupported()
                self.check_admitting()  # before tokenizing: a draining server does no work for a 503
                prep = await self.prepare(body, served)
                job = await self.admit(request, key, served, self.endpoint, self.prefix, prep.prompts, prep.params,
                                       body.n, body.stop or (), grant, prompt_params=prep.prompt_params)
            except BaseException:
                grant.settle(0)  # tokens were not spent; the request itself stays counted
                raise
        except ApiError as e:
            if e.status != 401:  # a key refused at admission leaves no row, as one refused at authentication
                self.record_rejection(request, key, self.endpoint, model_name, e)
            raise
        r = _Render(self, body, served, job, prep, int(time.time()))
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return self.stream_response(request, job, r.chunk, r.finish, include, r.usage_chunk)
        await self.wait_job(job, request)
        job.http_status = 200
        return SafeJSONResponse({"id": job.request_id, "object": self.object_name, "created": r.created,
                                 "model": served.name, "choices": [r.choice(c) for c in job.choices],
                                 "usage": job_usage(job), "system_fingerprint": None},
                                headers=self.headers_for(request))

    object_name = ""
    chunk_object = ""

    async def prepare(self, body, served: ServedModel) -> Prepared:
        raise NotImplementedError

    # rendering: (front end, body, served, job, prepared) -> JSON-able dicts
    def chunk(self, r: _Render, c: Choice, delta: str | None, new: Sequence[int], lps, first: bool) -> dict | None:
        raise NotImplementedError

    def finish(self, r: _Render, c: Choice) -> dict:
        raise NotImplementedError

    def choice(self, r: _Render, c: Choice) -> dict:
        raise NotImplementedError


class _Render:
    """One request's rendering context, bound to the front end's renderers."""

    def __init__(self, front: Generation, body, served: ServedModel, job: Job, prep: Prepared, created: int):
        self.front, self.body, self.served, self.job, self.prep, self.created = front, body, served, job, prep, created
        self.sent_echo: set[int] = set()

    def head(self) -> dict:
        return {"id": self.job.request_id, "object": self.front.chunk_object, "created": self.created,
                "model": self.served.name}

    def chunk(self, c, delta, new, lps, first):
        return self.front.chunk(self, c, delta, new, lps, first)

    def finish(self, c):
        return self.front.finish(self, c)

    def usage_chunk(self, job: Job) -> dict:
        return {**self.head(), "choices": [], "usage": job_usage(job)}

    def choice(self, c):
        return self.front.choice(self, c)


class CompletionGeneration(Generation):
    endpoint, prefix, body_model = "completions", "cmpl", CompletionRequest
    object_name = chunk_object = "text_completion"

    async def prepare(self, body: CompletionRequest, served: ServedModel) -> Prepared:
        raw = body.prompts()
        self.check_sequences(body.n, len(raw))  # before tokenizing: refusing it costs nothing
        prompts, texts = await self.off_loop(_encode_completion_prompts, served, raw)
        lp = body.logprobs
        params = self.sampling(body, served, max(len(p) for p in prompts), default_max=16, logprobs=lp,
                               prompt_logprobs=lp if body.echo and lp is not None else None)
        prep = Prepared(prompts, params, texts)
        if params.prompt_logprobs is not None and len(prompts) > 1 and not body.stream:
            prep.prompt_params, prep.shared = share_prompt_logprobs(prompts, params)
        return prep

    def _logprobs(self, r: _Render, c: Choice, tokens, lps: Sequence[TokenLogprob], echo_prompt: bool):
        if r.body.logprobs is None:
            return None
        tok = r.served.tokenizer
        if echo_prompt:
            return completion_logprobs(tok, tokens, lps, prompt=c.prompt, prompt_lps=self._prompt_logprobs(r, c))
        return completion_logprobs(tok, tokens, lps)

    @staticmethod
    def _prompt_logprobs(r: _Render, c: Choice) -> list:
        """The choice's prompt logprobs for positions 1 .. len - 1: its own, or (share_prompt_logprobs)
        prompt 0's for the positions below the L tokens they share, then its own from position L."""
        own = c.prompt_logprobs or []
        shared = r.prep.shared[c.index // r.body.n] if r.prep.shared else 0
        if shared < 2:
            return own
        head = (r.job.choices[0].prompt_logprobs or [])[:shared - 1]
        return [*head, *[None] * (shared - 1 - len(head)), *own]  # None: prompt 0 failed (never shifts a value)

    def chunk(self, r, c, delta, new, lps, first):
        if first:
            return None
        text = delta or ""
        echo = r.body.echo and c.index not in r.sent_echo
        if echo:
            r.sent_echo.add(c.index)
            text = r.prep.texts[c.index // r.body.n] + text
        return {**r.head(), "choices": [{"index": c.index, "text": text,
                                         "logprobs": self._logprobs(r, c, new, lps, echo), "finish_reason": None}]}

    def finish(self, r, c):
        return {**r.head(), "choices": [{"index": c.index, "text": "", "logprobs": None,
                                         "finish_reason": c.finish_reason}]}

    def choice(self, r, c):
        text = c.text.text
        if r.body.echo:
            text = r.prep.texts[c.index // r.body.n] + text
        return {"index": c.index, "text": text, "logprobs": self._logprobs(r, c, c.token_ids, c.logprobs, r.body.echo),
                "finish_reason": c.finish_reason}


def share_prompt_logprobs(prompts: list[list[int]], params: SamplingParams) -> tuple[list[SamplingParams], list[int]]:
    """Per-prompt params for echo + logprobs over several prompts, and the tokens each shares with prompt 0.

    The logprob of prompt token k depends on tokens 0 .. k only, so a prompt that begins with the same L
    tokens as prompt 0 (the choices of a multiple-choice question after its context: `muse eval` sends
    them as one request) has the same logprobs at positions 1 .. L - 1. It asks the engine only for
    positions L and after (`prompt_logprobs_start`), so its first L - 1 tokens may come from the prefix
    cache (prompt 0, admitted no later, registers those blocks), and the rest is taken from prompt 0.
    Measured on 2 cores, 200 four-choice questions of `muse eval` (~24 tokens a prompt, 17 of context):
    2.4-2.8 s with this, 3.7-3.9 s without (BENCHMARKS.md section 8). Streams are left out: a prompt's
    echo is sent with its first token, which may come before prompt 0 has computed the shared positions."""
    first, per, shared = prompts[0], [params], [0]
    for p in prompts[1:]:
        n = 0
        for a, b in zip(first, p):
            if a != b:
                break
            n += 1
        shared.append(n if n >= 2 else 0)
        per.append(dataclasses.replace(params, prompt_logprobs_start=n) if n >= 2 else params)
    return per, shared


def _encode_completion_prompts(served: ServedModel, raw: list) -> tuple[list[list[int]], list[str]]:
    """Token ids and texts of a completions request's prompts (a worker thread runs this)."""
    tok = served.tokenizer
    prompts, texts = [], []
    for i, p in enumerate(raw):
        if isinstance(p, str):
            ids = prompt_ids(tok, p)  # after a document boundary, as every training document started
            texts.append(p)
        else:
            bad = next((t for t in p if not 0 <= t < tok.vocab_size), None)
            if bad is not None:
                raise invalid(f"prompt {i} holds token id {bad}, outside the vocabulary "
                              f"(0..{tok.vocab_size - 1}).", "prompt")
            ids = p
            texts.append(tok.decode(p))
        if not ids:
            raise invalid(f"prompt {i} is empty; send at least one token.", "prompt")
        prompts.append(ids)
    return prompts, texts


class ChatGeneration(Generation):
    endpoint, prefix, body_model = "chat.completions", "chatcmpl", ChatRequest
    object_name, chunk_object = "chat.completion", "chat.completion.chunk"

    async def prepare(self, body: ChatRequest, served: ServedModel) -> Prepared:
        self.check_sequences(body.n, 1)
        messages = body.plain_messages()
        try:
            prompt = await self.off_loop(render_prompt, served.tokenizer, messages)
        except MuseError as e:
            raise invalid(str(e), "messages") from None
        lp = (body.top_logprobs or 0) if body.logprobs else None
        params = self.sampling(body, served, len(prompt), default_max=None, logprobs=lp, prompt_logprobs=None,
                               extra_stop_ids=(END_ID,))
        return Prepared([prompt], params)

    def _logprobs(self, r: _Render, tokens, lps):
        return chat_logprobs(r.served.tokenizer, tokens, lps, r.body.top_logprobs or 0) if r.body.logprobs else None

    def _chunk(self, r: _Render, c: Choice, delta: dict, lps_obj, finish) -> dict:
        return {**r.head(), "system_fingerprint": None,
                "choices": [{"index": c.index, "delta": delta, "logprobs": lps_obj, "finish_reason": finish}]}

    def chunk(self, r, c, delta, new, lps, first):
        if first:
            return self._chunk(r, c, {"role": "assistant", "content": ""}, None, None)
        return self._chunk(r, c, {"content": delta or ""}, self._logprobs(r, new, lps), None)

    def finish(self, r, c):
        return self._chunk(r, c, {}, None, c.finish_reason)

    def choice(self, r, c):
        return {"index": c.index, "message": {"role": "assistant", "content": c.text.text, "refusal": None},
                "logprobs": self._logprobs(r, c.token_ids, c.logprobs), "finish_reason": c.finish_reason}


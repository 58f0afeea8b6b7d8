"""The request pipeline every route shares: authenticate -> read and check the body -> rate limits ->
expensive work (tokenizing, off the event loop) -> sampling parameters -> quota -> admission -> a `Job`
-> a JSON or SSE response. Routes (routes.py) are thin wrappers over this and over the two generation
front ends (completion.py, chat.py), which differ only in how a body becomes prompts and how outputs
are rendered.

Order matters, and each step is as cheap as possible before the next:
- authentication touches only an indexed key look-up (a generation request on PostgreSQL replicas may
  take its key from a short cache: admission checks the key again in the database, pgstore.py);
- the body is capped in bytes while it is read (413), parsed by the C JSON decoder, then walked once
  iteratively: nesting deeper than MAX_JSON_DEPTH and strings that are not valid Unicode (a lone
  surrogate, which JSON's \\ud800 escape can carry) are 400s, never a RecursionError or an encode error
  later on;
- the key's request-per-minute budget is taken BEFORE any tokenizing, so a key flooding the server
  with megabyte prompts is turned away with 429 at the cost of a dictionary look-up;
- tokenizing runs in a worker thread, so a large prompt never stalls other partners' streams;
- tokens per minute and the quota are reserved once the token counts are known (prompt + max_tokens
  per sequence), then admission takes one slot per sequence (prompts x n), not per HTTP request.

Error contract: every failure is an `ApiError` -> `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from muse.common.errors import UsageError
from muse.common.logging import get_logger
from muse.infer.sampling_params import SamplingParams
from muse.server import keys as keyfmt
from muse.server.jobs import Choice, Job, failure_error
from muse.server.limits import Grant, LimitError
from muse.server.protocol import ApiError, ChatRequest, invalid, validation_error
from muse.server.records import ApiKey, UsageRecord, clean_label
from muse.server.state import AppState, ServedModel
from muse.server.store import AuthError
from muse.tokenizer.text import TextStream

log = get_logger("muse.server")

MAX_JSON_DEPTH = 32          # OpenAI's bodies nest 5 deep; metadata gets the rest


class SafeJSONResponse(JSONResponse):
    """JSON that always encodes: a lone surrogate that reached a message is written as its \\uXXXX escape
    (valid JSON) instead of failing the encode with a 500."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode(
            "utf-8", "backslashreplace")


def error_response(e: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    return SafeJSONResponse(e.body(), status_code=e.status, headers={**(headers or {}), **e.headers})


def auth_error(e: AuthError) -> ApiError:
    """The 401 of a key that is not accepted: at authentication, or at admission (pgstore.py)."""
    reason = {"revoked": "This API key has been revoked.", "expired": "This API key has expired."}
    return ApiError(401, reason.get(e.reason, "Incorrect API key provided.") + " Ask your contact for a new key.",
                    code="invalid_api_key")


def limit_error(e: LimitError) -> ApiError:
    return ApiError(e.status_code, str(e), type=e.error_type, code=e.code, headers=e.headers)


def sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode("utf-8", "backslashreplace") + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def check_json(data, max_depth: int = MAX_JSON_DEPTH) -> None:
    """400 for nesting deeper than `max_depth` or a string (key or value) that is not valid Unicode.
    Iterative: a hostile body cannot exhaust the stack here."""
    stack = [(data, 1, "")]
    while stack:
        node, depth, path = stack.pop()
        if isinstance(node, str):
            if not node.isascii():
                try:
                    node.encode("utf-8")
                except UnicodeEncodeError:
                    raise invalid(f"{path or 'the body'} holds a lone surrogate (invalid Unicode); send valid "
                                  "UTF-8 text.", path.split("[")[0].split(".")[0] or None) from None
            continue
        if isinstance(node, (dict, list)):
            if depth > max_depth:
                raise invalid(f"The request body nests deeper than {max_depth} levels.")
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for k, v in items:
                sub = f"{path}.{k}" if isinstance(k, str) and path else k if isinstance(k, str) else f"{path}[{k}]"
                if isinstance(k, str):
                    stack.append((k, depth, path))
                stack.append((v, depth + 1, sub))


_SAMPLING_FIELD = re.compile(r"sampling parameter (\w+)")


class Serving:
    """The shared pipeline over one AppState; see the module docstring."""

    def __init__(self, state: AppState):
        self.state = state
        self.config = state.config

    # ---- identity ----------------------------------------------------------------------------------
    def authenticate(self, request: Request, *, cached: bool = False) -> ApiKey:
        """The request's key, or a 401. `cached`: the request goes on to admit(), which checks the key in
        the database again (a generation request), so the store may answer from memory (pgstore.py)."""
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if not header or scheme.lower() != "bearer" or not token:
            raise ApiError(401, "You didn't provide an API key. Send it in the Authorization header: "
                           "'Authorization: Bearer YOUR_KEY'.", code="invalid_api_key")
        if not keyfmt.check_format(token):
            raise ApiError(401, "Incorrect API key provided. Check it for typos; keys start with "
                           f"'{keyfmt.KEY_PREFIX}'.", code="invalid_api_key")
        try:
            key = self.state.store.authenticate(token, cached=cached)
        except AuthError as e:
            raise auth_error(e) from None
        request.state.rl_headers = self.state.limiter.peek_headers(key)
        return key

    # ---- bodies ------------------------------------------------------------------------------------
    async def read_json(self, request: Request) -> dict:
        limit = self.config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise ApiError(413, f"Request body of {length} bytes is larger than the limit of {limit} bytes.",
                           code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"Request body is larger than the limit of {limit} bytes.",
                               code="request_too_large")
            chunks.append(chunk)
        try:
            data = json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise invalid(f"The request body is not valid JSON ({getattr(e, 'msg', None) or e.reason}). "
                          "Send a JSON object with Content-Type: application/json.") from None
        except RecursionError:
            raise invalid(f"The request body nests deeper than {MAX_JSON_DEPTH} levels.") from None
        if not isinstance(data, dict):
            raise invalid("The request body must be a JSON object.")
        check_json(data)
        return data

    async def parse(self, request: Request, model: type[BaseModel]):
        data = await self.read_json(request)
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise validation_error(e) from None

    def find_model(self, key: ApiKey, name: str | None, *, param: str = "model") -> ServedModel:
        models = self.state.models
        if name is None:
            name = next((n for n in models if key.allows_model(n)), self.state.default_model)
        served = models.get(name)
        if served is None:
            raise ApiError(404, f"The model '{clean_label(name, 64)}' does not exist or you do not have access "
                           "to it.", param=param, code="model_not_found")
        if not key.allows_model(name):
            raise ApiError(403, f"This API key may not use the model '{name}'. Models it may use: "
                           f"{', '.join(key.models or ())}.", type="permission_error", param=param,
                           code="model_not_allowed")
        return served

    # ---- gates -------------------------------------------------------------------------------------
    def check_admitting(self) -> None:
        if self.state.draining:
            raise ApiError(503, "The server is shutting down and admits no new requests; retry shortly.",
                           type="server_error", code="shutting_down", headers={"retry-after": "5"})
        for m in self.state.models.values():
            if not m.client.is_healthy:
                raise ApiError(503, f"The model '{m.name}' is unavailable right now (its engine is restarting "
                               "or stopped); retry shortly.", type="server_error", code="engine_unavailable",
                               headers={"retry-after": "2"})

    def take_request(self, request: Request, key: ApiKey) -> Grant:
        """One request from the key's requests-per-minute budget, before any expensive work."""
        try:
            grant = self.state.limiter.acquire(key, 0)
        except LimitError as e:
            raise limit_error(e) from None
        request.state.rl_headers = grant.headers
        return grant

    @staticmethod
    async def off_loop(fn: Callable, *args):
        """CPU work on a request's own data (tokenizing) in a worker thread: the event loop keeps serving."""
        return await asyncio.to_thread(fn, *args)

    def check_sequences(self, n: int, num_prompts: int) -> None:
        """400 when a request asks for more sequences (prompts x n) than --max-n."""
        if n * num_prompts > self.config.max_n:
            what = f"n is {n}" if num_prompts == 1 else f"{num_prompts} prompts x n={n} is {num_prompts * n}"
            raise invalid(f"{what}; this server generates at most {self.config.max_n} sequences per request.", "n")

    def sampling(self, body, served: ServedModel, prompt_len: int, *, default_max: int | None,
                 logprobs: int | None, prompt_logprobs: int | None,
                 extra_stop_ids: Sequence[int] = ()) -> SamplingParams:
        config = self.config
        room = served.max_model_len - prompt_len
        max_tokens = body.max_tokens if body.max_tokens is not None else getattr(body, "max_completion_tokens", None)
        if max_tokens is None:
            max_tokens = default_max if default_max is not None else room
            if config.max_tokens is not None:
                max_tokens = min(max_tokens, config.max_tokens)
        elif config.max_tokens is not None and max_tokens > config.max_tokens:
            raise invalid(f"max_tokens is {max_tokens}; this server allows at most {config.max_tokens}.",
                          "max_tokens")
        if room < 1 or max_tokens > room:
            raise invalid(f"This model's maximum context length is {served.max_model_len} tokens. However, you "
                          f"requested {prompt_len + max(max_tokens, 1)} tokens ({prompt_len} in the prompt, "
                          f"{max(max_tokens, 1)} in the completion). Please reduce the length of the prompt "
                          "or the completion.", "messages" if isinstance(body, ChatRequest) else "prompt",
                          "context_length_exceeded")
        for v in (logprobs, prompt_logprobs):
            if v is not None and v > config.max_logprobs:
                raise invalid(f"logprobs is {v}; this server allows at most {config.max_logprobs}.", "logprobs")
        stop_ids = tuple(dict.fromkeys(body.stop_token_ids or ()))
        if len(stop_ids) > config.max_stop_token_ids:
            raise invalid(f"stop_token_ids holds {len(stop_ids)} distinct ids; this server allows at most "
                          f"{config.max_stop_token_ids}.", "stop_token_ids")
        vocab = served.tokenizer.vocab_size
        bad = next((t for t in stop_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise invalid(f"stop_token_ids holds {bad}, outside the vocabulary (0..{vocab - 1}).", "stop_token_ids")
        kw = dict(max_tokens=max_tokens, n=1, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                  stop_token_ids=stop_ids + tuple(extra_stop_ids))
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                     "repetition_penalty", "min_tokens", "ignore_eos", "seed"):
            v = getattr(body, name)
            if v is not None:
                kw[name] = v
        try:
            return SamplingParams(**kw)
        except UsageError as e:
            m = _SAMPLING_FIELD.search(str(e))
            raise invalid(str(e).replace("sampling parameter ", ""), m.group(1) if m else None) from None

    async def admit(self, request: Request, key: ApiKey, served: ServedModel, endpoint: str, prefix: str,
                    prompts: list[list[int]], params: SamplingParams, n: int, stop: Sequence[str],
                    grant: Grant, *, prompt_params: Sequence[SamplingParams] | None = None) -> Job:
        """Reserve tokens (rate limit, quota), wait for admission, start the job. On any failure the
        reservations are given back and the request slot stays spent. `prompt_params`: each prompt's own
        params (they differ from `params` only in where prompt logprobs start)."""
        state = self.state
        self.check_admitting()
        sequences = n * len(prompts)
        reserve = sum(len(p) for p in prompts) + params.max_tokens * sequences
        request_id = f"{prefix}-{request.state.request_hex}"   # also the name of its quota hold (pgstore.py)
        reservation = None
        try:
            state.limiter.add_tokens(grant, reserve)
            request.state.rl_headers = grant.headers
            reservation = state.quotas.reserve(key, reserve, request_id=request_id)
            await state.admission.acquire(sequences)
        except (LimitError, AuthError) as e:
            grant.settle(0)
            if reservation is not None:
                reservation.settle(0)
            raise (auth_error(e) if isinstance(e, AuthError) else limit_error(e)) from None
        except BaseException:
            grant.settle(0)
            if reservation is not None:
                reservation.settle(0)
            raise
        choices = []
        for i, prompt in enumerate(prompts):
            base = prompt_params[i] if prompt_params else params
            for j in range(n):
                p = base if base.seed is None else dataclasses.replace(base, seed=base.seed + j)
                choices.append(Choice(i * n + j, prompt, p, TextStream(served.tokenizer, stop)))
        request.state.request_id = request_id
        job = Job(state, key=key, model=served, endpoint=endpoint, request_id=request_id, choices=choices,
                  num_prompt_tokens=sum(len(p) for p in prompts), grant=grant, reservation=reservation,
                  arrived=request.state.arrived, arrived_wall=request.state.arrived_wall, sequences=sequences)
        job.start()
        return job

    def record_rejection(self, request: Request, key: ApiKey, endpoint: str, model: str | None,
                         e: ApiError) -> None:
        """A request refused after authentication still gets its one ledger row (0 tokens)."""
        self.state.store.record(UsageRecord(
            request_id=f"rej-{request.state.request_hex}", key_id=key.key_id, partner=key.partner,
            model=clean_label(model if isinstance(model, str) else "?"), endpoint=endpoint, prompt_tokens=0,
            completion_tokens=0, cached_tokens=0, status="error", http_status=e.status, finish_reason=None,
            created_at=request.state.arrived_wall, latency_s=time.monotonic() - request.state.arrived, ttft_s=None))

    def headers_for(self, request: Request) -> dict[str, str]:
        return dict(getattr(request.state, "rl_headers", None) or {})

    # ---- responses ---------------------------------------------------------------------------------
    def stream_response(self, request: Request, job: Job, make_chunk, finish_chunk, include_usage: bool,
                        usage_chunk) -> StreamingResponse:
        job.http_status = 200  # the status line goes out with the first byte; errors come as events

        async def body() -> AsyncIterator[bytes]:
            try:
                for c in job.choices:
                    first = make_chunk(c, None, [], [], first=True)
                    if first is not None:
                        yield sse(first)
                over = False
                while not over:
                    # everything that arrived since the last wake-up goes out in one write
                    items = [await job.events.get()]
                    while not job.events.empty():
                        items.append(job.events.get_nowait())
                    out = []
                    for item in items:
                        if item is None:
                            over = True
                            break
                        if isinstance(item, BaseException):
                            out.append(sse(failure_error(item).body()))
                            over = True
                            break
                        c, delta, new, lps, final = item
                        if delta or lps or final:
                            out.append(sse(make_chunk(c, delta, new, lps, first=False)))
                        if final:
                            out.append(sse(finish_chunk(c)))
                    if out:
                        yield b"".join(out)
                await job.done.wait()
                if include_usage and job.error is None:
                    yield sse(usage_chunk(job))
                yield SSE_DONE
            finally:
                if not job.done.is_set():
                    job.cancel()
        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={**self.headers_for(request), "cache-control": "no-cache"})

    async def wait_job(self, job: Job, request: Request) -> None:
        """Wait for a plain (non-streamed) job. A client that hangs up (a timeout, a killed script) stops
        its generation within one engine step, as a stream's does, instead of the engine finishing work
        nobody will read."""
        watch = asyncio.create_task(_client_left(request))
        try:
            await asyncio.wait((job.task, watch), return_when=asyncio.FIRST_COMPLETED)
            if watch.done() and not job.task.done():
                job.http_status = 499  # nginx's "client closed request": nothing was sent
                job.cancel()
                await job.done.wait()
                raise ApiError(499, "The client closed the connection before the response; the request was "
                               "aborted.", code="client_closed_request")
            await asyncio.shield(job.task)
        except asyncio.CancelledError:
            if job.task.cancelled() and not asyncio.current_task().cancelling():
                # the job was stopped under us (shutdown after the grace period), not this handler
                await job.done.wait()
                raise ApiError(503, "The server shut down before this request finished, so it was aborted; "
                               "retry it.", type="server_error", code="shutting_down",
                               headers={"retry-after": "5"}) from None
            job.cancel()
            raise
        except ApiError:
            raise
        except Exception as e:
            raise failure_error(e) from None
        finally:
            watch.cancel()
        await job.done.wait()


async def _client_left(request: Request) -> None:
    """Returns when the client disconnects. The body is already read, so the next ASGI message is
    http.disconnect (servers send it when the connection drops; test transports after the response)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def new_request_hex() -> str:
    return secrets.token_hex(12)


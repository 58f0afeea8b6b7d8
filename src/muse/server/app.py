"""The OpenAI-compatible HTTP API: routes, keys, limits, the usage ledger, streaming and shutdown.

    app = create_app([ServedModel.from_engine("muse-base", engine)], Store(path), ServerConfig())
    uvicorn.run(app)                 # `muse serve` does this, with graceful SIGTERM handling

The app depends on engine clients (`EngineClient`, `EngineProcessClient`), never on models. One
HTTP generation request is one `Job` (jobs.py): it is checked here (key, body, model access, context
length), then passes the gates in a fixed order - rate limits (requests and tokens per minute,
reserving prompt + max_tokens * n), the token quota (reserved, so concurrent requests can never
overspend), the bounded admission queue - and then runs one engine request per choice; the job
accounts for it exactly once, whatever path it took. Responses (JSON or SSE) are rendered here.

Error contract: every failure is `{"error": {"message", "type", "param", "code"}}` with OpenAI's
status codes (see docs/serving.md); nothing a client sends produces a 500 or a 422, and no message
echoes any part of an API key.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from muse.common.errors import MuseError, UsageError
from muse.common.logging import get_logger
from muse.infer.engine import Engine, EngineClient, EngineDeadError
from muse.infer.engine_process import EngineProcessClient, EngineSpec
from muse.infer.sampler import TokenLogprob
from muse.infer.sampling_params import SamplingParams
from muse.server import keys as keyfmt
from muse.server.jobs import Choice, Job, job_usage
from muse.server.limits import AdmissionQueue, LimitError, QuotaManager, RateLimiter
from muse.server.metrics import CONTENT_TYPE, ServerMetrics
from muse.server.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    invalid,
    validation_error,
)
from muse.server.records import ApiKey, UsageRecord
from muse.server.store import AuthError, Store
from muse.server.text import TextStream, chat_logprobs, completion_logprobs, encode_prompt
from muse.tokenizer import Tokenizer, render_prompt
from muse.tokenizer.special import END_ID, EOT, EOT_ID, PAD, SPECIAL_IDS

log = get_logger("muse.server")


@dataclass
class ServerConfig:
    """Server limits; `muse serve` flags map onto these one to one."""

    admin_key: str | None = None        # for /admin/* and /metrics; None: those routes are closed
    max_body_bytes: int = 1 << 20       # 413 above this
    max_tokens: int | None = None       # cap on a request's max_tokens (None: the model's context)
    max_n: int = 16
    max_logprobs: int = 20
    max_running: int = 256              # HTTP requests generating at once (over all models)
    max_waiting: int = 1024             # more waiting than this: 503
    shutdown_grace_s: float = 30.0


@dataclass
class ServedModel:
    name: str
    client: EngineClient | EngineProcessClient
    tokenizer: Tokenizer
    max_model_len: int
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def from_engine(cls, name: str, engine: Engine) -> ServedModel:
        """The engine's loop in a thread of this process (tests, notebooks, library use)."""
        if engine.tokenizer is None:
            raise UsageError(f"model {name}: serving needs a tokenizer; the checkpoint has none")
        return cls(name, EngineClient(engine), engine.tokenizer, engine.max_model_len)

    @classmethod
    def from_spec(cls, name: str, spec: EngineSpec) -> ServedModel:
        """The engine in a process of its own (`muse serve`'s default): the event loop and the engine's
        Python code then run on two cores instead of taking turns on one GIL (engine_process.py)."""
        client = EngineProcessClient(spec)
        if client.tokenizer is None:
            client.close()
            raise UsageError(f"model {name}: serving needs a tokenizer; the checkpoint has none")
        return cls(name, client, client.tokenizer, client.max_model_len)


# ---- responses ----------------------------------------------------------------------------------------


def error_response(e: ApiError, extra_headers: dict[str, str] | None = None) -> JSONResponse:
    headers = {**(extra_headers or {}), **e.headers}
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def _limit_error(e: LimitError) -> ApiError:
    return ApiError(e.status_code, str(e), type=e.error_type, code=e.code, headers=e.headers)




def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


_DONE = b"data: [DONE]\n\n"


# ---- the app ------------------------------------------------------------------------------------------


class AppState:
    def __init__(self, models: Sequence[ServedModel], store: Store, config: ServerConfig,
                 limiter: RateLimiter | None = None, quotas: QuotaManager | None = None):
        if not models:
            raise UsageError("serve at least one model")
        self.models = {m.name: m for m in models}
        self.default_model = models[0].name
        self.store, self.config = store, config
        self.limiter = limiter or RateLimiter()
        self.quotas = quotas or QuotaManager(self._tokens_used)
        self.admission = AdmissionQueue(config.max_running, config.max_waiting)
        self.metrics = ServerMetrics(self.snapshot)
        self.jobs: set[Job] = set()
        self.draining = False
        self.loop: asyncio.AbstractEventLoop | None = None

    def _tokens_used(self, key_id: str, since: float) -> int:
        """Ledger tokens of a key and of the keys it replaced: rotating a key does not reset its quota."""
        total, seen = 0, set()
        while key_id is not None and key_id not in seen:
            seen.add(key_id)
            total += self.store.tokens_used(key_id, since)
            key = self.store.get_key(key_id)
            key_id = key.rotated_from if key is not None else None
        return total

    def snapshot(self) -> dict:
        return {"admission_waiting": self.admission.waiting,
                "models": {name: m.client.stats().as_dict() for name, m in self.models.items()}}

    @property
    def healthy(self) -> bool:
        return not self.draining and all(m.client.is_healthy for m in self.models.values())


def create_app(models: Sequence[ServedModel], store: Store, config: ServerConfig | None = None, *,
               limiter: RateLimiter | None = None, quotas: QuotaManager | None = None) -> FastAPI:
    config = config or ServerConfig()
    state = AppState(models, store, config, limiter, quotas)

    async def lifespan(app):
        state.loop = asyncio.get_running_loop()
        yield
        await shutdown(state)

    app = FastAPI(title="Muse", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.muse = state

    # ---- errors ----
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        state.metrics.requests.labels(request.url.path, str(e.status)).inc()
        return error_response(e, getattr(request.state, "rl_headers", None))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            err = ApiError(404, f"Unknown request URL: {request.method} {request.url.path}.", code="unknown_url")
        elif e.status_code == 405:
            err = ApiError(405, f"Method {request.method} is not allowed for {request.url.path}.",
                           code="method_not_allowed")
        else:
            err = ApiError(e.status_code, str(e.detail))
        return error_response(err)

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        state.metrics.requests.labels(request.url.path, "500").inc()
        return error_response(ApiError(500, "The server had an error while processing your request. The "
                                       "error was logged; retry, and report it if it persists.",
                                       type="server_error"))

    # ---- helpers ----
    def authenticate(request: Request) -> ApiKey:
        request.state.arrived = time.monotonic()
        request.state.arrived_wall = time.time()
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
            key = state.store.authenticate(token)
        except AuthError as e:
            reason = {"revoked": "This API key has been revoked.", "expired": "This API key has expired."}
            raise ApiError(401, reason.get(e.reason, "Incorrect API key provided.") +
                           " Ask your contact for a new key.", code="invalid_api_key") from None
        request.state.rl_headers = state.limiter.peek_headers(key)
        return key

    def require_admin(request: Request) -> None:
        if not config.admin_key:
            raise ApiError(403, "Admin routes are disabled: start the server with an admin key "
                           "(MUSE_ADMIN_KEY or --admin-key-file).", type="permission_error")
        header = request.headers.get("authorization", "")
        token = header.partition(" ")[2].strip()
        if not hmac.compare_digest(token.encode(), config.admin_key.encode()):
            raise ApiError(401, "This route needs the admin key.", code="invalid_api_key")

    async def read_body(request: Request, model: type[BaseModel]):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
            raise ApiError(413, f"Request body of {length} bytes is larger than the limit of "
                           f"{config.max_body_bytes} bytes.", code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > config.max_body_bytes:
                raise ApiError(413, f"Request body is larger than the limit of {config.max_body_bytes} bytes.",
                               code="request_too_large")
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise invalid(f"The request body is not valid JSON ({e.msg if hasattr(e, 'msg') else e}). "
                          "Send a JSON object with Content-Type: application/json.") from None
        if not isinstance(data, dict):
            raise invalid("The request body must be a JSON object.")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise validation_error(e) from None

    def find_model(key: ApiKey, name: str | None, *, param: str = "model") -> ServedModel:
        if name is None:
            name = next((n for n in state.models if key.allows_model(n)), state.default_model)
        served = state.models.get(name)
        if served is None:
            raise ApiError(404, f"The model '{name}' does not exist or you do not have access to it.",
                           param=param, code="model_not_found")
        if not key.allows_model(name):
            raise ApiError(403, f"This API key may not use the model '{name}'. Models it may use: "
                           f"{', '.join(key.models or ())}.", type="permission_error", param=param,
                           code="model_not_allowed")
        return served

    def check_admitting() -> None:
        if state.draining:
            raise ApiError(503, "The server is shutting down and admits no new requests; retry shortly.",
                           type="server_error", code="shutting_down", headers={"retry-after": "5"})
        for m in state.models.values():
            if not m.client.is_healthy:
                raise ApiError(503, f"The model '{m.name}' is unavailable (its engine stopped); the server "
                               "needs a restart.", type="server_error", code="engine_dead")

    def sampling(body, served: ServedModel, prompt_len: int, *, default_max: int | None,
                 logprobs: int | None, prompt_logprobs: int | None, extra_stop_ids: Sequence[int] = ()):
        room = served.max_model_len - prompt_len
        max_tokens = body.max_tokens if body.max_tokens is not None else getattr(body, "max_completion_tokens", None)
        param = "max_tokens"
        if max_tokens is None:
            max_tokens = default_max if default_max is not None else room
            if config.max_tokens is not None:
                max_tokens = min(max_tokens, config.max_tokens)
        elif config.max_tokens is not None and max_tokens > config.max_tokens:
            raise invalid(f"max_tokens is {max_tokens}; this server allows at most {config.max_tokens}.", param)
        if room < 1 or max_tokens > room:
            raise invalid(f"This model's maximum context length is {served.max_model_len} tokens. However, you "
                          f"requested {prompt_len + max(max_tokens, 1)} tokens ({prompt_len} in the prompt, "
                          f"{max(max_tokens, 1)} in the completion). Please reduce the length of the prompt "
                          "or the completion.", "messages" if isinstance(body, ChatRequest) else "prompt",
                          "context_length_exceeded")
        if body.n > config.max_n:
            raise invalid(f"n is {body.n}; this server allows at most {config.max_n}.", "n")
        for name, v in (("logprobs", logprobs), ("logprobs", prompt_logprobs)):
            if v is not None and v > config.max_logprobs:
                raise invalid(f"{name} is {v}; this server allows at most {config.max_logprobs}.", name)
        kw = dict(max_tokens=max_tokens, n=1, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                  stop_token_ids=tuple(body.stop_token_ids or ()) + tuple(extra_stop_ids))
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                     "repetition_penalty", "min_tokens", "ignore_eos", "seed"):
            v = getattr(body, name)
            if v is not None:
                kw[name] = v
        try:
            return SamplingParams(**kw)
        except UsageError as e:
            raise invalid(str(e).replace("sampling parameter ", ""), None) from None

    async def admit(request: Request, key: ApiKey, served: ServedModel, endpoint: str, prefix: str,
                    prompts: list[list[int]], params: SamplingParams, n: int, stop: Sequence[str]) -> Job:
        check_admitting()
        reserve = sum(len(p) for p in prompts) + params.max_tokens * n * len(prompts)
        try:
            grant = state.limiter.acquire(key, reserve)
        except LimitError as e:
            raise _limit_error(e) from None
        request.state.rl_headers = grant.headers
        reservation = None
        try:
            reservation = state.quotas.reserve(key, reserve)
            await state.admission.acquire()
        except LimitError as e:
            grant.settle(0)
            if reservation is not None:
                reservation.settle(0)
            raise _limit_error(e) from None
        except BaseException:
            grant.settle(0)
            if reservation is not None:
                reservation.settle(0)
            raise
        choices = []
        for i, prompt in enumerate(prompts):
            for j in range(n):
                p = params if params.seed is None else _replace_seed(params, params.seed + j)
                choices.append(Choice(i * n + j, prompt, p, TextStream(served.tokenizer, stop)))
        job = Job(state, key=key, model=served, endpoint=endpoint, request_id=f"{prefix}-{secrets.token_hex(12)}",
                  choices=choices, num_prompt_tokens=sum(len(p) for p in prompts), grant=grant,
                  reservation=reservation, arrived=request.state.arrived, arrived_wall=request.state.arrived_wall)
        job.start()
        return job

    def record_rejection(request: Request, key: ApiKey, endpoint: str, model: str, e: ApiError) -> None:
        """A request refused after authentication still gets its one ledger row (0 tokens)."""
        state.store.record(UsageRecord(
            request_id=f"rej-{secrets.token_hex(12)}", key_id=key.key_id, partner=key.partner, model=model,
            endpoint=endpoint, prompt_tokens=0, completion_tokens=0, cached_tokens=0, status="error",
            http_status=e.status, finish_reason=None, created_at=request.state.arrived_wall,
            latency_s=time.monotonic() - request.state.arrived, ttft_s=None))

    def headers_for(request: Request, job: Job | None = None) -> dict[str, str]:
        h = dict(getattr(request.state, "rl_headers", None) or {})
        if job is not None:
            h["x-request-id"] = job.request_id
        return h

    async def stream_response(request: Request, job: Job, make_chunk, finish_chunk, include_usage: bool,
                              usage_chunk) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            try:
                for c in job.choices:
                    first = make_chunk(c, None, [], [], first=True)
                    if first is not None:
                        yield _sse(first)
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
                            err = item if isinstance(item, ApiError) else ApiError(
                                503 if isinstance(item, EngineDeadError) else 500,
                                f"The request failed while generating: {item}", type="server_error")
                            out.append(_sse(err.body()))
                            over = True
                            break
                        c, delta, new, lps = item
                        if delta or lps or c.finish_reason:
                            out.append(_sse(make_chunk(c, delta, new, lps, first=False)))
                        if c.finish_reason:
                            out.append(_sse(finish_chunk(c)))
                    if out:
                        yield b"".join(out)
                await job.done.wait()
                if include_usage and job.error is None:
                    yield _sse(usage_chunk(job))
                yield _DONE
                state.metrics.requests.labels(request.url.path, "200").inc()
            finally:
                if not job.done.is_set():
                    job.cancel()
        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={**headers_for(request, job), "cache-control": "no-cache"})

    async def client_left(request: Request) -> None:
        """Returns when the client disconnects. The body is already read, so the next ASGI message is
        http.disconnect (servers send it when the connection drops; test transports after the response)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def wait_job(job: Job, request: Request) -> None:
        # A client that hangs up (a timeout, a killed script) stops its generation within one engine
        # step, as a stream's does, instead of the engine finishing work nobody will read.
        watch = asyncio.create_task(client_left(request))
        try:
            await asyncio.wait((job.task, watch), return_when=asyncio.FIRST_COMPLETED)
            if watch.done() and not job.task.done():
                job.cancel()
                await job.done.wait()
                raise ApiError(499, "The client closed the connection before the response; the request was "
                               "aborted.", type="invalid_request_error", code="client_closed_request")
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
        except EngineDeadError as e:
            raise ApiError(503, f"The engine stopped while generating: {e}", type="server_error",
                           code="engine_dead") from None
        finally:
            watch.cancel()
        await job.done.wait()

    # ---- routes ----
    @app.get("/health")
    async def health():
        if state.healthy:
            return {"status": "ok"}
        why = "shutting down" if state.draining else "an engine stopped"
        return JSONResponse({"status": "unavailable", "reason": why}, status_code=503)

    @app.get("/metrics")
    async def metrics(request: Request):
        require_admin(request)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    def model_card(m: ServedModel) -> dict:
        return {"id": m.name, "object": "model", "created": m.created, "owned_by": "muse",
                "max_model_len": m.max_model_len}

    @app.get("/v1/models")
    async def list_models(request: Request):
        key = authenticate(request)
        data = [model_card(m) for name, m in state.models.items() if key.allows_model(name)]
        return JSONResponse({"object": "list", "data": data}, headers=headers_for(request))

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request):
        key = authenticate(request)
        return JSONResponse(model_card(find_model(key, name)), headers=headers_for(request))

    @app.post("/v1/completions")
    async def completions(request: Request):
        key = authenticate(request)
        model_name = "?"
        try:
            body: CompletionRequest = await read_body(request, CompletionRequest)
            model_name = body.model
            served = find_model(key, body.model)
            body.unsupported()
            tok = served.tokenizer
            prompts = []
            texts = []
            for i, p in enumerate(body.prompts()):
                if isinstance(p, str):
                    # a text starts after a document boundary, as every training document did
                    ids = encode_prompt(tok, p)
                    if ids[:1] != [EOT_ID]:
                        ids = [EOT_ID, *ids]
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
            lp = body.logprobs
            params = sampling(body, served, max(len(p) for p in prompts), default_max=16, logprobs=lp,
                              prompt_logprobs=lp if body.echo and lp is not None else None)
            job = await admit(request, key, served, "completions", "cmpl", prompts, params, body.n, body.stop or ())
        except ApiError as e:
            if e.status not in (401,):
                record_rejection(request, key, "completions", model_name, e)
            raise
        created = int(time.time())

        def logprobs_obj(c: Choice, tokens: Sequence[int], lps: Sequence[TokenLogprob], echo_prompt: bool):
            if body.logprobs is None:
                return None
            if echo_prompt:
                return completion_logprobs(tok, tokens, lps, prompt=c.prompt, prompt_lps=c.prompt_logprobs or ())
            return completion_logprobs(tok, tokens, lps)

        def prompt_text(c: Choice) -> str:
            return texts[c.index // body.n]

        if body.stream:
            sent_echo: set[int] = set()

            def make_chunk(c: Choice, delta, new, lps, first):
                if first:
                    return None
                text = delta or ""
                echo = body.echo and c.index not in sent_echo
                if echo:
                    sent_echo.add(c.index)
                    text = prompt_text(c) + text
                return {"id": job.request_id, "object": "text_completion", "created": created, "model": served.name,
                        "choices": [{"index": c.index, "text": text,
                                     "logprobs": logprobs_obj(c, new, lps, echo),
                                     "finish_reason": None}]}

            def finish_chunk(c: Choice):
                return {"id": job.request_id, "object": "text_completion", "created": created, "model": served.name,
                        "choices": [{"index": c.index, "text": "", "logprobs": None,
                                     "finish_reason": c.finish_reason}]}

            def usage_chunk(job: Job):
                return {"id": job.request_id, "object": "text_completion", "created": created, "model": served.name,
                        "choices": [], "usage": job_usage(job)}

            include = bool(body.stream_options and body.stream_options.include_usage)
            return await stream_response(request, job, make_chunk, finish_chunk, include, usage_chunk)

        await wait_job(job, request)
        choices = []
        for c in job.choices:
            text = c.text.text
            if body.echo:
                text = prompt_text(c) + text
            choices.append({"index": c.index, "text": text,
                            "logprobs": logprobs_obj(c, c.token_ids, c.logprobs, body.echo),
                            "finish_reason": c.finish_reason})
        state.metrics.requests.labels(request.url.path, "200").inc()
        return JSONResponse({"id": job.request_id, "object": "text_completion", "created": created,
                             "model": served.name, "choices": choices, "usage": job_usage(job),
                             "system_fingerprint": None}, headers=headers_for(request, job))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        key = authenticate(request)
        model_name = "?"
        try:
            body: ChatRequest = await read_body(request, ChatRequest)
            model_name = body.model
            served = find_model(key, body.model)
            body.unsupported()
            tok = served.tokenizer
            try:
                prompt = render_prompt(tok, body.plain_messages())
            except MuseError as e:
                raise invalid(str(e), "messages") from None
            lp = (body.top_logprobs or 0) if body.logprobs else None
            params = sampling(body, served, len(prompt), default_max=None, logprobs=lp, prompt_logprobs=None,
                              extra_stop_ids=(END_ID,))
            job = await admit(request, key, served, "chat.completions", "chatcmpl", [prompt], params, body.n,
                              body.stop or ())
        except ApiError as e:
            if e.status not in (401,):
                record_rejection(request, key, "chat.completions", model_name, e)
            raise
        created = int(time.time())

        def logprobs_obj(tokens: Sequence[int], lps: Sequence[TokenLogprob]):
            return chat_logprobs(tok, tokens, lps, body.top_logprobs or 0) if body.logprobs else None

        def chunk(c: Choice, delta: dict, lps_obj, finish):
            return {"id": job.request_id, "object": "chat.completion.chunk", "created": created,
                    "model": served.name, "system_fingerprint": None,
                    "choices": [{"index": c.index, "delta": delta, "logprobs": lps_obj, "finish_reason": finish}]}

        if body.stream:
            def make_chunk(c: Choice, delta, new, lps, first):
                if first:
                    return chunk(c, {"role": "assistant", "content": ""}, None, None)
                return chunk(c, {"content": delta or ""}, logprobs_obj(new, lps), None)

            def finish_chunk(c: Choice):
                return chunk(c, {}, None, c.finish_reason)

            def usage_chunk(job: Job):
                return {"id": job.request_id, "object": "chat.completion.chunk", "created": created,
                        "model": served.name, "system_fingerprint": None, "choices": [], "usage": job_usage(job)}

            include = bool(body.stream_options and body.stream_options.include_usage)
            return await stream_response(request, job, make_chunk, finish_chunk, include, usage_chunk)

        await wait_job(job, request)
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text.text, "refusal": None},
                    "logprobs": logprobs_obj(c.token_ids, c.logprobs), "finish_reason": c.finish_reason}
                   for c in job.choices]
        state.metrics.requests.labels(request.url.path, "200").inc()
        return JSONResponse({"id": job.request_id, "object": "chat.completion", "created": created,
                             "model": served.name, "choices": choices, "usage": job_usage(job),
                             "system_fingerprint": None}, headers=headers_for(request, job))

    @app.post("/tokenize")
    async def tokenize(request: Request):
        key = authenticate(request)
        body: TokenizeRequest = await read_body(request, TokenizeRequest)
        served = find_model(key, body.model)
        tok = served.tokenizer
        if (body.prompt is None) == (body.messages is None):
            raise invalid("send exactly one of prompt or messages", "prompt")
        if body.prompt is not None:
            ids = encode_prompt(tok, body.prompt)
        else:
            req = ChatRequest(model=served.name, messages=body.messages)
            try:
                from muse.tokenizer import render_chat
                msgs = req.plain_messages()
                ids = render_prompt(tok, msgs) if body.add_generation_prompt else render_chat(tok, msgs)[0]
            except MuseError as e:
                raise invalid(str(e), "messages") from None
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": served.max_model_len},
                            headers=headers_for(request))

    @app.post("/detokenize")
    async def detokenize(request: Request):
        key = authenticate(request)
        body: DetokenizeRequest = await read_body(request, DetokenizeRequest)
        served = find_model(key, body.model)
        tok = served.tokenizer
        bad = next((t for t in body.tokens if t >= tok.vocab_size), None)
        if bad is not None:
            raise invalid(f"token id {bad} is outside the vocabulary (0..{tok.vocab_size - 1})", "tokens")
        return JSONResponse({"prompt": tok.decode(body.tokens)}, headers=headers_for(request))

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request, model: str | None = None):
        key = authenticate(request)
        served = find_model(key, model)
        return JSONResponse({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOT, "bos_token": EOT,
                             "pad_token": PAD, "unk_token": None, "chat_template": served.tokenizer.chat_template,
                             "model_max_length": served.max_model_len, "vocab_size": served.tokenizer.vocab_size,
                             "special_tokens": SPECIAL_IDS}, headers=headers_for(request))

    # ---- admin ----
    @app.get("/admin/keys")
    async def admin_keys(request: Request, all: bool = False):
        require_admin(request)
        return {"object": "list", "data": [k.as_dict() for k in state.store.list_keys(include_revoked=all)]}

    @app.get("/admin/usage")
    async def admin_usage(request: Request, partner: str | None = None, since: float | None = None):
        require_admin(request)
        state.store.flush()
        return {"object": "list", "data": state.store.usage_summary(partner=partner, since=since)}

    return app


def _replace_seed(params: SamplingParams, seed: int) -> SamplingParams:
    import dataclasses

    return dataclasses.replace(params, seed=seed)


async def shutdown(state: AppState, grace: float | None = None) -> None:
    """Stop admitting, let running jobs finish for `grace` seconds, abort the rest, flush the ledger."""
    state.draining = True
    state.admission.close()
    grace = state.config.shutdown_grace_s if grace is None else grace
    jobs = list(state.jobs)
    if jobs:
        log.info("shutdown: waiting up to %.0fs for %d running requests", grace, len(jobs))
        _, pending = await asyncio.wait([asyncio.ensure_future(j.done.wait()) for j in jobs], timeout=grace)
        if pending:
            log.warning("shutdown: aborting %d requests still running after the grace period", len(pending))
            for j in list(state.jobs):
                j.cancel()
            await asyncio.wait(pending, timeout=10)
    for m in state.models.values():
        await m.client.shutdown()
    state.store.flush()

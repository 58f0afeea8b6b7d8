"""OpenAIProvider: `muse serve` or any OpenAI-compatible base URL, over HTTP (httpx, asyncio).

    provider = OpenAIProvider(ModelSpec("B", "openai", "http://localhost:8000/v1", "speedrun"),
                              api_key_env="MUSE_KEY", retries=4, timeout=60)

Likelihoods: POST /v1/completions with `echo: true, logprobs: 0, max_tokens: 1`, the choices of one
question as one request (a list of prompts, context + choice each). The echoed prompt comes back with
one logprob per token and `text_offset`s; a continuation's log-likelihood is the sum over the tokens
that start at or after the end of the context (the generated token, past the prompt, is left out).
Where a token straddles the context's end this differs from the local rule (tokens beyond the
context's own token count, lm-eval's), which never happens when the continuation starts with a space.

What an endpoint can do is probed once, by a request that goes through the response cache like any
other (so a rerun does not send it again): echo + logprobs on /v1/completions. An endpoint without
/v1/completions (404) or without prompt logprobs skips likelihood tasks with that reason, and answers
generate tasks through /v1/chat/completions.

Failures: 401/403 (the key), an unknown model, an unreachable URL are ProviderFailed, raised at once and
never retried. 429 and 5xx are retried with exponential backoff (`Retry-After` honoured, in seconds or
as an HTTP date), as are timeouts and dropped connections; a request that still fails is a failed
sample. Any other 4xx, or a reply that is not what was asked for, is a failed sample naming the reason.

The API key is read from the environment variable named by `api_key_env`, never from a flag's value
(a flag would be in the shell history and the process list). This module knows HTTP and the OpenAI wire
format; it does not know tasks, scoring or the cache (the runner hands `start` its cached fetch).
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping

import httpx

from muse.common.errors import UsageError
from muse.eval.local import split_context
from muse.eval.providers import ModelSpec, ProviderFailed, SampleFailed

MAX_STOP = 4          # OpenAI's limit on stop sequences; the runner cuts at the others itself
MAX_BACKOFF_S = 60.0


def _gist(obj, n: int = 160) -> str:
    text = " ".join(str(obj).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _error_message(resp: httpx.Response) -> tuple[str, str | None]:
    """(message, code) of an OpenAI-style error body, or the body's first characters."""
    try:
        err = resp.json().get("error")
        if isinstance(err, Mapping):
            return _gist(err.get("message") or err), err.get("code")
        if isinstance(err, str):
            return _gist(err), None
    except (ValueError, AttributeError):
        pass
    return _gist(resp.text or resp.reason_phrase), None


def retry_after(resp: httpx.Response) -> float | None:
    """Seconds to wait from a Retry-After header (a number of seconds, or an HTTP date)."""
    value = resp.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class OpenAIProvider:
    kind = "openai"

    def __init__(self, spec: ModelSpec, *, api_key_env: str | None = None, concurrency: int = 32, retries: int = 4,
                 timeout: float = 120.0, backoff: float = 0.5, style: str = "auto",
                 transport: httpx.AsyncBaseTransport | None = None):
        self.spec, self.name = spec, spec.name
        self.url, self.model = spec.target, spec.model
        self.identity = f"openai:{self.url}@{self.model}"
        self.concurrency, self.retries, self.timeout, self.backoff = concurrency, retries, timeout, backoff
        self.requested_style, self.style = style, "completion" if style == "auto" else style
        self.api_key_env = api_key_env
        key = None
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise UsageError(f"--api-key-env {api_key_env}: the environment variable {api_key_env} is not set "
                                 "or empty; export it with the endpoint's API key")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.AsyncClient(base_url=self.url, headers=headers, transport=transport,
                                       timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
                                       limits=httpx.Limits(max_connections=max(concurrency, 1)))
        self.loglik_reason: str | None = None
        self.has_completions = True
        self.requests_sent = 0

    def describe(self) -> dict:
        return {"kind": "openai", "base_url": self.url, "model": self.model, "identity": self.identity,
                "style": self.style, "api_key_env": self.api_key_env, "likelihoods": self.loglik_reason is None,
                "likelihoods_reason": self.loglik_reason}

    async def start(self, fetch: Callable[[Mapping], Awaitable[dict]] | None = None) -> None:
        """Probe what the endpoint can do (through `fetch`, the runner's cached call, when given)."""
        probe = {"op": "probe"}
        try:
            result = await (fetch(probe) if fetch is not None else self.call(probe))
        except SampleFailed as e:
            result = {"completions": True, "logprobs": False, "reason": e.reason}
        self.has_completions = bool(result.get("completions"))
        self.loglik_reason = None if result.get("logprobs") else (result.get("reason") or "no prompt logprobs")
        if self.requested_style == "auto":
            self.style = "completion" if self.has_completions else "chat"

    def unsupported(self, op: str) -> str | None:
        if op == "ids_nll":
            return "val_bpb reads the run's token shards, which cannot be sent to an endpoint (a bpb task over a text file can)"
        if op in ("loglik", "text_nll") and self.loglik_reason:
            return f"the endpoint gives no prompt log-likelihoods: {self.loglik_reason}"
        if op == "complete" and not self.has_completions:
            return "the endpoint has no /v1/completions"
        return None

    async def close(self) -> None:
        await self._http.aclose()

    # ----- HTTP with retries ----------------------------------------------------------------------------
    async def _post(self, path: str, body: dict) -> dict:
        last = ""
        for attempt in range(self.retries + 1):
            wait = min(MAX_BACKOFF_S, self.backoff * 2 ** attempt) * (0.5 + random.random() / 2)
            try:
                self.requests_sent += 1
                resp = await self._http.post(path, json=body)
            except httpx.TimeoutException:
                last = f"no answer within {self.timeout:g} s"
            except httpx.ConnectError as e:
                if attempt == self.retries:
                    raise ProviderFailed(f"model {self.name}: cannot reach {self.url} ({_gist(e) or type(e).__name__}); "
                                         "is the server running and the URL right?") from None
                last = f"cannot connect: {_gist(e)}"
            except httpx.TransportError as e:
                last = f"connection failed: {type(e).__name__}: {_gist(e)}"
            else:
                if resp.status_code == 200:
                    try:
                        data = resp.json()
                    except ValueError:
                        raise SampleFailed(f"the endpoint's reply is not JSON: {_gist(resp.text)!r}") from None
                    if not isinstance(data, dict):
                        raise SampleFailed(f"the endpoint's reply is not a JSON object: {_gist(data)!r}")
                    return data
                message, code = _error_message(resp)
                if resp.status_code in (401, 403):
                    env = f" ${self.api_key_env}" if self.api_key_env else " (pass --api-key-env VAR)"
                    raise ProviderFailed(f"model {self.name}: {self.url} refused the API key{env}: "
                                         f"{resp.status_code} {message}")
                if resp.status_code == 404 and (code == "model_not_found" or "model" in message.lower()):
                    raise ProviderFailed(f"model {self.name}: {self.url} has no model {self.model!r}: {message}")
                if resp.status_code == 429 or resp.status_code >= 500:
                    last = f"{resp.status_code} {message}"
                    wait = retry_after(resp) if retry_after(resp) is not None else wait
                else:
                    raise SampleFailed(f"{path} answered {resp.status_code}: {message}", cacheable=True)
            if attempt < self.retries:
                await asyncio.sleep(min(wait, MAX_BACKOFF_S))
        raise SampleFailed(f"{path} failed {self.retries + 1} times; last: {last}")

    # ----- the operations --------------------------------------------------------------------------------
    async def call(self, request: Mapping) -> dict:
        op = request["op"]
        if op == "probe":
            return await self._probe()
        if (reason := self.unsupported(op)) is not None:
            raise SampleFailed(reason, cacheable=True)
        if op == "loglik":
            pairs = [split_context(request["context"], c) for c in request["continuations"]]
            rows = await self._echo([ctx + cont for ctx, cont in pairs])
            scored = [self._sum_from(row, len(ctx), len(ctx + cont)) for row, (ctx, cont) in zip(rows, pairs)]
            return {"logliks": [s[0] for s in scored], "tokens": [s[1] for s in scored],
                    "prompt_tokens": sum(s[1] for s in scored)}
        if op == "text_nll":
            text = request["text"]
            ll, n = self._sum_from((await self._echo([text]))[0], 0, len(text))
            return {"nll": -ll, "tokens": n}
        if op in ("complete", "chat"):
            return await self._generate(request)
        raise SampleFailed(f"unknown request op {op!r}", cacheable=True)

    async def _probe(self) -> dict:
        body = {"model": self.model, "prompt": "Hello, world", "max_tokens": 1, "echo": True, "logprobs": 0,
                "temperature": 0}
        try:
            data = await self._post("/completions", body)
        except SampleFailed as e:
            missing = " 404" in e.reason or "answered 404" in e.reason
            return {"completions": not missing, "logprobs": False,
                    "reason": "no /v1/completions (404)" if missing else e.reason}
        try:
            lps = data["choices"][0]["logprobs"]["token_logprobs"]
            ok = isinstance(lps, list) and len(lps) >= 2 and any(isinstance(x, (int, float)) for x in lps)
        except (KeyError, IndexError, TypeError):
            ok = False
        return {"completions": True, "logprobs": ok,
                "reason": None if ok else "echo + logprobs on /v1/completions returned no prompt logprobs"}

    async def _echo(self, prompts: list[str]) -> list[dict]:
        body = {"model": self.model, "prompt": prompts, "max_tokens": 1, "echo": True, "logprobs": 0,
                "temperature": 0}
        data = await self._post("/completions", body)
        try:
            choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
            rows = [c["logprobs"] for c in choices]
            if len(rows) != len(prompts) or not all(isinstance(r, Mapping) for r in rows):
                raise ValueError(f"{len(rows)} choices with logprobs for {len(prompts)} prompts")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise SampleFailed(f"the endpoint's reply has no echoed logprobs ({_gist(e)}): {_gist(data)!r}") from None
        return rows

    @staticmethod
    def _sum_from(row: Mapping, start: int, end: int) -> tuple[float, int]:
        """Sum of the logprobs of the tokens that start in [start, end) of the echoed text. The first
        token (the document boundary a server puts first, or the text's first token) has none."""
        try:
            offsets, lps = row["text_offset"], row["token_logprobs"]
            picked = [lp for i, (off, lp) in enumerate(zip(offsets, lps)) if i > 0 and start <= off < end]
        except (KeyError, TypeError) as e:
            raise SampleFailed(f"the echoed logprobs lack text_offset/token_logprobs ({_gist(e)})") from None
        if any(not isinstance(lp, (int, float)) for lp in picked):
            raise SampleFailed("the endpoint returned no logprob for a continuation token")
        return float(sum(picked)), len(picked)

    async def _generate(self, request: Mapping) -> dict:
        temperature = float(request.get("temperature") or 0.0)
        body = {"model": self.model, "max_tokens": int(request["max_tokens"]), "temperature": temperature}
        if request.get("stop"):
            body["stop"] = list(request["stop"])[:MAX_STOP]
        if temperature > 0 and request.get("seed") is not None:
            body["seed"] = request["seed"]
        chat = request["op"] == "chat"
        if chat:
            body["messages"] = list(request["messages"])
        else:
            body["prompt"] = request["prompt"]
        data = await self._post("/chat/completions" if chat else "/completions", body)
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] if chat else choice["text"]
            if text is None:
                text = ""
            if not isinstance(text, str):
                raise TypeError(f"text is {type(text).__name__}")
        except (KeyError, IndexError, TypeError) as e:
            raise SampleFailed(f"the endpoint's reply has no generated text ({_gist(e)}): {_gist(data)!r}") from None
        usage = data.get("usage") if isinstance(data.get("usage"), Mapping) else {}
        return {"text": text, "prompt_tokens": int(usage.get("prompt_tokens") or 0),
                "completion_tokens": int(usage.get("completion_tokens") or 0),
                "finish_reason": str(choice.get("finish_reason"))}

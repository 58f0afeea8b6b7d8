"""What the harness asks a model, and the interface every model behind it answers (`Provider`).

The runner turns task samples into *requests*: small JSON-able dicts, one of five operations.

    {"op": "loglik", "context": str, "continuations": [str, ...]}
        -> {"logliks": [float, ...], "tokens": [int, ...], "prompt_tokens": int}
        the summed natural-log likelihood of each continuation right after the context (multiple choice).
    {"op": "text_nll", "text": str}            -> {"nll": float, "tokens": int}
        the negative log-likelihood of a whole text after a document boundary (bpb of a text).
    {"op": "ids_nll", "ids": [int, ...]}       -> {"nll": float, "tokens": int, "bytes": int}
        the same for token ids of the model's own tokenizer: every id after the first (val_bpb windows).
    {"op": "complete", "prompt": str, "max_tokens": int, "stop": [str], "temperature": float, "seed": int}
    {"op": "chat", "messages": [...], "max_tokens": int, "stop": [str], "temperature": float, "seed": int}
        -> {"text": str, "prompt_tokens": int, "completion_tokens": int, "finish_reason": str}

A request is also the response cache's key (with the provider's `identity`, cache.py), so it holds
text, never token ids of some other tokenizer, and everything the answer depends on.

Providers: `MuseProvider` (local.py: a checkpoint in this process, through the paged engine) and
`OpenAIProvider` (remote.py: `muse serve` or any OpenAI-compatible base URL). Two kinds of failure:
`SampleFailed` (this request could not be answered: the sample is recorded as failed, the run goes on)
and `ProviderFailed` (the model cannot be evaluated at all: a wrong key, an unreachable URL; reported
once, the model's remaining work is skipped).

This module knows model specs and the interface. It does not know tasks, graders or how to score.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from muse.common.errors import MuseError, UsageError

OPS = ("loglik", "text_nll", "ids_nll", "complete", "chat")
OPENAI_PREFIX = "openai:"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class SampleFailed(Exception):
    """One request could not be answered. `cacheable`: the same request would fail the same way (a 400,
    a reply that is not what was asked for), so a rerun may read the failure from the cache instead of
    sending it again; timeouts and 5xx are not cacheable."""

    def __init__(self, reason: str, *, cacheable: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.cacheable = cacheable


class ProviderFailed(MuseError):
    """The model cannot be evaluated (a refused key, an unreachable endpoint, an unknown model)."""

    exit_code = 2


@runtime_checkable
class Provider(Protocol):
    """A model the harness can ask requests of (the module docstring lists them).

    `identity` is what every answer depends on (the checkpoint's manifest sha256 and dtype, or the base
    URL and model id): the response cache keys on it. `style` is how generate tasks that have both a
    prompt and messages are asked: "completion" or "chat". `concurrency` bounds requests in flight.
    """

    name: str
    identity: str
    style: str
    concurrency: int

    async def start(self) -> None:
        """Get ready (load weights, probe the endpoint's abilities); may raise ProviderFailed."""

    def unsupported(self, op: str) -> str | None:
        """Why this provider cannot answer `op` (the report's skip reason), or None when it can."""

    async def call(self, request: Mapping) -> dict:
        """The response to one request; SampleFailed or ProviderFailed otherwise."""

    def describe(self) -> dict:
        """What results.json records about this model (kind, path or URL, sha256, ...)."""

    async def close(self) -> None: ...


@dataclass(frozen=True)
class ModelSpec:
    """One `--model` value: `PATH`, `NAME=PATH`, or `NAME=openai:BASE_URL@MODEL`."""

    name: str
    kind: str                 # "muse" | "openai"
    target: str               # checkpoint/run path, or base URL
    model: str | None = None  # the endpoint's model id (openai)


def _default_name(path: Path) -> str:
    """runs/x -> x; runs/x/base/step_000500 -> x (the name `muse serve` gives it)."""
    parts = path.resolve().parts
    for i in range(len(parts) - 1, 0, -1):
        if parts[i] in ("base", "sft", "dpo", "grpo", "rm") and i > 0:
            return parts[i - 1]
    return path.resolve().name or "model"


def base_url(url: str) -> str:
    """A base URL as OpenAI clients take it: `http://host:8000` -> `http://host:8000/v1`."""
    url = url.rstrip("/")
    if not re.match(r"^https?://[^/\s]+", url):
        raise UsageError(f"{url!r} is not an http(s) URL; write NAME=openai:http://HOST:PORT/v1@MODEL")
    if re.match(r"^https?://[^/]+$", url):
        url += "/v1"
    return url


def parse_model_spec(text: str) -> ModelSpec:
    """Parse one --model value (see ModelSpec); UsageError with the accepted forms otherwise."""
    name, sep, target = text.partition("=")
    if not sep or "://" in name or name.startswith(OPENAI_PREFIX):
        name, target = "", text
    if target.startswith(OPENAI_PREFIX):
        rest = target[len(OPENAI_PREFIX):]
        url, at, model = rest.rpartition("@")
        if not at or not url or not model:
            raise UsageError(f"--model {text!r}: an endpoint is NAME=openai:BASE_URL@MODEL, "
                             "e.g. B=openai:http://localhost:8000/v1@speedrun")
        name = name or model
        spec = ModelSpec(name, "openai", base_url(url), model)
    else:
        if not target:
            raise UsageError(f"--model {text!r} names no checkpoint; give a run or checkpoint directory")
        spec = ModelSpec(name or _default_name(Path(target)), "muse", target)
    if not _NAME.match(spec.name):
        raise UsageError(f"model name {spec.name!r} must be 1-64 letters, digits, '.', '_' or '-'; "
                         "name it explicitly: NAME=...")
    return spec


def parse_model_specs(texts) -> list[ModelSpec]:
    specs = [s if isinstance(s, ModelSpec) else parse_model_spec(str(s)) for s in texts]
    if not specs:
        raise UsageError("no model to evaluate; pass --model RUN_DIR (or NAME=openai:URL@MODEL)")
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            raise UsageError(f"two models are called {s.name!r}; name them: --model A=... --model B=...")
        seen.add(s.name)
    return specs

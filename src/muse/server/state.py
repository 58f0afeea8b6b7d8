"""What one running server holds: its limits (`ServerConfig`), its models (`ServedModel`) and the shared
state every route and job reads (`AppState`: the store, rate limiter, quotas, admission queue, metrics,
the jobs in flight, whether it is draining).

The server depends on the engine-client interface (`muse.infer.client.EngineClient`), never on a
model or one client class: a `ServedModel` wraps whichever client runs the engine (a thread of this
process, or a process of its own).

This module knows no routes and no HTTP.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from muse.common.errors import UsageError
from muse.infer.client import EngineClient, ThreadEngineClient
from muse.infer.engine import Engine
from muse.infer.engine_process import EngineProcessClient, EngineSpec
from muse.server.limits import AdmissionQueue, QuotaManager, RateLimiter
from muse.server.metrics import ServerMetrics
from muse.server.sqlstore import SqlStore as Store
from muse.tokenizer import Tokenizer

if TYPE_CHECKING:
    from muse.server.jobs import Job


@dataclass
class ServerConfig:
    """Server limits; `muse serve` flags map onto these one to one. docs/serving.md lists them all."""

    admin_key: str | None = None        # for /admin/*, /metrics and /openapi.json; None: those routes are closed
    max_body_bytes: int = 1 << 20       # 413 above this
    max_tokens: int | None = None       # cap on a request's max_tokens (None: the model's context)
    max_n: int = 16                     # cap on the sequences one request asks for: prompts x n
    max_logprobs: int = 20
    max_running: int = 256              # sequences generating at once (over all models)
    max_waiting: int = 1024             # sequences waiting for admission beyond that: more get 503
    max_stop_token_ids: int = 64        # distinct stop_token_ids per request
    max_tokenize_ids: int = 1 << 16     # token ids one /detokenize request may send
    shutdown_grace_s: float = 30.0
    docs: bool = False                  # serve /docs and /openapi.json without the admin key


@dataclass
class ServedModel:
    name: str
    client: EngineClient
    tokenizer: Tokenizer
    max_model_len: int
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def from_client(cls, name: str, client: EngineClient) -> ServedModel:
        if client.tokenizer is None:
            raise UsageError(f"model {name}: serving needs a tokenizer; the checkpoint has none")
        return cls(name, client, client.tokenizer, client.max_model_len)

    @classmethod
    def from_engine(cls, name: str, engine: Engine) -> ServedModel:
        """The engine's loop in a thread of this process (tests, notebooks, library use)."""
        if engine.tokenizer is None:
            raise UsageError(f"model {name}: serving needs a tokenizer; the checkpoint has none")
        return cls.from_client(name, ThreadEngineClient(engine))

    @classmethod
    def from_spec(cls, name: str, spec: EngineSpec) -> ServedModel:
        """The engine in a process of its own (`muse serve`'s default): the event loop and the engine's
        Python code then run on two cores instead of taking turns on one GIL (engine_process.py)."""
        client = EngineProcessClient(spec)
        if client.tokenizer is None:
            client.close()
            raise UsageError(f"model {name}: serving needs a tokenizer; the checkpoint has none")
        return cls.from_client(name, client)


class AppState:
    def __init__(self, models: Sequence[ServedModel], store: Store, config: ServerConfig,
                 limiter: RateLimiter | None = None, quotas: QuotaManager | None = None):
        if not models:
            raise UsageError("serve at least one model")
        self.models = {m.name: m for m in models}
        self.default_model = models[0].name
        self.store, self.config = store, config
        # one server: limits in this process; replicas on PostgreSQL: quotas in the database, rate limits
        # a per-replica share (pgstore.py)
        self.limiter = limiter or store.make_limiter()
        self.quotas = quotas or store.make_quotas()
        self.admission = AdmissionQueue(config.max_running, config.max_waiting)
        self.metrics = ServerMetrics(self.snapshot)
        self.jobs: set[Job] = set()
        self.draining = False
        self.loop: asyncio.AbstractEventLoop | None = None

    def snapshot(self) -> dict:
        return {"admission_waiting": self.admission.waiting,
                "models": {name: {**m.client.stats().as_dict(), "restarts": m.client.restarts}
                           for name, m in self.models.items()}}

    def live_state(self) -> dict:
        """What /admin/engine shows of this server, and what a replica publishes with its heartbeat."""
        snap = self.snapshot()
        return {"time": time.time(), "replica": self.store.replica, "admission_waiting": snap["admission_waiting"],
                "admission_running": self.admission.running, "healthy": self.healthy, "models": snap["models"]}

    @property
    def healthy(self) -> bool:
        return not self.draining and all(m.client.is_healthy for m in self.models.values())

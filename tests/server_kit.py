"""Shared pieces of the server tests: tiny models and engines, and uvicorn in a thread on loopback."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import torch
import uvicorn

from muse.infer.engine import Engine, EngineConfig
from muse.model import ModelConfig, build_model
from muse.server.app import create_app
from muse.server.state import ServerConfig

ADMIN = "admin-" + "x" * 40


def tiny_model(tok, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, d_model=64, n_head=4, n_kv_head=2, max_seq_len=128,
                      init_std=0.1)
    return build_model(cfg).eval()


def engine_for(model, tok, **kw):
    return Engine(model, EngineConfig(block_size=8, num_blocks=160, max_num_seqs=16, **kw), tokenizer=tok)


class Live:
    """An ASGI app under uvicorn in a thread on a free loopback port: `url`, `stop()`."""

    def __init__(self, app, **config):
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    access_log=False, **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


class Server(Live):
    """Muse's app over `models` and `store` under uvicorn in a thread: `url`, `state` (the app's AppState),
    clients, `settle()`, `stop()`."""

    def __init__(self, models, store, config=None):
        super().__init__(create_app(models, store, config or ServerConfig(admin_key=ADMIN)),
                         timeout_graceful_shutdown=5)
        self.state = self.app.state.muse
        self.store = store

    def client(self, key, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)

    def aclient(self, key) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0)

    def engine(self, name="tiny") -> Engine:
        return self.state.models[name].client.engine

    def settle(self, timeout=10.0):
        """Wait until no job is running and every engine is idle, then flush the ledger."""
        deadline = time.monotonic() + timeout
        while self.state.jobs or any(m.client.is_healthy and m.client.engine.has_unfinished_requests()
                                     for m in self.state.models.values()):
            assert time.monotonic() < deadline, "requests still running"
            time.sleep(0.005)
        self.store.flush()


def stream_until(url, auth, n_chunks, holder: list, max_tokens=1000, model="long") -> threading.Thread:
    """Start a long stream of `model` at the server `url` in a thread and return once `n_chunks` lines
    arrived (or the stream ended); the thread appends its status code, then its lines (or the transport
    error) to `holder`, and keeps reading."""
    started = threading.Event()

    def run():
        body = {"model": model, "prompt": [5, 6, 7], "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, headers=auth, timeout=60) as resp:
                holder.append(resp.status_code)
                for line in resp.iter_lines():
                    holder.append(line)
                    if len(holder) > n_chunks:
                        started.set()
        except httpx.TransportError as e:
            holder.append(e)
        finally:
            started.set()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert started.wait(60)
    return t

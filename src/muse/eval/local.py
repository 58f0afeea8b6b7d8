"""MuseProvider: a Muse checkpoint evaluated in this process, through the paged engine.

    provider = MuseProvider(ModelSpec("A", "muse", "runs/x"), device="cpu")
    await provider.start()                                 # resolve_stage + load + Engine + client
    await provider.call({"op": "loglik", "context": "2 + 2 =", "continuations": [" 4", " 5"]})

Every request goes to one `EngineClient` (an in-thread `ThreadEngineClient`); the runner keeps many
in flight, so the engine batches them (continuous batching, prefix cache on), never one prompt at a time.

Likelihoods are the engine's prompt logprobs. A continuation is tokenized as lm-evaluation-harness
does: trailing spaces of the context move to the continuation, the context and context+continuation
are encoded (`prompt_ids`: after `<|endoftext|>`, as every training document), and the continuation is
what the whole has beyond the context's length. When the engine supports `prompt_logprobs_start`, a
request asks for logprobs only from the continuation on, so the context's KV blocks can come from the
prefix cache: the choices of one question share their context, which is computed once.

A text longer than the context window is scored in windows of `max_model_len` tokens that overlap by
one token: each token is predicted once, but from at most one window of context (so a long text's
nll is a little higher than with a sliding window; docs/eval.md).

This module knows tokenization rules, the engine client and checkpoints. It does not know tasks,
graders, the cache or HTTP.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

from muse.common.errors import DataError, MuseError, ResourceError, UsageError
from muse.eval.providers import ModelSpec, ProviderFailed, SampleFailed
from muse.infer.sampling_params import SamplingParams
from muse.tokenizer import render_prompt
from muse.tokenizer.special import END_ID
from muse.tokenizer.text import TextStream, prompt_ids

# Feature test: the engine computes prompt logprobs from this position on (the prefix may hit the cache).
HAS_PROMPT_LOGPROBS_START = "prompt_logprobs_start" in {f.name for f in dataclasses.fields(SamplingParams)}


def split_context(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval's rule: trailing whitespace of the context belongs to the continuation."""
    n = len(context) - len(context.rstrip())
    if n:
        return context[:-n], context[-n:] + continuation
    return context, continuation


def windows(n_tokens: int, length: int) -> list[tuple[int, int]]:
    """[start, end) windows of at most `length` tokens over n_tokens, consecutive ones sharing one token,
    so that every token after the first is predicted exactly once."""
    if n_tokens <= length:
        return [(0, n_tokens)]
    out, start = [], 0
    while start < n_tokens - 1:
        end = min(start + length, n_tokens)
        out.append((start, end))
        start = end - 1
    return out


def find_run_data(ckpt: Path) -> Path | None:
    """RUN/data for a checkpoint at RUN/<stage>/step_N (or RUN itself), if it was prepared there."""
    for parent in (ckpt, *ckpt.resolve().parents[:3]):
        if (parent / "data" / "meta.json").is_file():
            return parent / "data"
    return None


CHAT_STAGES = ("sft", "dpo", "grpo")


def auto_style(meta: dict, checkpoint: Path) -> str:
    """"chat" for a checkpoint a chat stage trained, "completion" otherwise. The stage is the one its meta.json
    recorded when it was saved, so a checkpoint copied out of its run (RUN/sft/step_N -> elsewhere/step_N)
    keeps it; the folder name decides only for checkpoints without one."""
    stage = meta.get("stage") or checkpoint.parent.name
    return "chat" if stage in CHAT_STAGES else "completion"


class MuseProvider:
    """A checkpoint through the engine (module docstring). `prefix_reuse=False` asks for every prompt
    logprob, as an engine without `prompt_logprobs_start` must (benchmarks compare the two)."""

    kind = "muse"

    def __init__(self, spec: ModelSpec, *, stage: str | None = None, device: str = "cpu", dtype: str | None = None,
                 engine_config=None, style: str = "auto", concurrency: int | None = None, prefix_reuse: bool = True):
        self.spec, self.name = spec, spec.name
        self.stage, self.device, self.dtype_name = stage, device, dtype
        self.engine_config, self.requested_style = engine_config, style
        self.prefix_reuse = prefix_reuse and HAS_PROMPT_LOGPROBS_START
        self.concurrency = concurrency or 0
        self.client = None
        self.identity = ""
        self.style = "completion"
        self.checkpoint: Path | None = None
        self.data_dir: Path | None = None
        self._owns_client = True

    @classmethod
    def from_client(cls, name: str, client, identity: str, *, style: str = "completion",
                    concurrency: int = 64, prefix_reuse: bool = True) -> MuseProvider:
        """A provider over an engine client someone else built and owns (tests, benchmarks)."""
        p = cls(ModelSpec(name, "muse", "<engine>"), style=style, concurrency=concurrency, prefix_reuse=prefix_reuse)
        p.client, p.tok, p.identity, p.style, p._owns_client = client, client.tokenizer, identity, style, False
        p.max_len = client.max_model_len
        return p

    async def start(self) -> None:
        if self.client is not None:
            return
        import torch

        from muse.checkpoint import load, resolve_stage
        from muse.checkpoint.manifest import MANIFEST, file_sha256
        from muse.common.device import pick_device
        from muse.infer.client import ThreadEngineClient
        from muse.infer.engine import Engine, EngineConfig

        ckpt = resolve_stage(self.spec.target, self.stage, fast=True)
        device = pick_device(self.device)
        dtype = getattr(torch, self.dtype_name) if self.dtype_name else None
        model, tok, meta = load(ckpt, device=device, dtype=dtype)
        config = self.engine_config or EngineConfig()
        self.client = ThreadEngineClient(Engine(model, config, tokenizer=tok))
        self.tok, self.max_len = tok, self.client.max_model_len
        self.checkpoint = Path(meta["path"])
        self.data_dir = find_run_data(self.checkpoint)
        param = next(model.parameters())
        self.identity = f"muse:{file_sha256(self.checkpoint / MANIFEST)}:{str(param.dtype).removeprefix('torch.')}"
        self.style = self.requested_style if self.requested_style != "auto" else auto_style(meta, self.checkpoint)
        if not self.concurrency:
            self.concurrency = 2 * config.max_num_seqs

    def describe(self) -> dict:
        return {"kind": "muse", "checkpoint": str(self.checkpoint or self.spec.target), "identity": self.identity,
                "style": self.style, "max_model_len": getattr(self, "max_len", None),
                "prefix_reuse": self.prefix_reuse}

    def unsupported(self, op: str) -> str | None:
        return None

    async def close(self) -> None:
        if self.client is not None and self._owns_client:
            await self.client.shutdown()
        self.client = None

    # ----- one engine request -------------------------------------------------------------------------
    async def _final(self, ids: Sequence[int], params: SamplingParams):
        from muse.infer.engine import EngineDeadError

        out = None
        try:
            async for step in self.client.add_request(ids, params):
                out = step
        except (UsageError, ResourceError) as e:
            raise SampleFailed(str(e), cacheable=True) from None
        except EngineDeadError as e:
            raise ProviderFailed(f"model {self.name}: {e}") from None
        if out is None or out.failed:
            raise SampleFailed("the engine failed on this request")
        return out

    async def _prompt_logprobs(self, ids: list[int], start: int) -> list[float]:
        """Logprobs of ids[start:] (start >= 1) given what precedes them."""
        kw = {"prompt_logprobs_start": start} if self.prefix_reuse else {}
        out = await self._final(ids, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, **kw))
        lps = out.prompt_logprobs or []
        need = len(ids) - start
        if len(lps) < need:
            raise SampleFailed(f"the engine returned {len(lps)} prompt logprobs, expected {need}")
        return [lp.logprob for lp in lps[len(lps) - need:]]

    async def _nll(self, ids: list[int]) -> float:
        """Summed nll of ids[1:], in windows when longer than the context."""
        total = 0.0
        for a, b in windows(len(ids), self.max_len - 1):  # one slot for the token the request generates
            total -= sum(await self._prompt_logprobs(ids[a:b], 1))
        return total

    # ----- the operations ------------------------------------------------------------------------------
    async def call(self, request: Mapping) -> dict:
        op = request["op"]
        try:
            if op == "loglik":
                return await self._loglik(request["context"], request["continuations"])
            if op == "text_nll":
                ids = prompt_ids(self.tok, request["text"])
                return {"nll": await self._nll(ids), "tokens": len(ids) - 1}
            if op == "ids_nll":
                ids = [int(t) for t in request["ids"]]
                n_bytes = sum(len(self.tok.token_bytes(t)) for t in ids[1:])
                return {"nll": await self._nll(ids), "tokens": len(ids) - 1, "bytes": n_bytes}
            if op in ("complete", "chat"):
                return await self._generate(request)
        except (SampleFailed, ProviderFailed):
            raise
        except MuseError as e:  # a tokenizer or chat-format error about this request's text
            raise SampleFailed(str(e), cacheable=True) from None
        raise SampleFailed(f"unknown request op {op!r}", cacheable=True)

    async def _loglik(self, context: str, continuations: Sequence[str]) -> dict:
        import asyncio

        async def one(cont: str) -> tuple[float, int, int]:
            ctx, cont = split_context(context, cont)
            n_ctx = len(prompt_ids(self.tok, ctx))
            whole = prompt_ids(self.tok, ctx + cont)
            n_cont = len(whole) - n_ctx
            if n_cont <= 0:
                return 0.0, 0, 0
            keep = self.max_len - 1  # lm-eval keeps the rightmost tokens of a too-long input
            if len(whole) > keep:
                if n_cont >= keep:
                    raise SampleFailed(f"a continuation of {n_cont} tokens does not fit the context of "
                                       f"{self.max_len}", cacheable=True)
                whole = whole[-keep:]
            lps = await self._prompt_logprobs(whole, len(whole) - n_cont)
            return sum(lps), n_cont, len(whole)

        results = await asyncio.gather(*(one(c) for c in continuations))
        return {"logliks": [r[0] for r in results], "tokens": [r[1] for r in results],
                "prompt_tokens": sum(r[2] for r in results)}

    def prompt_tokens(self, request: Mapping) -> int:
        """The length in tokens of a generate request's prompt, as `_generate` will encode it."""
        return len(self._prompt(request)[0])

    def _prompt(self, request: Mapping) -> tuple[list[int], tuple[int, ...]]:
        if request["op"] == "chat":
            return render_prompt(self.tok, request["messages"]), (END_ID,)
        return prompt_ids(self.tok, request["prompt"]), ()

    async def _generate(self, request: Mapping) -> dict:
        ids, stop_ids = self._prompt(request)
        room = self.max_len - len(ids)
        if room < 1:
            raise SampleFailed(f"the prompt is {len(ids)} tokens, the model's context {self.max_len}", cacheable=True)
        temperature = float(request.get("temperature") or 0.0)
        params = SamplingParams(max_tokens=min(int(request["max_tokens"]), room), temperature=temperature,
                                seed=request.get("seed") if temperature > 0 else None, stop_token_ids=stop_ids)
        stream = TextStream(self.tok, request.get("stop") or ())
        text, n_out, finish = "", 0, "length"
        from muse.infer.engine import EngineDeadError

        try:
            async with contextlib.aclosing(self.client.add_request(ids, params)) as outs:
                async for out in outs:
                    c = out.outputs[0]
                    text += stream.push(c.new_token_ids)
                    n_out = len(c.token_ids)
                    if stream.stopped:
                        finish = "stop"
                        break  # leaving the stream aborts the request: no tokens past the stop string
                    if out.finished:
                        if out.failed:
                            raise SampleFailed("the engine failed on this request")
                        finish = c.finish_reason
        except (UsageError, ResourceError) as e:
            raise SampleFailed(str(e), cacheable=True) from None
        except EngineDeadError as e:
            raise ProviderFailed(f"model {self.name}: {e}") from None
        text += stream.finish()
        return {"text": text, "prompt_tokens": len(ids), "completion_tokens": n_out, "finish_reason": finish}

    # ----- the run's own token shards (val_bpb) ---------------------------------------------------------
    def shard_windows(self, split: str, limit: int | None) -> list[list[int]]:
        """Windows of this run's `split` shards (at most `limit`), for the ids_nll op; DataError when the
        checkpoint has no prepared run around it."""
        import numpy as np

        from muse.data.shards import open_shards

        if self.data_dir is None:
            raise DataError(f"no prepared data next to {self.checkpoint or self.spec.target} (RUN/data/meta.json)")
        arrays = [a for a in open_shards(self.data_dir, split) if len(a)]
        if not arrays:
            raise DataError(f"the '{split}' shards in {self.data_dir} are empty")
        stream = np.concatenate(arrays)
        if int(stream.max()) >= self.tok.vocab_size:
            raise DataError(f"{self.data_dir} was tokenized with another tokenizer than {self.checkpoint}")
        spans = windows(len(stream), self.max_len - 1)
        if limit is not None:
            spans = spans[:limit]
        return [stream[a:b].astype(int).tolist() for a, b in spans]

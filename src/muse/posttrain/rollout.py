"""Rollouts: groups of samples from the paged inference engine on the policy being trained (GRPO).

    rollouts = Rollouts(model, max_prompt_tokens=128, max_new_tokens=64, max_sequences=128, eos_ids=[eot])
    groups = rollouts.generate(prompt_ids, n=8, seeds=[step * 1000 + i for i in range(len(prompt_ids))])
    ...                                         # rewards, advantages, loss, backward, optimizer.step()
    rollouts.weights_changed()                  # after EVERY optimizer step

`generate` submits every prompt's group of n samples at once (one engine request with n samples per
prompt), so continuous batching runs them together and the n samples share the prompt's KV blocks.
Each `Completion` carries the generated token ids (the stop token included when it ended on one: its
probability is part of the policy's action), the sampled tokens' log-probabilities under the model's
raw distribution (log_softmax of the fp32 logits: temperature, top-k and top-p change what is sampled,
never the reported logprob, as sampler.token_logprobs documents), and "stop" or "length".

Two ways to reach the weights, chosen automatically (`copy_weights=None`):
  shared   one process or DDP: the engine runs on the trained module itself (DDP's inner module); no
           copy, so an optimizer step is seen at once; `weights_changed()` only resets the prefix cache.
  copy     FSDP2 (DTensor parameters, tensor parallel too), torch.compile'd blocks, or another device
           asked for: the engine runs on a plain copy, refreshed by `weights_changed()` from the full
           state dict (get_model_state_dict, full_state_dict=True: a collective under FSDP, so every
           rank calls it, and every rank gets the full weights for its own rollouts).
Either way `weights_changed()` resets the prefix cache: K/V cached by the previous rollout were
computed with the old weights, and the same prompts would read them again.

Determinism: `seeds[i]` seeds prompt i's group. The engine's noise for a token is a function of the
request seed and the token's position only (sampler.py), so the same weights and seeds give the same
tokens whatever else is in the batch, preemptions included (up to float differences of batched
kernels, which change a token only on a near-tie). A group seed s becomes the engine seed H(s) and
its samples H(s) + k (request.fan_out); hashing first keeps groups with seeds s and s + 1 from sharing
the noise of n - 1 of their samples, as raw s + k would.

The engine runs the model in eval mode (the module's own modes are restored after each rollout, module
by module) under whatever autocast the caller has active. The KV pool is sized for exactly
max_sequences x (max_prompt_tokens + max_new_tokens) tokens, not for a share of free memory: the
trainer owns the rest. What this module does not know: rewards, advantages, losses, tokenizers, text.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral

import torch
from torch import nn

from muse.common.errors import ConfigError, UsageError
from muse.common.logging import get_logger
from muse.distributed.parallelize import unwrap
from muse.infer.engine import Engine, EngineConfig, RequestOutput
from muse.infer.kv_blocks import cdiv
from muse.infer.sampling_params import SamplingParams
from muse.model import build_model

log = get_logger("muse.posttrain")


@dataclass
class Completion:
    """One sample of a group."""

    token_ids: list[int]        # generated tokens; ends with the stop token when finish_reason is "stop"
    logprobs: list[float]       # log p(token_ids[j] | prompt, token_ids[:j]) under the raw model (fp32), per token
    finish_reason: str          # "stop" (an eos / stop id, kept in token_ids) | "length" (max_new_tokens)


@dataclass
class RolloutStats:
    """The last rollout (and the last weight sync)."""

    seconds: float = 0.0                # wall time of the last generate()
    sequences: int = 0                  # samples generated (prompts x n)
    generated_tokens: int = 0
    tokens_per_s: float = 0.0
    sync_seconds: float = 0.0           # the last weights_changed(): state-dict gather + copy on the copy path


def _is_dtensor(t: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def needs_copy(model: nn.Module, device: torch.device) -> str | None:
    """Why the engine cannot run on `model` itself (None: it can). The engine's paged attention needs
    plain tensors on one device, and a compiled block would recompile for every new batch shape."""
    if any(_is_dtensor(p) for p in model.parameters()):
        return "sharded (DTensor) parameters"
    if any(hasattr(block, "_orig_mod") for block in getattr(model, "layers", {}).values()):
        return "torch.compile'd blocks"
    param = next(model.parameters())
    if param.device != device:
        return f"parameters on {param.device}, rollouts on {device}"
    return None


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter unsharded, keyed by clean names (wrapper prefixes stripped), on EVERY rank.
    Not muse.distributed.checkpoint.full_model_state: that one keeps the weights on rank 0 only."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def group_seed(seed: int) -> int:
    """The engine seed of a group: a 62-bit hash of the caller's seed (see the module docstring)."""
    data = (int(seed) & ((1 << 128) - 1)).to_bytes(16, "little")  # any int; negative ones too
    digest = hashlib.blake2b(data, digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


class _KeepModes:
    """Restores every submodule's train/eval flag on exit (the engine puts the model in eval mode)."""

    def __init__(self, model: nn.Module):
        self.modes = [(m, m.training) for m in model.modules()]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for m, training in self.modes:
            m.training = training


class Rollouts:
    """An Engine over the live policy (shared or synced copy); see the module docstring."""

    def __init__(self, model: nn.Module, *, max_prompt_tokens: int, max_new_tokens: int, max_sequences: int,
                 eos_ids: Sequence[int] = (), block_size: int = 16, device=None,
                 copy_weights: bool | None = None):
        for name, value in (("max_prompt_tokens", max_prompt_tokens), ("max_new_tokens", max_new_tokens),
                            ("max_sequences", max_sequences), ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"rollout {name} must be a positive integer, got {value!r}")
        self.source = unwrap(model)  # DDP: the inner module (same parameters)
        cfg = getattr(self.source, "config", None)
        if cfg is None:
            raise ConfigError("rollouts need a muse Transformer (a module with .config), got "
                              f"{type(self.source).__name__}")
        max_model_len = max_prompt_tokens + max_new_tokens
        if max_model_len > cfg.max_seq_len:
            raise ConfigError(f"max_prompt_tokens + max_new_tokens ({max_model_len}) is longer than the "
                              f"model's max_seq_len ({cfg.max_seq_len}); lower one of them")
        param = next(self.source.parameters())
        local = param.to_local() if _is_dtensor(param) else param
        self.device = torch.device(device) if device is not None else local.device
        if self.device.index is None and self.device.type == local.device.type:
            self.device = local.device  # "cuda" means the module's cuda:N
        why = needs_copy(self.source, self.device)
        if copy_weights is False and why is not None:
            raise ConfigError(f"the engine cannot share this module ({why}); let Rollouts copy the weights")
        self.copy_weights = why is not None if copy_weights is None else bool(copy_weights)
        self.max_prompt_tokens, self.max_new_tokens = max_prompt_tokens, max_new_tokens
        self.eos_ids = tuple(int(t) for t in eos_ids)
        # The pool: max_sequences full-length sequences, and not a block more (the trainer owns the rest).
        self.num_blocks = max_sequences * cdiv(max_model_len, block_size)
        engine_cfg = EngineConfig(num_blocks=self.num_blocks, block_size=block_size, max_num_seqs=max_sequences,
                                  max_model_len=max_model_len,
                                  max_num_batched_tokens=max(2048, max_model_len))
        if self.copy_weights:
            log.info("rollouts run on a synced copy of the policy (%s)", why or "copy_weights=True")
            self.engine_model = build_model(cfg, self.device, local.dtype)
            self.engine = Engine(self.engine_model, engine_cfg)
        else:
            self.engine_model = self.source
            with _KeepModes(self.source):  # Engine() calls model.eval()
                self.engine = Engine(self.engine_model, engine_cfg)
        self._check_vocab("eos_ids", self.eos_ids, ConfigError)
        self.stats = RolloutStats()
        self._calls = itertools.count()
        self.weights_changed()

    def weights_changed(self) -> None:
        """Call after every optimizer step (and after loading weights): forgets the prefix cache (its
        K/V came from the old weights) and, on the copy path, copies the weights (a collective under
        FSDP: every rank must call it)."""
        t0 = time.perf_counter()
        if self.copy_weights:
            with torch.no_grad():
                self.engine_model.load_state_dict(full_state_dict(self.source))
        self.engine.reset_prefix_cache()
        self.stats.sync_seconds = time.perf_counter() - t0

    def generate(self, prompts: Sequence[Sequence[int]], *, n: int, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, seeds: Sequence[int] | None = None,
                 stop_ids: Sequence[int] = ()) -> list[list[Completion]]:
        """n samples for each prompt (out[i][k]: prompt i's sample k), all batched together.

        A sample ends after an eos id (constructor) or a stop id (here), kept in its token_ids, or after
        max_new_tokens. Bad input (n < 1, an empty or too long prompt, a token outside the vocabulary,
        one seed per prompt missing) raises UsageError before anything runs."""
        prompts = [self._check_prompt(i, p) for i, p in enumerate(prompts)]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise UsageError(f"rollout n (samples per prompt) must be an integer >= 1, got {n!r}")
        if seeds is not None and len(seeds) != len(prompts):
            raise UsageError(f"got {len(seeds)} seeds for {len(prompts)} prompts; pass one per prompt, or none")
        stop = tuple(int(t) for t in stop_ids)
        self._check_vocab("stop_ids", stop)
        stop = self.eos_ids + stop
        params = [SamplingParams(n=n, max_tokens=self.max_new_tokens, temperature=temperature, top_p=top_p,
                                 top_k=top_k, stop_token_ids=stop, logprobs=0,
                                 seed=None if seeds is None else group_seed(seeds[i]))
                  for i in range(len(prompts))]
        if not prompts:
            return []
        call = next(self._calls)
        rids = [f"rollout{call}-{i}" for i in range(len(prompts))]
        t0 = time.perf_counter()
        with _KeepModes(self.engine_model):
            self.engine_model.eval()
            outs = self._run(rids, prompts, params)
        groups = [self._completions(i, outs[rid]) for i, rid in enumerate(rids)]
        seconds = time.perf_counter() - t0
        tokens = sum(len(c.token_ids) for g in groups for c in g)
        self.stats.seconds, self.stats.sequences, self.stats.generated_tokens = seconds, len(prompts) * n, tokens
        self.stats.tokens_per_s = tokens / max(seconds, 1e-9)
        return groups

    # ----- pieces ------------------------------------------------------------------------------------
    def _check_prompt(self, i: int, prompt: Sequence[int]) -> list[int]:
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if isinstance(prompt, (str, bytes)) or not all(isinstance(t, Integral) for t in prompt):
            raise UsageError(f"rollout prompt {i} must be a list of token ids (encode text at the edge: "
                             f"muse.tokenizer.text)")
        ids = [int(t) for t in prompt]
        if not ids:
            raise UsageError(f"rollout prompt {i} is empty; give every prompt at least one token")
        if len(ids) > self.max_prompt_tokens:
            raise UsageError(f"rollout prompt {i} has {len(ids)} tokens, more than max_prompt_tokens "
                             f"({self.max_prompt_tokens}); shorten it or raise max_prompt_tokens")
        self._check_vocab(f"prompt {i}", ids)
        return ids

    def _check_vocab(self, what: str, ids: Sequence[int], error=UsageError) -> None:
        V = self.engine.vocab_size
        bad = next((t for t in ids if not 0 <= t < V), None)
        if bad is not None:
            raise error(f"rollout {what} has token id {bad}, outside the vocabulary (0..{V - 1})")

    def _run(self, rids: list[str], prompts: list[list[int]], params: list[SamplingParams]) -> dict[str, RequestOutput]:
        """Every request added, then steps until all finished; on any failure the added ones are aborted
        and flushed, so the engine is idle again for the next rollout."""
        engine, outs, added = self.engine, {}, []
        try:
            for rid, prompt, sp in zip(rids, prompts, params):
                engine.add_request(rid, prompt, sp)
                added.append(rid)
            while len(outs) < len(rids):
                for out in engine.step():
                    if out.finished:
                        outs[out.request_id] = out
        except BaseException:
            for rid in added:
                engine.abort(rid)
            while engine.has_unfinished_requests() or any(engine.has_request(r) for r in added):
                engine.step()
            raise
        return outs

    def _completions(self, i: int, out: RequestOutput) -> list[Completion]:
        group = []
        for c in out.outputs:
            if c.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"the engine finished rollout prompt {i} sample {c.index} with "
                                   f"{c.finish_reason!r}; the log says why")
            group.append(Completion(list(c.token_ids), [e.logprob for e in c.logprobs], c.finish_reason))
        return group

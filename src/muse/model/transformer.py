"""Transformer: the decoder (arch "llama" or "gpt2"), its weight init, and `build_model`.

    forward(idx, targets=None, kv_cache=None, *, reduction="mean")

idx (B, T) int64 token ids. Without targets it returns logits (B, T, V) in float32; with targets
(B, T) int64 it returns the cross-entropy loss, ignoring positions whose target is -1 (prompt tokens
in SFT, padding): a float32 scalar for reduction "mean" / "sum", per-token (B, T) for "none" (zeros at
ignored positions). With a kv_cache (kv_cache.py) the T tokens continue the cached sequence. With
`model.loss_chunk` > 0 (the training loop sets it) a "mean" / "sum" loss never builds the (B*T, V) logits:
layers.chunked_cross_entropy computes it chunk by chunk, equal to the plain loss to 1e-5.

Ragged batches (the inference engine's paged cache, muse.infer.paged_cache) use three OPTIONAL cache
members on top of that protocol; a cache without them (KVCache) changes nothing:
  cache.positions       LongTensor (T,): each token's own position, for a (1, T) batch that flattens
                        several sequences (rotary / learned positions come from it, not from `pos`)
  cache.attend(...)     the cache runs attention itself (layers.Attention); see there
  cache.logits_indices  LongTensor (L,): compute logits only at these of the T positions -> (B, L, V)
                        (a 2,048-token prefill needs one row of logits, not 2,048 x vocab)

The model is pure: no optimizer, no I/O, no process groups. Blocks live in an nn.ModuleDict keyed
"0".."L-1" so FSDP / tensor parallel / activation checkpointing can be applied per block from outside
(muse.distributed) by name, torchtitan style. It is built on the meta device and filled by
`init_weights()`, so a large model never materializes twice and a sharded one is initialized in
place.

Init (see init_weights): every matrix and embedding ~ N(0, init_std); the two projections that write
into the residual stream (attention.wo, feed_forward.w2) ~ N(0, init_std / sqrt(2 * n_layer)), as in
GPT-2 and nanoGPT, so the residual stream's variance does not grow with depth; norm weights 1, biases 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from muse.common.errors import UsageError
from muse.model.config import ModelConfig
from muse.model.layers import (
    Attention,
    RMSNorm,
    RotaryEmbedding,
    _is_plain,
    chunked_cross_entropy,
    make_mlp,
    make_norm,
)

REDUCTIONS = ("mean", "sum", "none")


class Block(nn.Module):
    """Pre-norm residual block: h + attention(norm(h)), then h + feed_forward(norm(h))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attention_norm = make_norm(cfg)
        self.attention = Attention(cfg, layer_idx)
        self.ffn_norm = make_norm(cfg)
        self.feed_forward = make_mlp(cfg)

    def forward(self, h: torch.Tensor, rope, kv_cache=None, start: int = 0) -> torch.Tensor:
        h = h + self.attention(self.attention_norm(h), rope, kv_cache, start)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Decoder-only language model. Parameter names (HF Llama equivalents in docs/model.md):

    tok_embeddings.weight                      (V, C)
    pos_embeddings.weight                      (max_seq_len, C)         gpt2 only
    layers.N.attention_norm.{weight,bias}      (C,)                     bias: gpt2 only
    layers.N.attention.wq / wk / wv / wo       .weight (out, in), .bias: gpt2 only
    layers.N.attention.q_norm / k_norm.weight  (D,)                     qk_norm only
    layers.N.ffn_norm.{weight,bias}            (C,)
    layers.N.feed_forward.w1 / w2 / w3         w3: llama only (SwiGLU)
    norm.{weight,bias}                         (C,)
    output.weight                              (V, C)                   untied only; tied uses tok_embeddings
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # gpt2 learns absolute positions; llama rotates q/k instead (rope has buffers only, no parameters)
        self.pos_embeddings = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.arch == "gpt2" else None
        self.rope = (RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
                     if cfg.arch == "llama" else None)
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.n_layer)})
        self.norm = make_norm(cfg)
        # A tied head is not a second module holding the same Parameter: to_empty() on a meta model
        # would untie it silently. The head simply reads tok_embeddings.weight.
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # Rows per chunk of the chunked cross-entropy when targets are given (0: the plain loss over the
        # whole logits tensor). A runtime choice, not part of the shape: the training loop sets it from
        # its config (`loss_chunk`), so checkpoints and config.json do not carry it.
        self.loss_chunk = 0

    def output_weight(self) -> torch.Tensor:
        """The (V, C) matrix that turns the final hidden state into logits."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Fill every parameter and buffer in place (see the module docstring for the scheme).

        Deterministic under torch.manual_seed (or `generator`, which must live on the model's device):
        parameters are visited in a fixed order. Also recomputes the rotary tables, which a meta-built
        model lacks. Why scaled-normal rather than modded-nanogpt's zero-init of wo/w2: it gives every
        matrix a gradient from step one with any optimizer (AdamW or Muon) and is the scheme of the
        GPT-2 baseline we compare against; the 1/sqrt(2L) scale already keeps the residual stream
        O(1) at init.
        """
        cfg = self.config
        std = cfg.init_std
        out_std = std / math.sqrt(2 * cfg.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual_out = name.endswith("attention.wo") or name.endswith("feed_forward.w2")
                nn.init.normal_(module.weight, mean=0.0, std=out_std if is_residual_out else std,
                                generator=generator)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std, generator=generator)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        if self.rope is not None:
            self.rope.init_buffers()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache=None, *,
                reduction: str = "mean") -> torch.Tensor:
        cfg = self.config
        if idx.dim() != 2:
            raise ValueError(f"idx must be (batch, time) token ids, got shape {tuple(idx.shape)}")
        B, T = idx.shape
        start = 0 if kv_cache is None else kv_cache.pos
        positions = getattr(kv_cache, "positions", None)  # ragged batch: the cache checked its positions
        if positions is None and start + T > cfg.max_seq_len:
            raise UsageError(f"sequence of {start + T} tokens is longer than the model's max_seq_len "
                             f"({cfg.max_seq_len}); shorten the input or build the model with a larger "
                             f"max_seq_len.")

        h = self.tok_embeddings(idx)  # (B, T, C)
        rope = None
        if self.pos_embeddings is not None:
            pos = torch.arange(start, start + T, device=idx.device) if positions is None else positions
            h = h + self.pos_embeddings(pos)  # (T, C) broadcast over the batch
        if self.rope is not None:
            rope = self.rope(start, T) if positions is None else self.rope.at(positions)  # (T, D) each
        for block in self.layers.values():
            h = block(h, rope, kv_cache, start)
        if kv_cache is not None:
            kv_cache.advance(T)
            logits_indices = getattr(kv_cache, "logits_indices", None)
            if logits_indices is not None:
                h = h[:, logits_indices]  # (B, L, C)
        h = self.norm(h)
        if targets is not None and reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        weight = self.output_weight()
        if (targets is not None and self.loss_chunk and reduction != "none"
                and _is_plain(weight) and _is_plain(h)):
            # The loss without the (B*T, V) logits tensor (layers.chunked_cross_entropy); same value.
            return chunked_cross_entropy(h.reshape(B * T, -1), weight, targets.reshape(B * T), self.loss_chunk,
                                         reduction)
        # float32 logits: under bf16 autocast the matmul runs in bf16, the softmax / loss must not.
        logits = F.linear(h, weight).float()  # (B, T, V)
        if targets is None:
            return logits
        # Footgun: "mean" over a batch whose targets are all -1 is NaN (0 / 0). Callers that mask
        # (SFT) should sum and divide by their own token count across micro-batches and ranks.
        loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T), ignore_index=-1,
                               reduction=reduction)
        return loss.view(B, T) if reduction == "none" else loss


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> Transformer:
    """Construct on the meta device (no memory, no wasted init), move to `device` as empty storage in
    `dtype`, then run init_weights(). Rotary tables stay float32 whatever `dtype` is."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to(dtype=dtype)  # on meta: only changes the recorded dtype
    model.to_empty(device=device)
    model.init_weights()
    return model

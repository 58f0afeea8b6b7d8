"""KVCache: a contiguous key/value cache for incremental decoding, and the protocol the model expects.

The model talks to any cache through three members (the protocol; the inference engine's paged cache
will implement the same ones):

    cache.pos                         int, tokens already in the cache = position of the next token
    cache.update(layer_idx, k, v)     store this step's k, v (B, Hkv, T, D) for one layer and return
                                      (k_all, v_all), each (B, Hkv, pos + T, D): cached + new, in order
    cache.advance(T)                  called once by the model after all layers: pos += T

One forward with T new tokens reads `pos` once (rotary / learned positions start there), calls
`update` once per layer, then `advance(T)`. So a prompt can be prefilled in one call or in several
chunks, and decoding is the same call with T = 1.

This cache is the simple one: one tensor per layer, every row of the batch at the same position
(left-aligned prompts of equal length, or batch size 1). It knows nothing about sampling, requests or
blocks; ragged batches are the engine's paged cache's business.
"""

from __future__ import annotations

import torch

from muse.common.errors import UsageError
from muse.model.config import ModelConfig


class KVCache:
    """Preallocated (n_layer, B, Hkv, max_seq_len, D) keys and values, filled left to right."""

    def __init__(self, batch_size: int, max_seq_len: int, n_layer: int, n_kv_head: int, head_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        shape = (n_layer, batch_size, n_kv_head, max_seq_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.batch_size, self.max_seq_len, self.n_layer = batch_size, max_seq_len, n_layer
        self.pos = 0

    @classmethod
    def for_model(cls, cfg: ModelConfig, batch_size: int, max_seq_len: int | None = None,
                  device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> KVCache:
        """A cache shaped for `cfg`, holding up to max_seq_len (default cfg.max_seq_len) tokens."""
        return cls(batch_size, max_seq_len or cfg.max_seq_len, cfg.n_layer, cfg.n_kv_head, cfg.head_dim,
                   device=device, dtype=dtype)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, _, T, _ = k.shape
        if B != self.batch_size:
            raise ValueError(f"KV cache was allocated for batch size {self.batch_size}, got {B}")
        end = self.pos + T
        if end > self.max_seq_len:
            raise UsageError(f"the KV cache holds {self.max_seq_len} tokens but this step needs {end}; "
                             f"allocate a longer cache or shorten the prompt / max new tokens.")
        self.k[layer_idx, :, :, self.pos:end] = k
        self.v[layer_idx, :, :, self.pos:end] = v
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]

    def advance(self, n: int) -> None:
        self.pos += n

    def reset(self) -> None:
        """Forget every token (the stored values are overwritten by the next prefill)."""
        self.pos = 0

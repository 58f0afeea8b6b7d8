"""muse.model: ModelConfig and the decoder (nn.Modules only: no optimizer, no I/O, no process groups).

    from muse.model import ModelConfig, build_model, KVCache, count_params, flops_per_token
    cfg = ModelConfig.from_depth(12, vocab_size=32768)
    model = build_model(cfg, device="cuda")
    loss = model(idx, targets)

config.py and flops.py are torch-free, so the torch-free inference bookkeeping can read a config;
the torch-backed names (Transformer, build_model, KVCache) are imported on first use.
"""

from muse.model.config import ModelConfig
from muse.model.flops import count_params, flops_per_token

_LAZY = {"Transformer": "muse.model.transformer", "build_model": "muse.model.transformer",
         "KVCache": "muse.model.kv_cache"}

__all__ = ["ModelConfig", "count_params", "flops_per_token", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'muse.model' has no attribute {name!r}")

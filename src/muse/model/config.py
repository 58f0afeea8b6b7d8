"""ModelConfig: the shape of a decoder, and the one-knob rule (`from_depth`) that derives it.

The config is plain data (torch-free, JSON-able through `to_dict` / `from_dict`) so checkpoints, the CLI
and the torch-free inference bookkeeping can read it. It knows nothing about optimizers, devices or
data; the modules that turn it into a network live in `layers.py` and `transformer.py`.

Two architectures share one config:
  "llama": RMSNorm, rotary positions, grouped-query attention, SwiGLU MLP, no biases (optionally QK-norm).
  "gpt2":  LayerNorm with bias, learned absolute positions, GELU MLP, full multi-head attention, biases,
           tied embeddings. Kept as the baseline for ablations.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from muse.common.errors import ConfigError, closest

ARCHS = ("llama", "gpt2")


def _round_up(x: float, multiple: int) -> int:
    return int(math.ceil(x / multiple) * multiple)


def swiglu_hidden(d_model: int, multiple: int = 64) -> int:
    """SwiGLU width: 8/3 * d_model keeps the MLP's parameter count equal to a 4x GELU MLP (3 matrices
    instead of 2; Shazeer 2020, "GLU Variants Improve Transformer"), rounded up to `multiple` so the
    matmuls tile well on tensor cores and split evenly for tensor parallelism."""
    return _round_up(8 * d_model / 3, multiple)


@dataclass(kw_only=True)
class ModelConfig:
    """The shape of one decoder. Fields left as None are derived in `__post_init__` (see each comment)."""

    arch: str = "llama"
    vocab_size: int
    n_layer: int
    d_model: int
    n_head: int
    n_kv_head: int | None = None  # None -> n_head (plain multi-head attention); fewer -> GQA
    d_ff: int | None = None  # None -> SwiGLU 8/3*d_model rounded to 64 (llama), 4*d_model (gpt2)
    max_seq_len: int = 2048  # rotary table length (llama) / position table size (gpt2); the KV cache limit
    rope_theta: float = 10000.0  # rotary base; unused by gpt2
    norm_eps: float = 1e-5
    qk_norm: bool = False  # RMSNorm over each head of q and k, before rotary (llama only)
    tie_embeddings: bool | None = None  # None -> False for llama (as Llama), True for gpt2 (as GPT-2)
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"model arch {self.arch!r} is not known; use one of {', '.join(ARCHS)}."
                              + closest(str(self.arch), ARCHS))
        for name in ("vocab_size", "n_layer", "d_model", "n_head", "max_seq_len"):
            _check_positive_int(name, getattr(self, name))
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        _check_positive_int("n_kv_head", self.n_kv_head)
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model if self.arch == "gpt2" else swiglu_hidden(self.d_model)
        _check_positive_int("d_ff", self.d_ff)
        if self.tie_embeddings is None:
            self.tie_embeddings = self.arch == "gpt2"
        for name in ("qk_norm", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"model {name} must be true or false, got {getattr(self, name)!r}.")
        for name in ("rope_theta", "norm_eps", "init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"model {name} must be a positive number, got {value!r}.")
            setattr(self, name, float(value))

        if self.d_model % self.n_head:
            raise ConfigError(
                f"d_model={self.d_model} is not divisible by n_head={self.n_head}; each head gets "
                f"d_model // n_head dims, so pick an n_head that divides d_model (e.g. d_model // 64).")
        if self.n_head % self.n_kv_head:
            raise ConfigError(
                f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}; grouped-query "
                f"attention shares each k/v head among n_head // n_kv_head query heads, so pick a divisor "
                f"of n_head (n_kv_head = n_head is plain multi-head attention).")
        if self.arch == "llama" and self.head_dim % 2:
            raise ConfigError(
                f"head_dim = d_model // n_head = {self.head_dim} is odd; rotary embeddings rotate pairs of "
                f"dimensions, so choose d_model and n_head with an even head_dim (64 or 128 is usual).")
        if self.arch == "gpt2":
            if self.n_kv_head != self.n_head:
                raise ConfigError(f"arch 'gpt2' uses full multi-head attention: n_kv_head "
                                  f"({self.n_kv_head}) must equal n_head ({self.n_head}); use arch 'llama' "
                                  f"for grouped-query attention.")
            if self.qk_norm:
                raise ConfigError("arch 'gpt2' has no QK-norm; set qk_norm false or use arch 'llama'.")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    # ---- one knob -------------------------------------------------------------------------------

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int, *, arch: str = "llama", max_seq_len: int = 2048,
                   head_dim: int = 64, aspect_ratio: int = 64, **overrides) -> ModelConfig:
        """Derive a whole model from its depth (nanochat's rule): d_model = depth * aspect_ratio, rounded
        up to a multiple of head_dim; n_head = d_model // head_dim; n_kv_head = n_head; d_ff from the
        arch's rule. Depth 12 gives GPT-2 small's width (768, 12 heads).

        Any field can be overridden by keyword (e.g. n_kv_head=2 for GQA, qk_norm=True); the derived
        fields follow the overrides (an overridden d_model sets the heads and d_ff)."""
        fields = _field_names()
        unknown = [k for k in overrides if k not in fields]
        if unknown:
            k = unknown[0]
            raise ConfigError(f"unknown model setting {k!r}." + closest(k, fields)
                              + f" Valid settings: {', '.join(sorted(fields))}.")
        _check_positive_int("depth", depth)
        _check_positive_int("head_dim", head_dim)
        _check_positive_int("aspect_ratio", aspect_ratio)
        d_model = overrides.pop("d_model", _round_up(depth * aspect_ratio, head_dim))
        _check_positive_int("d_model", d_model)
        n_head = overrides.pop("n_head", max(1, d_model // head_dim))
        values = dict(arch=arch, vocab_size=vocab_size, n_layer=depth, d_model=d_model, n_head=n_head,
                      max_seq_len=max_seq_len)
        values.update(overrides)
        return cls(**values)

    # ---- plain data ---------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """Every field, with derived values filled in (so a reload never re-derives differently)."""
        return {f: getattr(self, f) for f in _field_names()}

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a model config must be a mapping of settings, got {type(data).__name__}.")
        fields = _field_names()
        unknown = sorted(k for k in data if k not in fields)
        if unknown:
            k = unknown[0]
            raise ConfigError(f"model config has unknown key(s) {unknown}." + closest(str(k), fields)
                              + " Was it written by a newer muse?")
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [k for k in required if k not in data]
        if missing:
            raise ConfigError(f"model config is missing required key(s) {missing}.")
        return cls(**data)


def _field_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(ModelConfig))


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"model {name} must be a positive integer, got {value!r}.")

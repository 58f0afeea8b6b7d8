"""Hugging Face interop, what both directions share: which HF architecture each Muse model is, the
parameter renames between the two, the tokenizer files, and shard-size parsing.

Muse's decoder maps onto three HF architectures without any approximation:

    Muse arch "llama"                  LlamaForCausalLM   model_type "llama"
    Muse arch "llama", qk_norm=True    Qwen3ForCausalLM   model_type "qwen3" (Llama + RMSNorm per head of q, k)
    Muse arch "gpt2"                   GPT2LMHeadModel    model_type "gpt2"

Llama and Qwen3 are pure renames (docs/model.md has the table; Muse's rotary already uses HF's
"rotate_half" layout, so q/k need no permutation). GPT-2 stores its linears as Conv1D, (in, out), and fuses
q, k, v into one `c_attn`, so its weights are transposed and split/concatenated on the way.

The exported tokenizer.json is Muse's file plus one post-processor that puts <|endoftext|> (Muse's BOS)
in front of `tokenizer(text)`, as every pretraining document and every chat starts with it; Muse itself
never uses the post-processor (it adds specials by id), and the importer strips it, so a round trip
gives back the original file byte for byte.

This module knows names, shapes and JSON; it reads and writes no files (hf_export.py / hf_import.py do)
and never imports transformers.
"""

from __future__ import annotations

import json
import re

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from muse.common.errors import CheckpointError, TokenizerError, UsageError
from muse.model import ModelConfig
from muse.tokenizer import Tokenizer
from muse.tokenizer.special import EOT, EOT_ID

# model_type -> the HF class that holds a language-model head for it.
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel"}

# Per-block renames for llama / qwen3: Muse name suffix -> HF name suffix (both after "layers.N.").
_LLAMA_BLOCK = (
    ("attention_norm.weight", "input_layernorm.weight"),
    ("attention.wq.weight", "self_attn.q_proj.weight"),
    ("attention.wk.weight", "self_attn.k_proj.weight"),
    ("attention.wv.weight", "self_attn.v_proj.weight"),
    ("attention.wo.weight", "self_attn.o_proj.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("feed_forward.w1.weight", "mlp.gate_proj.weight"),
    ("feed_forward.w3.weight", "mlp.up_proj.weight"),
    ("feed_forward.w2.weight", "mlp.down_proj.weight"),
)
_QK_NORM_BLOCK = (
    ("attention.q_norm.weight", "self_attn.q_norm.weight"),
    ("attention.k_norm.weight", "self_attn.k_norm.weight"),
)
# GPT-2 per-block pieces that are a transpose (Conv1D weight) or a plain copy (biases, norms).
_GPT2_BLOCK = (
    ("attention_norm", "ln_1", False),
    ("attention.wo", "attn.c_proj", True),
    ("ffn_norm", "ln_2", False),
    ("feed_forward.w1", "mlp.c_fc", True),
    ("feed_forward.w2", "mlp.c_proj", True),
)
# Buffers some HF versions saved with the weights; they hold no learned values (recomputed at load).
IGNORED_HF_SUFFIXES = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")  # not c_attn.bias


def hf_model_type(cfg: ModelConfig) -> str:
    """The HF model_type that expresses `cfg` exactly."""
    if cfg.arch == "gpt2":
        return "gpt2"
    return "qwen3" if cfg.qk_norm else "llama"


def llama_names(cfg: ModelConfig) -> dict[str, str]:
    """{Muse parameter name: HF name} for a llama-arch config (Llama, or Qwen3 with qk_norm)."""
    names = {"tok_embeddings.weight": "model.embed_tokens.weight"}
    block = _LLAMA_BLOCK + (_QK_NORM_BLOCK if cfg.qk_norm else ())
    for i in range(cfg.n_layer):
        for ours, theirs in block:
            names[f"layers.{i}.{ours}"] = f"model.layers.{i}.{theirs}"
    names["norm.weight"] = "model.norm.weight"
    if not cfg.tie_embeddings:
        names["output.weight"] = "lm_head.weight"
    return names


def _check_names(state: dict, expected, what: str) -> None:
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        parts = ([f"missing {missing[:4]}"] if missing else []) + ([f"unexpected {extra[:4]}"] if extra else [])
        raise CheckpointError(f"{what} does not fit its config ({'; '.join(parts)}); it was edited by hand or "
                              "written by an incompatible program")


# --- Muse -> HF ---------------------------------------------------------------------------------------


def to_hf_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF tensors (names, layout) from a Muse state dict; a tied head is left out, as HF stores it."""
    if cfg.arch == "gpt2":
        return _gpt2_to_hf(state, cfg)
    names = llama_names(cfg)
    _check_names(state, names, "the checkpoint's model.safetensors")
    return {theirs: state[ours] for ours, theirs in names.items()}


def _gpt2_muse_names(cfg: ModelConfig) -> list[str]:
    names = ["tok_embeddings.weight", "pos_embeddings.weight", "norm.weight", "norm.bias"]
    names += [] if cfg.tie_embeddings else ["output.weight"]
    for i in range(cfg.n_layer):
        for module in ("attention_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo",
                       "ffn_norm", "feed_forward.w1", "feed_forward.w2"):
            names += [f"layers.{i}.{module}.weight", f"layers.{i}.{module}.bias"]
    return names


def _gpt2_to_hf(state: dict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    _check_names(state, _gpt2_muse_names(cfg), "the checkpoint's model.safetensors")
    out = {"transformer.wte.weight": state["tok_embeddings.weight"],
           "transformer.wpe.weight": state["pos_embeddings.weight"]}
    for i in range(cfg.n_layer):
        ours, theirs = f"layers.{i}.", f"transformer.h.{i}."
        qkv = [f"{ours}attention.{w}" for w in ("wq", "wk", "wv")]
        # Conv1D computes x @ W with W (in, out): the transpose of nn.Linear's (out, in).
        out[theirs + "attn.c_attn.weight"] = torch.cat([state[n + ".weight"] for n in qkv], 0).t().contiguous()
        out[theirs + "attn.c_attn.bias"] = torch.cat([state[n + ".bias"] for n in qkv], 0)
        for module, hf_module, transpose in _GPT2_BLOCK:
            w = state[f"{ours}{module}.weight"]
            out[f"{theirs}{hf_module}.weight"] = w.t().contiguous() if transpose else w
            out[f"{theirs}{hf_module}.bias"] = state[f"{ours}{module}.bias"]
    out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = state["norm.weight"], state["norm.bias"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["output.weight"]
    return out


# --- HF -> Muse ---------------------------------------------------------------------------------------


def from_hf_state(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A Muse state dict from HF tensors (the inverse of to_hf_state).

    A tied model's `lm_head.weight`, if the file has one anyway, is dropped: HF ignores it too and reads
    the embedding. Names Muse has no place for (a bias, an extra norm) are refused, never dropped.
    """
    hf_state = {k: v for k, v in hf_state.items() if not k.endswith(IGNORED_HF_SUFFIXES)}
    if cfg.tie_embeddings:
        hf_state.pop("lm_head.weight", None)
    if cfg.arch == "gpt2":
        return _gpt2_from_hf(hf_state, cfg)
    names = llama_names(cfg)
    _check_hf_names(hf_state, names.values())
    return {ours: hf_state[theirs] for ours, theirs in names.items()}


def _check_hf_names(hf_state: dict, expected) -> None:
    expected = set(expected)
    extra = sorted(set(hf_state) - expected)
    if extra:
        raise CheckpointError(
            f"the weights hold tensors Muse's decoder has no place for ({', '.join(extra[:3])}"
            f"{', ...' if len(extra) > 3 else ''}): the model uses a feature its config.json does not declare "
            "(e.g. biases), which muse cannot run")
    missing = sorted(expected - set(hf_state))
    if missing:
        raise CheckpointError(
            f"the weights lack {len(missing)} tensor(s) the config implies (e.g. {missing[0]}); the download "
            "is incomplete or the files belong to another model")


def _gpt2_from_hf(hf_state: dict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    # The hub's original GPT-2 files name tensors without the "transformer." prefix.
    hf_state = {k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k: v for k, v in hf_state.items()}
    expected = ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"]
    expected += [] if cfg.tie_embeddings else ["lm_head.weight"]
    for i in range(cfg.n_layer):
        expected += [f"transformer.h.{i}.attn.c_attn.{p}" for p in ("weight", "bias")]
        expected += [f"transformer.h.{i}.{m}.{p}" for _, m, _ in _GPT2_BLOCK for p in ("weight", "bias")]
    _check_hf_names(hf_state, expected)
    out = {"tok_embeddings.weight": hf_state["transformer.wte.weight"],
           "pos_embeddings.weight": hf_state["transformer.wpe.weight"],
           "norm.weight": hf_state["transformer.ln_f.weight"], "norm.bias": hf_state["transformer.ln_f.bias"]}
    C, n_kv = cfg.d_model, cfg.n_kv_head * cfg.head_dim
    for i in range(cfg.n_layer):
        ours, theirs = f"layers.{i}.", f"transformer.h.{i}."
        w = hf_state[theirs + "attn.c_attn.weight"]  # (C, 3C) for full multi-head attention
        b = hf_state[theirs + "attn.c_attn.bias"]
        if tuple(w.shape) != (C, C + 2 * n_kv) or tuple(b.shape) != (C + 2 * n_kv,):
            raise CheckpointError(f"{theirs}attn.c_attn has shape {tuple(w.shape)}; the config implies "
                                  f"{(C, C + 2 * n_kv)}; the files belong to another model")
        for name, wpart, bpart in zip(("wq", "wk", "wv"), w.split([C, n_kv, n_kv], 1), b.split([C, n_kv, n_kv])):
            out[f"{ours}attention.{name}.weight"] = wpart.t().contiguous()
            out[f"{ours}attention.{name}.bias"] = bpart.contiguous()
        for module, hf_module, transpose in _GPT2_BLOCK:
            weight = hf_state[f"{theirs}{hf_module}.weight"]
            out[f"{ours}{module}.weight"] = weight.t().contiguous() if transpose else weight
            out[f"{ours}{module}.bias"] = hf_state[f"{theirs}{hf_module}.bias"]
    if not cfg.tie_embeddings:
        out["output.weight"] = hf_state["lm_head.weight"]
    return out


# --- tokenizer ----------------------------------------------------------------------------------------


def hf_tokenizer_json(tok: Tokenizer) -> str:
    """Muse's tokenizer.json plus a post-processor adding <|endoftext|> as BOS for `tokenizer(text)`.

    transformers' apply_chat_template tokenizes with add_special_tokens=False (the template writes the
    BOS itself), so chat ids are exactly render_chat's; `tokenizer(text)` gives [0] + encode(text), the
    way Muse prompts a base model (muse sample) and the way every pretraining document began.
    """
    hf = HFTokenizer.from_str(tok.to_str())
    hf.post_processor = processors.TemplateProcessing(
        single=f"{EOT} $A", pair=f"{EOT} $A {EOT}:1 $B:1", special_tokens=[(EOT, EOT_ID)])
    return hf.to_str(pretty=True)


def muse_tokenizer_from_hf_json(text: str) -> Tokenizer:
    """The Muse tokenizer in an HF tokenizer.json (any post-processor dropped: Muse adds specials by id).

    Raises TokenizerError naming what makes a file foreign (specials elsewhere, not byte-level, ...)."""
    try:
        hf = HFTokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise TokenizerError(f"tokenizer.json cannot be parsed ({str(e)[:200]})") from None
    hf.post_processor = None
    return Tokenizer(hf)


# --- sizes --------------------------------------------------------------------------------------------

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes in a size like "5GB" (10^9, as HF's max_shard_size), "500MB", "2GiB" (2^30) or "1000"."""
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), flags=re.IGNORECASE)
        if m is None:
            raise UsageError(f"size {text!r} is not understood; write e.g. 5GB, 500MB, 2GiB or a number of bytes")
        value, unit = float(m.group(1)), (m.group(2) or "").upper()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise UsageError(f"size {text!r} must be positive")
    return size


def dump_json(obj) -> str:
    return json.dumps(obj, indent=2) + "\n"

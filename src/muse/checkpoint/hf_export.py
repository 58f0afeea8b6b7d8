"""Exporting a Muse checkpoint as a Hugging Face model directory that transformers, vLLM and
lm-evaluation-harness load with no Muse code:

    export_hf("runs/x", "runs/x/export/hf") writes
    runs/x/export/hf/
        config.json              LlamaForCausalLM (Qwen3ForCausalLM with QK-norm, GPT2LMHeadModel for gpt2)
        generation_config.json   bos 0, eos [0 <|endoftext|>, 5 <|end|>] (so chat replies stop), pad 1
        model.safetensors        HF names; above max_shard_size model-0000i-of-0000n.safetensors + an index
        tokenizer.json           Muse's BPE + a post-processor putting <|endoftext|> (BOS) before plain text
        tokenizer_config.json    PreTrainedTokenizerFast, bos/eos/pad tokens, Muse's chat template

The directory is built in a temporary sibling and renamed into place (atomic_dir), so a killed export
leaves nothing half-written. Names and layouts come from hf.py; this module knows the HF config keys
and the file layout, not how the model computes (docs/interop.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from muse.checkpoint.checkpoint import load_model_state, read_config, read_head
from muse.checkpoint.hf import HF_ARCHITECTURES, dump_json, hf_model_type, hf_tokenizer_json, to_hf_state
from muse.checkpoint.manifest import step_of
from muse.checkpoint.stages import resolve_stage
from muse.common.errors import CheckpointError, ConfigError, OutputExistsError, UsageError
from muse.common.paths import atomic_dir
from muse.model import ModelConfig
from muse.tokenizer import CHAT_TEMPLATE, Tokenizer
from muse.tokenizer.special import END_ID, EOT, EOT_ID, PAD, PAD_ID

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # "5GB", transformers' default
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_INDEX = "model.safetensors.index.json"


def hf_config(cfg: ModelConfig, dtype: str) -> dict:
    """config.json for the HF architecture that expresses `cfg` (hf.hf_model_type)."""
    model_type = hf_model_type(cfg)
    out = {
        "architectures": [HF_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        # <|endoftext|> opens every document and chat (BOS) and ends a base model's text (EOS);
        # generation_config.json adds <|end|> as a second EOS for chat replies.
        "bos_token_id": EOT_ID,
        "eos_token_id": EOT_ID,
        "pad_token_id": PAD_ID,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        # transformers >= 4.56 reads "dtype", older versions and vLLM "torch_dtype".
        "dtype": dtype,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if model_type == "gpt2":
        out.update({
            "n_embd": cfg.d_model, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.d_ff,
            "n_positions": cfg.max_seq_len, "n_ctx": cfg.max_seq_len, "layer_norm_epsilon": cfg.norm_eps,
            # Muse's GELU is F.gelu(approximate="tanh"), which "gelu_pytorch_tanh" calls exactly.
            "activation_function": "gelu_pytorch_tanh",
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,  # Muse trains without dropout
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
        })
        return out
    out.update({
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # transformers 5 reads rope_parameters; 4.x and vLLM read rope_theta / rope_scaling.
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
    })
    if model_type == "llama":
        out.update({"mlp_bias": False, "pretraining_tp": 1})
    else:  # qwen3: Llama plus QK-norm; Muse has no sliding-window layers
        out.update({"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layer,
                    "layer_types": ["full_attention"] * cfg.n_layer})
    return out


def generation_config() -> dict:
    """Stop at <|endoftext|> (end of a document) and at <|end|> (end of a chat turn): a base model never
    emits <|end|>, a chat model ends each reply with it."""
    return {"bos_token_id": EOT_ID, "eos_token_id": [EOT_ID, END_ID], "pad_token_id": PAD_ID}


def tokenizer_config(cfg: ModelConfig) -> dict:
    """tokenizer_config.json: the fast tokenizer class (tokenizer.json holds everything it needs), special
    tokens, the chat template. clean_up_tokenization_spaces=False keeps decode(encode(s)) == s."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "pad_token": PAD,
        "unk_token": None,  # byte-level: every string encodes, nothing is unknown
        "add_bos_token": True,  # what tokenizer.json's post-processor does, stated for readers of this file
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg.max_seq_len,
        "chat_template": CHAT_TEMPLATE,
    }


def plan_shards(tensors: dict[str, torch.Tensor], max_shard_size: int) -> list[list[str]]:
    """Names grouped into files of at most max_shard_size bytes, in order (a larger tensor gets a file
    of its own, as transformers does)."""
    shards: list[list[str]] = []
    current: list[str] = []
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if current and size + n > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += n
    if current:
        shards.append(current)
    return shards


def write_safetensors(tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_size: int) -> list[str]:
    """model.safetensors, or shards plus model.safetensors.index.json; returns the file names written.

    metadata {"format": "pt"} is required: transformers refuses safetensors files without it."""
    shards = plan_shards(tensors, max_shard_size)
    if len(shards) == 1:
        save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    files, weight_map = [], {}
    for i, names in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(out_dir / file), metadata={"format": "pt"})
        files.append(file)
        weight_map.update(dict.fromkeys(names, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / SAFETENSORS_INDEX).write_text(dump_json(index), encoding="utf-8")
    return [*files, SAFETENSORS_INDEX]


def default_export_dir(ckpt: Path) -> Path:
    """RUN/export/hf for a base checkpoint, RUN/export/hf-STAGE for another stage's."""
    if step_of(ckpt) is None:
        raise UsageError(f"{ckpt} is not inside a run directory, so there is no default output; pass --out DIR")
    stage = ckpt.parent.name
    return ckpt.parent.parent / "export" / ("hf" if stage == "base" else f"hf-{stage}")


def export_hf(path: str | os.PathLike, out: str | os.PathLike | None = None, *, stage: str | None = None,
              dtype: str | None = None, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
              overwrite: bool = False) -> dict:
    """Write the checkpoint that `path` names (run, stage or checkpoint dir) as an HF model directory.

    In a run directory `stage` picks the stage; None takes the stage trained last (muse.checkpoint.stages).
    dtype None keeps the checkpoint's dtype; "float32" / "bfloat16" / "float16" converts. `out` defaults
    to RUN/export/hf. An existing non-empty `out` is replaced only with overwrite=True. Returns a summary
    (checkpoint, out, architecture, dtype, files, bytes).
    """
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    if max_shard_size <= 0:
        raise UsageError(f"max_shard_size must be a positive number of bytes, got {max_shard_size}")
    ckpt = resolve_stage(path, stage)  # verifies every file's hash
    out = Path(out) if out is not None else default_export_dir(ckpt)
    if out.resolve() == ckpt.resolve() or out.resolve() in ckpt.resolve().parents:
        raise UsageError(f"--out {out} holds the checkpoint being exported; choose a directory outside it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OutputExistsError(f"{out} already exists and is not empty; pass --force to replace it, or choose "
                                "another --out")
    head = read_head(ckpt)
    if head is not None:
        raise CheckpointError(f"{ckpt} is a {head['kind']} model (a trunk with a scalar head), not a language model; "
                              "export exports causal LMs (an sft, dpo or grpo stage)")
    try:
        cfg = ModelConfig.from_dict(read_config(ckpt))
    except ConfigError as e:
        raise CheckpointError(f"{ckpt}/config.json does not match this muse's ModelConfig: {e}") from None
    tok = Tokenizer.from_file(ckpt)
    tensors = to_hf_state(load_model_state(ckpt, verify=False), cfg)
    if dtype is not None:
        tensors = {k: t.to(DTYPES[dtype]) if t.is_floating_point() else t for k, t in tensors.items()}
    tensors = {k: t.contiguous() for k, t in tensors.items()}
    float_dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(float_dtypes) != 1:
        raise CheckpointError(f"{ckpt} mixes weight dtypes {sorted(map(str, float_dtypes))}; pass --dtype to "
                              "export them as one")
    dtype_name = str(float_dtypes.pop()).removeprefix("torch.")

    with atomic_dir(out, overwrite=overwrite) as tmp:
        files = write_safetensors(tensors, tmp, max_shard_size)
        for name, obj in (("config.json", hf_config(cfg, dtype_name)), ("generation_config.json", generation_config()),
                          ("tokenizer_config.json", tokenizer_config(cfg))):
            (tmp / name).write_text(dump_json(obj), encoding="utf-8")
            files.append(name)
        (tmp / "tokenizer.json").write_text(hf_tokenizer_json(tok), encoding="utf-8")
        files.append("tokenizer.json")
    return {
        "checkpoint": str(ckpt),
        "out": str(out),
        "architecture": HF_ARCHITECTURES[hf_model_type(cfg)],
        "dtype": dtype_name,
        "files": sorted(files),
        "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
    }

"""Importing a local Hugging Face model directory as a Muse checkpoint.

    import_hf("hf/tiny-llama", "runs/llama") writes runs/llama/base/step_000000/ (latest -> it)

so `muse.checkpoint.load("runs/llama")`, `muse sample runs/llama` and everything else that takes a run
directory accept it. Accepted: LlamaForCausalLM, Qwen3ForCausalLM (its QK-norm is Muse's qk_norm) and
GPT2LMHeadModel, with weights as model.safetensors, pytorch_model.bin or either sharded with an index
json; grouped-query attention; tied or untied embeddings.

Refused, each with a message naming the config key, because Muse's decoder would compute something else:
rope scaling of any kind (llama3, yarn, dynamic, linear, ...), biases in attention or MLP, activations
other than SiLU (GELU-tanh for GPT-2), a head_dim other than hidden_size / num_attention_heads,
sliding-window attention, and any tensor the weights hold that Muse has no place for. Muse runs only its
own tokenizer (byte-level BPE, specials at ids 0..15): a tokenizer.json that is not one is refused
unless `tokenizer=` names a Muse tokenizer to use instead (docs/interop.md).

This module reads HF files and checks them; names and layouts come from hf.py, writing from
checkpoint.save_checkpoint. It never imports transformers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from muse.checkpoint.checkpoint import save_checkpoint
from muse.checkpoint.hf import HF_ARCHITECTURES, from_hf_state, llama_names, muse_tokenizer_from_hf_json
from muse.checkpoint.manifest import LATEST, MANIFEST, list_checkpoints
from muse.common.errors import CheckpointError, ConfigError, OutputExistsError, TokenizerError, UsageError
from muse.model import ModelConfig
from muse.tokenizer import Tokenizer

SUPPORTED = {cls: model_type for model_type, cls in HF_ARCHITECTURES.items()}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Looked for in this order: an index names its shards, else the single file.
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")
# What HF's config classes assume for keys a config.json leaves out (transformers 4.x and 5.x agree).
_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "qwen3": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "gpt2": {"n_positions": 1024, "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True},
}


# --- config.json -> ModelConfig -----------------------------------------------------------------------


def read_hf_config(src: Path) -> dict:
    """config.json of an HF model directory, with errors that say what the directory is instead."""
    if not src.exists():
        raise CheckpointError(f"{src} does not exist; pass a local Hugging Face model directory (what "
                              "save_pretrained or `hf download` wrote)")
    if not src.is_dir():
        raise CheckpointError(f"{src} is a file; pass the Hugging Face model directory that holds it")
    if (src / MANIFEST).is_file():
        raise CheckpointError(f"{src} is already a muse checkpoint; use it directly, no import needed")
    try:
        with open(src / "config.json", encoding="utf-8") as f:
            hf = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{src} has no config.json; pass a Hugging Face model directory (what "
                              "save_pretrained or `hf download` wrote)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{src}/config.json cannot be read ({e}); download it again") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{src}/config.json is not a JSON object; download it again")
    return hf


def model_type_of(hf: dict, where: str = "config.json") -> str:
    """"llama", "qwen3" or "gpt2" from `architectures` (or `model_type` when that is absent)."""
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    supported = ", ".join(SUPPORTED)
    if archs:
        known = [a for a in archs if a in SUPPORTED]
        if not known:
            raise CheckpointError(f"{where} describes a {archs[0]} (model_type {model_type!r}); muse imports only "
                                  f"{supported}, the architectures its decoder computes exactly")
        kind = SUPPORTED[known[0]]
        if model_type not in (None, kind):
            raise CheckpointError(f"{where} names {known[0]} but model_type {model_type!r}; it was edited by "
                                  f"hand, fix one of them ({known[0]} goes with model_type {kind!r})")
        return kind
    if model_type in HF_ARCHITECTURES:
        return model_type
    raise CheckpointError(f"{where} has model_type {model_type!r} and no known architectures; muse imports only "
                          f"{supported}")


def _require(hf: dict, key: str, where: str):
    if hf.get(key) is None:
        raise CheckpointError(f"{where} lacks {key!r}; it is not a complete model config, download it again")
    return hf[key]


def _refuse_unless(hf: dict, key: str, allowed: tuple, default, where: str, why: str) -> None:
    value = hf.get(key, default)
    if value not in allowed:
        raise CheckpointError(f"{where} has {key}={value!r}, which muse cannot run ({why}); only a model with "
                              f"{key}={allowed[0]!r} can be imported")


def _rope_theta(hf: dict, where: str) -> float:
    """rope_theta from transformers 4.x keys (rope_theta, rope_scaling) or 5.x (rope_parameters);
    any scaling variant is refused: Muse implements plain RoPE only."""
    theta = hf.get("rope_theta", 10000.0)
    for key in ("rope_scaling", "rope_parameters"):
        params = hf.get(key)
        if params is None:
            continue
        if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
            raise CheckpointError(f"{where} has a {key} muse does not understand ({json.dumps(params)[:120]}); "
                                  "only plain RoPE (rope_type 'default') can be imported")
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise CheckpointError(f"{where} asks for {key} of type {kind!r}; muse implements plain RoPE only "
                                  "(rope_theta, no scaling), so its positions would differ - this model cannot "
                                  "be imported")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise CheckpointError(f"{where} rotates only part of each head (partial_rotary_factor="
                                  f"{params['partial_rotary_factor']}); muse rotates whole heads")
        theta = params.get("rope_theta", theta)
    return theta


def model_config_from_hf(hf: dict, *, max_seq_len: int | None = None, where: str = "config.json") -> ModelConfig:
    """The ModelConfig that computes what the HF config describes, or a CheckpointError saying why none does."""
    kind = model_type_of(hf, where)
    defaults = _DEFAULTS[kind]
    tie = hf.get("tie_word_embeddings", defaults["tie_word_embeddings"])
    if kind == "gpt2":
        _refuse_unless(hf, "activation_function", ("gelu_new", "gelu_pytorch_tanh"), "gelu_new", where,
                       "its GPT-2 uses the tanh approximation of GELU")
        _refuse_unless(hf, "scale_attn_weights", (True,), True, where, "attention is scaled by 1/sqrt(head_dim)")
        _refuse_unless(hf, "scale_attn_by_inverse_layer_idx", (False,), False, where, "no per-layer scaling")
        _refuse_unless(hf, "add_cross_attention", (False,), False, where, "a decoder-only model")
        d_model = _require(hf, "n_embd", where)
        fields = dict(arch="gpt2", vocab_size=_require(hf, "vocab_size", where), n_layer=_require(hf, "n_layer", where),
                      d_model=d_model, n_head=_require(hf, "n_head", where), d_ff=hf.get("n_inner") or 4 * d_model,
                      max_seq_len=hf.get("n_positions", defaults["n_positions"]),
                      norm_eps=hf.get("layer_norm_epsilon", defaults["layer_norm_epsilon"]))
    else:
        _refuse_unless(hf, "hidden_act", ("silu",), "silu", where, "its SwiGLU MLP uses SiLU")
        _refuse_unless(hf, "attention_bias", (False,), False, where, "its attention has no biases")
        _refuse_unless(hf, "mlp_bias", (False,), False, where, "its MLP has no biases")
        if kind == "qwen3":
            _refuse_unless(hf, "use_sliding_window", (False,), False, where, "it has no sliding-window attention")
            if any(t != "full_attention" for t in hf.get("layer_types") or ()):
                raise CheckpointError(f"{where} has layer_types other than full_attention; muse has no "
                                      "sliding-window layers, so this model cannot be imported")
        d_model, n_head = _require(hf, "hidden_size", where), _require(hf, "num_attention_heads", where)
        head_dim = hf.get("head_dim", 128 if kind == "qwen3" else None)  # Qwen3Config's default is 128
        if head_dim is not None and isinstance(d_model, int) and isinstance(n_head, int) and n_head > 0 \
                and head_dim != d_model // n_head:
            raise CheckpointError(f"{where} has head_dim={head_dim} but hidden_size / num_attention_heads = "
                                  f"{d_model // n_head}; muse derives head_dim from the width, so this model "
                                  "cannot be imported")
        fields = dict(arch="llama", vocab_size=_require(hf, "vocab_size", where),
                      n_layer=_require(hf, "num_hidden_layers", where), d_model=d_model, n_head=n_head,
                      n_kv_head=hf.get("num_key_value_heads") or n_head,
                      d_ff=_require(hf, "intermediate_size", where),
                      max_seq_len=hf.get("max_position_embeddings", defaults["max_position_embeddings"]),
                      rope_theta=_rope_theta(hf, where), norm_eps=hf.get("rms_norm_eps", defaults["rms_norm_eps"]),
                      qk_norm=kind == "qwen3")
    if max_seq_len is not None:
        fields["max_seq_len"] = max_seq_len
    try:
        return ModelConfig(**fields, tie_embeddings=tie, init_std=hf.get("initializer_range", 0.02))
    except ConfigError as e:
        raise CheckpointError(f"{where} describes a shape muse cannot build: {e}") from None


# --- weights and tokenizer ----------------------------------------------------------------------------


def weight_files(src: Path) -> list[Path]:
    """The files holding the weights, every shard an index names checked to exist."""
    for name in WEIGHT_FILES:
        path = src / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        try:
            weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{path} is not a valid shard index ({e}); download it again") from None
        for shard in shards:
            if Path(shard).name != shard:
                raise CheckpointError(f"{path} names a shard outside the directory ({shard!r}); refusing it")
            if not (src / shard).is_file():
                raise CheckpointError(f"{src} lacks {shard}, a shard {name} lists; the download is incomplete")
        return [src / s for s in shards]
    raise CheckpointError(f"{src} holds no weights (looked for {', '.join(WEIGHT_FILES)}); pass the directory "
                          "save_pretrained wrote")


def read_hf_weights(src: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF model directory by its HF name, on the CPU as stored."""
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(src):
        try:
            if path.suffix == ".safetensors":
                part = load_file(str(path))
            else:  # weights_only: a pickle from the internet must not run code
                try:
                    part = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # a pre-1.6 (non-zip) file cannot be memory-mapped
                    part = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # safetensors / pickle errors have their own types
            raise CheckpointError(f"{path} cannot be read ({str(e)[:200]}); download it again") from None
        if not isinstance(part, dict) or not all(isinstance(t, torch.Tensor) for t in part.values()):
            raise CheckpointError(f"{path} is not a state dict of tensors; it was not written by save_pretrained")
        state.update(part)
    return state


def read_hf_tokenizer(src: Path, tokenizer: str | os.PathLike | None = None) -> Tokenizer:
    """The Muse tokenizer of an HF directory (or `tokenizer`, a Muse tokenizer.json / a dir holding one)."""
    if tokenizer is not None:
        return Tokenizer.from_file(tokenizer)
    file = src / "tokenizer.json"
    if not file.is_file():
        slow = " (it has only a slow tokenizer.model)" if (src / "tokenizer.model").exists() else ""
        raise TokenizerError(f"{src} has no tokenizer.json{slow}; pass --tokenizer PATH, the Muse tokenizer "
                             "the model was trained with")
    try:
        return muse_tokenizer_from_hf_json(file.read_text(encoding="utf-8"))
    except TokenizerError as e:
        reason = str(e).removeprefix("not a Muse tokenizer: ").split("; train one")[0]
        raise TokenizerError(
            f"{file} is not a Muse tokenizer ({reason}); muse runs only its own byte-level BPE with specials at "
            "ids 0..15, so a model trained with another tokenizer cannot be imported - pass --tokenizer PATH "
            "only for a Muse tokenizer that gives the model's ids") from None


def _check_output(stage_dir: Path, overwrite: bool) -> None:
    if stage_dir.exists() and not stage_dir.is_dir():
        raise OutputExistsError(f"{stage_dir} is a file; choose another --out")
    if (list_checkpoints(stage_dir) or os.path.lexists(stage_dir / LATEST)) and not overwrite:
        raise OutputExistsError(f"{stage_dir} already holds checkpoints; pass --force to replace that stage "
                                "directory, or choose another --out")


# --- the import ---------------------------------------------------------------------------------------


def import_hf(src: str | os.PathLike, out: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
              stage: str = "base", dtype: str | None = None, max_seq_len: int | None = None,
              overwrite: bool = False) -> dict:
    """Write the HF model in `src` as OUT/STAGE/step_000000 (a Muse checkpoint, no training state).

    dtype None keeps the stored dtype; max_seq_len None takes max_position_embeddings. overwrite=True
    replaces an OUT/STAGE that already holds checkpoints. Everything is checked (config, tokenizer,
    output) before the weights are read. Returns a summary (checkpoint, architecture, dtype, params).
    """
    src, out = Path(src), Path(out)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", stage):
        raise UsageError(f"stage {stage!r} must be a plain directory name like base or sft")
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    hf = read_hf_config(src)
    cfg = model_config_from_hf(hf, max_seq_len=max_seq_len, where=f"{src}/config.json")
    tok = read_hf_tokenizer(src, tokenizer)
    if tok.vocab_size > cfg.vocab_size:
        raise TokenizerError(f"the tokenizer has {tok.vocab_size} ids but the model only {cfg.vocab_size}; it is "
                             "not this model's tokenizer")
    stage_dir = out / stage
    _check_output(stage_dir, overwrite)

    try:
        state = from_hf_state(read_hf_weights(src), cfg)
    except CheckpointError as e:
        raise CheckpointError(f"{src}: {e}") from None
    _check_shapes(state, cfg, src)
    floats = {t.dtype for t in state.values()}
    if dtype is not None:
        target = DTYPES[dtype]
    elif len(floats) == 1:
        target = floats.pop()
    else:  # mixed dtypes on disk: what the config says the model runs in
        target = DTYPES.get(hf.get("dtype") or hf.get("torch_dtype"), torch.float32)
    state = {k: t.to(target) for k, t in state.items()}
    meta = {"source": "huggingface", "imported_from": str(src.resolve()),
            "hf_architecture": HF_ARCHITECTURES[model_type_of(hf)]}

    aside = None
    if overwrite and stage_dir.exists():
        aside = stage_dir.parent / f".{stage}.old-{os.getpid()}"
        os.replace(stage_dir, aside)  # put back if the save fails, deleted once it succeeded
    try:
        ckpt = save_checkpoint(stage_dir, 0, model_state=state, model_config=cfg, tokenizer=tok, meta=meta,
                               keep_last=None)
    except BaseException:
        if aside is not None:
            shutil.rmtree(stage_dir, ignore_errors=True)
            os.replace(aside, stage_dir)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return {"checkpoint": str(ckpt), "architecture": meta["hf_architecture"],
            "dtype": str(target).removeprefix("torch."), "params": sum(t.numel() for t in state.values()),
            "config": cfg.to_dict()}


def _check_shapes(state: dict[str, torch.Tensor], cfg: ModelConfig, src: Path) -> None:
    from muse.model import Transformer

    with torch.device("meta"):  # shapes only, no memory
        expected = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    hf_names = llama_names(cfg) if cfg.arch == "llama" else {}
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise CheckpointError(f"{src}: {hf_names.get(name, name)} has shape {tuple(state[name].shape)}, the config implies "
                                  f"{shape}; the weights belong to another model")
        if not state[name].is_floating_point():
            raise CheckpointError(f"{src}: tensor for {name} is {state[name].dtype}, not floating point; "
                                  "quantized checkpoints cannot be imported")

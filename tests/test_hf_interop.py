"""Hugging Face interop: `muse export` to transformers and `muse import` back (muse.checkpoint.hf*).

Tiny fp32 models (2 layers, width 64, 4 heads, 2 k/v heads) and a Muse tokenizer trained on made-up text;
transformers builds and saves its own tiny random models. No downloads. Skipped without transformers.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from muse.checkpoint import load, save_checkpoint
from muse.checkpoint.hf import hf_tokenizer_json, parse_size
from muse.checkpoint.hf_export import plan_shards
from muse.cli.main import main
from muse.common.errors import UsageError
from muse.infer.generate import generate
from muse.model import ModelConfig, build_model
from muse.tokenizer import CHAT_TEMPLATE, render_chat, render_prompt, train_bpe

transformers = pytest.importorskip("transformers")
pytest.importorskip("jinja2")

WORDS = ("the king queen lord lady love death night day sword crown heart blood fair foul sweet speak hear "
         "come go stay thou thee thy my your noble gentle good ill grace honour").split()
V = 384  # model vocab: the tokenizer's ~330 ids padded to a multiple of 64, as a trainer may do
CONVO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Speak, noble lord!"},
         {"role": "assistant", "content": "The king is dead; long live the queen."}]
# Muse configs and the HF class each must become.
VARIANTS = {
    "llama-gqa": (dict(arch="llama", n_kv_head=2), "LlamaForCausalLM"),
    "llama-tied": (dict(arch="llama", n_kv_head=2, tie_embeddings=True), "LlamaForCausalLM"),
    "llama-qknorm": (dict(arch="llama", n_kv_head=2, qk_norm=True), "Qwen3ForCausalLM"),
    "gpt2": (dict(arch="gpt2"), "GPT2LMHeadModel"),
}


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(80)) + rng.choice(".!?;,") for _ in range(60)]
    tok = train_bpe(texts, 400)
    assert 300 <= tok.vocab_size <= V
    return tok


def _randomize(named_params) -> None:
    """Norm weights and biases off their init values (1 and 0), so a misplaced one cannot hide."""
    with torch.no_grad():
        for name, p in named_params:
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.uniform_(0.5, 1.5)


def _muse_run(root, tok, kw, seed=0):
    rope = {"rope_theta": 5e5} if kw["arch"] == "llama" else {}  # gpt2 has no rotary (nothing to export)
    cfg = ModelConfig(vocab_size=V, n_layer=2, d_model=64, n_head=4, max_seq_len=64, **rope, **kw)
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    _randomize(model.named_parameters())
    save_checkpoint(root / "base", 7, model=model, tokenizer=tok)
    return model


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, tok, tmp_path_factory):
    """(variant, muse model, run dir, export dir) for each Muse architecture, exported once per module."""
    root = tmp_path_factory.mktemp(request.param)
    model = _muse_run(root / "run", tok, VARIANTS[request.param][0])
    assert main(["export", str(root / "run")]) == 0
    return request.param, model, root / "run", root / "run" / "export" / "hf"


def _ids(out) -> list[int]:
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _cli_error(capsys, argv, match: str) -> str:
    """A user error: exit 2, one line on stderr naming `match`, no traceback."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, err
    return err


# --- export: a Muse model in transformers -------------------------------------------------------------


def test_export_matches_transformers(exported):
    variant, model, _, out = exported
    files = sorted(p.name for p in out.iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [VARIANTS[variant][1]] and config["vocab_size"] == V
    assert config["tie_word_embeddings"] == model.config.tie_embeddings
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == VARIANTS[variant][1]
    idx = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-5, rtol=1e-5)


def test_round_trip_is_bit_identical(exported, tmp_path):
    _, model, run, out = exported
    assert main(["import", str(out), "--out", str(tmp_path / "back")]) == 0
    back, back_tok, meta = load(tmp_path / "back")
    original = load(run)[1]
    assert back.config.to_dict() == model.config.to_dict()
    assert back_tok.to_str() == original.to_str()  # the BOS post-processor is stripped again
    mine, theirs = model.state_dict(), back.state_dict()
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert mine[name].dtype == theirs[name].dtype and torch.equal(mine[name], theirs[name]), name
    assert meta["step"] == 0 and meta["hf_architecture"] == VARIANTS[exported[0]][1]


def test_greedy_generation_matches_transformers(tok, tmp_path):
    model = _muse_run(tmp_path / "run", tok, VARIANTS["llama-gqa"][0], seed=3)
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert list(hf.generation_config.eos_token_id) == [0, 5]  # <|endoftext|> and <|end|>
    prompt = [0, *tok.encode("the king spoke of")]
    ours = generate(model, prompt, max_new_tokens=20, temperature=0, stop_ids=[0, 5])
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)
    assert out[0, len(prompt):].tolist() == ours
    assert len(ours) > 3
    # the batched engine, when present, agrees too (same stop ids, greedy)
    engine = pytest.importorskip("muse.infer.engine")
    from muse.infer.sampling_params import SamplingParams

    llm = engine.LLM(model, engine.EngineConfig(eos_token_id=None, max_num_seqs=2))
    params = SamplingParams(max_tokens=20, temperature=0, stop_token_ids=(0, 5))
    assert llm.generate([prompt], params, show_progress=False)[0].outputs[0].token_ids == ours


@pytest.mark.parametrize("exported", ["llama-gqa"], indirect=True)  # the tokenizer files are the same for all
def test_exported_tokenizer_and_chat_template(exported, tok):
    fast = transformers.AutoTokenizer.from_pretrained(exported[3])
    assert (fast.bos_token_id, fast.eos_token_id, fast.pad_token_id) == (0, 0, 1)
    assert fast.chat_template == CHAT_TEMPLATE
    text = "the king said: café 😀 12345\n  thou"
    # plain text gets Muse's BOS, as muse sample and every pretraining document; opt out explicitly
    assert _ids(fast(text)) == [0, *tok.encode(text)]
    assert _ids(fast(text, add_special_tokens=False)) == tok.encode(text)
    assert fast.decode(tok.encode(text)) == text  # no clean-up of spaces
    assert fast.decode(_ids(fast(text)), skip_special_tokens=True) == text
    assert _ids(fast.apply_chat_template(CONVO, tokenize=True)) == render_chat(tok, CONVO)[0]
    prompt = fast.apply_chat_template(CONVO[:-1], tokenize=True, add_generation_prompt=True)
    assert _ids(prompt) == render_prompt(tok, CONVO[:-1])


def test_sharded_and_converted_export(tok, tmp_path):
    model = _muse_run(tmp_path / "run", tok, VARIANTS["llama-gqa"][0])
    out = tmp_path / "hf"
    assert main(["export", str(tmp_path / "run"), "--out", str(out), "--max-shard-size", "100KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in model.state_dict().values())
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    idx = torch.randint(0, V, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-5, rtol=1e-5)
    assert main(["import", str(out), "--out", str(tmp_path / "back")]) == 0
    back = load(tmp_path / "back")[0]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    # bf16: the export converts, the import keeps what is stored
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert main(["import", str(tmp_path / "bf16"), "--out", str(tmp_path / "back16")]) == 0
    back16, _, meta = load(tmp_path / "back16")
    assert meta["dtype"] == "bfloat16"
    for (name, a), b in zip(model.state_dict().items(), back16.state_dict().values()):
        assert torch.equal(a.to(torch.bfloat16), b), name


def test_plan_shards_and_sizes():
    t = {n: torch.zeros(10) for n in "abcde"}  # 40 bytes each
    assert plan_shards(t, 100) == [["a", "b"], ["c", "d"], ["e"]]
    assert plan_shards(t, 10) == [["a"], ["b"], ["c"], ["d"], ["e"]]  # a tensor over the limit: a file of its own
    assert plan_shards(t, 10**9) == [list("abcde")]
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("100kb") == 10**5
    assert parse_size("1000") == 1000 and parse_size(1000) == 1000
    for bad in ("5XB", "-1GB", "0", "lots"):
        with pytest.raises(UsageError):
            parse_size(bad)


# --- import: a transformers-made model in Muse ------------------------------------------------------


def _hf_model(kind: str, tied: bool):
    torch.manual_seed(2)
    common = dict(vocab_size=V, tie_word_embeddings=tied)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, **common)
        return transformers.GPT2LMHeadModel(cfg).eval()
    common.update(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=5e5)
    if kind == "qwen3":
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=16, **common)).eval()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).eval()


def _save_bin(hf, d, shards: int) -> None:
    """pytorch_model.bin (transformers 5 writes only safetensors), sharded with an index when shards > 1."""
    hf.config.save_pretrained(d)
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    if shards == 1:
        torch.save(state, d / "pytorch_model.bin")
        return
    names = list(state)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = names[i::shards]
        torch.save({n: state[n] for n in part}, d / file)
        weight_map.update(dict.fromkeys(part, file))
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("kind,tied,fmt", [
    ("llama", False, "safetensors"), ("llama", True, "safetensors"), ("llama", False, "sharded"),
    ("llama", True, "bin"), ("llama", False, "bin-sharded"), ("qwen3", True, "safetensors"),
    ("gpt2", True, "safetensors"),
])
def test_import_matches_transformers(tok, tmp_path, kind, tied, fmt):
    hf = _hf_model(kind, tied)
    _randomize(hf.named_parameters())
    d = tmp_path / "hf"
    if fmt.startswith("bin"):
        _save_bin(hf, d, shards=3 if fmt == "bin-sharded" else 1)
    else:
        hf.save_pretrained(d, max_shard_size="100KB" if fmt == "sharded" else "5GB")
    assert (len(list(d.glob("*.index.json"))) == 1) == fmt.endswith("sharded")
    # A plain Muse tokenizer.json and one exported with the BOS post-processor are both accepted.
    (d / "tokenizer.json").write_text(hf_tokenizer_json(tok) if tied else tok.to_str())
    assert main(["import", str(d), "--out", str(tmp_path / "run")]) == 0
    model, back_tok, meta = load(tmp_path / "run")
    assert back_tok.to_str() == tok.to_str()
    assert (model.output is None) == tied and model.config.qk_norm == (kind == "qwen3")
    idx = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, atol=1e-5, rtol=1e-5)


def test_sample_runs_on_an_imported_model(tok, tmp_path, capsys):
    hf = _hf_model("llama", tied=False)
    hf.save_pretrained(tmp_path / "hf")
    tok.save(tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["checkpoint"].endswith("base/step_000000") and result["architecture"] == "LlamaForCausalLM"
    assert main(["sample", str(tmp_path / "run"), "--prompt", "the king", "--max-tokens", "5",
                 "--temperature", "0", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert 1 <= row["tokens"] <= 5
    # a second import into the same run needs --force, which replaces the stage directory
    _cli_error(capsys, ["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")], "--force")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run"), "--force"]) == 0


def test_continued_pretraining_of_an_imported_model(tok, tmp_path, capsys):
    """import -> prepare with the model's tokenizer -> train --init-from: the imported weights are the start."""
    hf = _hf_model("llama", tied=True)
    hf.save_pretrained(tmp_path / "hf")
    tok.save(tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "imported")]) == 0
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = random.Random(3)
    for i in range(6):
        (corpus / f"d{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(300)) + "\n")
    run = tmp_path / "cpt"
    assert main(["prepare", str(corpus), "--out", str(run), "--tokenizer", str(tmp_path / "imported" / "base" / "latest"
                                                                                / "tokenizer.json")]) == 0
    assert main(["train", str(run), "--init-from", str(tmp_path / "imported"), "--seq-len", "32", "--batch-size", "2",
                 "--max-steps", "2", "--device", "cpu", "--set", "eval_batches=1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model, _, _ = load(run)
    assert out["steps"] == 2 and model.config.d_model == 64 and model.config.n_kv_head == 2
    assert model.config.rope_theta == 5e5  # the imported model's settings, not the depth rule's


# --- refusals: one line, exit 2, no traceback --------------------------------------------------------

LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V, "hidden_size": 64,
                "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "max_position_embeddings": 64}


@pytest.mark.parametrize("change,match", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling of type 'llama3'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling of type 'linear'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_parameters of type 'yarn'"),
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "MistralForCausalLM"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "LlamaForSequenceClassification"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"mlp_bias": True}, "mlp_bias=True"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"head_dim": 32}, "head_dim=32"),
    ({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 16, "use_sliding_window": True},
     "use_sliding_window=True"),
    ({"num_attention_heads": 5}, "cannot build"),
    ({"hidden_size": None}, "lacks 'hidden_size'"),
])
def test_import_refuses_what_muse_cannot_run(tok, tmp_path, capsys, change, match):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**LLAMA_CONFIG, **change}))
    tok.save(tmp_path / "hf")
    _cli_error(capsys, ["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")], match)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_import_refuses_missing_and_foreign_files(tok, tmp_path, capsys):
    d = tmp_path / "hf"
    argv = ["import", str(d), "--out", str(tmp_path / "run")]
    _cli_error(capsys, argv, "does not exist")
    d.mkdir()
    _cli_error(capsys, argv, "has no config.json")
    (d / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    _cli_error(capsys, argv, "has no tokenizer.json")
    (d / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0},
                                                                               "unk_token": "a"}}))
    _cli_error(capsys, argv, "is not a Muse tokenizer")
    tok.save(d)
    _cli_error(capsys, argv, "holds no weights")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00001-of-00002.safetensors"}}))
    _cli_error(capsys, argv, "lacks model-00001-of-00002.safetensors")
    (d / "model.safetensors.index.json").unlink()
    hf = _hf_model("llama", tied=False)
    state = {**hf.state_dict(), "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}
    from safetensors.torch import save_file
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps({**LLAMA_CONFIG, "intermediate_size": 160}))
    _cli_error(capsys, argv, "no place for (model.layers.0.self_attn.q_proj.bias)")
    (d / "config.json").write_text(json.dumps({**LLAMA_CONFIG, "intermediate_size": 96}))
    state.pop("model.layers.0.self_attn.q_proj.bias")
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    _cli_error(capsys, argv, "the config implies (96, 64)")
    assert not (tmp_path / "run").exists()


def test_export_refusals(tok, tmp_path, capsys):
    _muse_run(tmp_path / "run", tok, VARIANTS["llama-gqa"][0])
    run = str(tmp_path / "run")
    _cli_error(capsys, ["export", str(tmp_path / "nothing")], "does not exist")
    _cli_error(capsys, ["export", run, "--max-shard-size", "5XB"], "not understood")
    _cli_error(capsys, ["export", run, "--out", run, "--force"], "holds the checkpoint")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    _cli_error(capsys, ["export", run, "--out", str(tmp_path / "busy")], "--force")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    assert main(["export", run, "--out", str(tmp_path / "busy"), "--force"]) == 0
    assert not (tmp_path / "busy" / "notes.txt").exists() and (tmp_path / "busy" / "config.json").exists()

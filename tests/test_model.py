"""muse.model: shapes, counts, causality, GQA, rotary, KV cache, loss, init, config errors.

Every fast path is compared with a slow reference written here (attention with an explicit softmax,
rotary with complex numbers, the loss by hand, decoding against the full forward), and, where
transformers is installed, the llama/gpt2 variants against HF's own implementations.
"""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from muse.common.errors import ConfigError, UsageError
from muse.model import KVCache, ModelConfig, Transformer, build_model, count_params, flops_per_token
from muse.model.layers import _sdpa, apply_rotary

V = 100


def tiny(arch="llama", **kw) -> ModelConfig:
    base = dict(arch=arch, vocab_size=V, n_layer=2, d_model=64, n_head=4, max_seq_len=32)
    base.update(kw)
    return ModelConfig(**base)


def built(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def tokens(B=2, T=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g)


VARIANTS = {
    "llama": dict(arch="llama"),
    "llama-gqa-qknorm-tied": dict(arch="llama", n_kv_head=2, qk_norm=True, tie_embeddings=True),
    "gpt2": dict(arch="gpt2"),
}


# ---- shapes, counts -----------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shapes_and_dtypes(arch):
    model = built(tiny(arch))
    idx = tokens()
    logits = model(idx)
    assert logits.shape == (2, 16, V) and logits.dtype == torch.float32
    loss = model(idx, idx)
    assert loss.shape == () and loss.dtype == torch.float32
    per_token = model(idx, idx, reduction="none")
    assert per_token.shape == (2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(idx).dtype == torch.float32
        assert model(idx, idx).dtype == torch.float32


@pytest.mark.parametrize("kw", [dict(arch="llama"), dict(arch="llama", tie_embeddings=True),
                                dict(arch="llama", n_kv_head=1, qk_norm=True), dict(arch="gpt2"),
                                dict(arch="gpt2", tie_embeddings=False, d_ff=100)])
def test_count_params_matches_the_built_model(kw):
    cfg = tiny(**kw)
    model = build_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    assert count_params(cfg) == total
    tables = model.tok_embeddings.weight.numel()
    tables += model.pos_embeddings.weight.numel() if model.pos_embeddings is not None else 0
    head = model.output_weight().numel()
    assert count_params(cfg, non_embedding=True) == total - tables + (head if cfg.tie_embeddings else 0)


def test_count_params_matches_published_models():
    # GPT-2 small (124M, the number nanoGPT prints) and Llama-2-7B (HF config, 6.74B).
    gpt2 = ModelConfig(arch="gpt2", vocab_size=50257, n_layer=12, d_model=768, n_head=12, max_seq_len=1024)
    assert count_params(gpt2) == 124_439_808
    llama = ModelConfig(vocab_size=32000, n_layer=32, d_model=4096, n_head=32, d_ff=11008, max_seq_len=4096)
    assert count_params(llama) == 6_738_415_616


@pytest.mark.parametrize("name", list(VARIANTS))
def test_flops_per_token_against_torch_flop_counter(name):
    from torch.utils.flop_counter import FlopCounterMode

    cfg = tiny(**VARIANTS[name])
    model = built(cfg)
    B, T = 2, 16
    counter = FlopCounterMode(display=False)
    with counter:
        model(tokens(B, T), tokens(B, T, seed=2)).backward()
    # The counter sees every matmul (forward + both backward products) but not attention on CPU nor
    # elementwise work; the 6N rule counts norm weights and biases as if they were matmul weights.
    elementwise = sum(p.numel() for n, p in model.named_parameters() if "norm" in n or n.endswith(".bias"))
    n = count_params(cfg, non_embedding=True)
    assert counter.get_total_flops() / (B * T) == 6 * (n - elementwise)
    assert flops_per_token(cfg, T) == 6 * n + 12 * cfg.n_layer * cfg.d_model * T
    with pytest.raises(ValueError):
        flops_per_token(cfg, 0)


# ---- causality, attention -------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_causal(arch):
    model = built(tiny(arch))
    idx = tokens(1, 20)
    base = model(idx)
    t = 11
    changed = idx.clone()
    changed[0, t] = (changed[0, t] + 1) % V
    out = model(changed)
    torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=0)
    assert (out[:, t:] - base[:, t:]).abs().amax(-1).min() > 0  # every later position sees it


def reference_attention(q, k, v, start):
    """Softmax(q k^T / sqrt(D) + causal mask) v with k/v heads repeated per group, written out."""
    n_rep = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)
    T, S = q.size(2), k.size(2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    allowed = torch.tensor([[s <= start + t for s in range(S)] for t in range(T)])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("n_kv", [4, 2, 1])
@pytest.mark.parametrize("start,T", [(0, 7), (5, 1), (5, 4), (0, 1)])
def test_sdpa_paths_match_reference(n_kv, start, T):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, T, 8, generator=g)
    k = torch.randn(2, n_kv, start + T, 8, generator=g)
    v = torch.randn(2, n_kv, start + T, 8, generator=g)
    torch.testing.assert_close(_sdpa(q, k, v, start), reference_attention(q, k, v, start), atol=1e-5, rtol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_weights():
    gqa = built(tiny(n_kv_head=2))
    mha = built(tiny(n_kv_head=4), seed=123)
    hd, rep = gqa.config.head_dim, 2
    state = {}
    for name, p in gqa.state_dict().items():
        if name.endswith(("attention.wk.weight", "attention.wv.weight")):
            # k/v head j serves query heads j*rep .. j*rep+rep-1: repeat each head's rows rep times
            p = p.view(2, hd, -1).repeat_interleave(rep, dim=0).reshape(4 * hd, -1)
        state[name] = p
    mha.load_state_dict(state)
    idx = tokens()
    torch.testing.assert_close(mha(idx), gqa(idx), atol=1e-5, rtol=1e-5)
    # and through the cache, where chunks after the first take the explicit-mask path
    outs = []
    for model in (gqa, mha):
        cache = KVCache.for_model(model.config, batch_size=2)
        outs.append(torch.cat([model(idx[:, :9], kv_cache=cache), model(idx[:, 9:], kv_cache=cache)], 1))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    # n_kv_head == n_head is the plain multi-head model: same parameter shapes, same outputs
    plain = built(tiny())
    explicit = built(tiny(n_kv_head=4))
    torch.testing.assert_close(explicit(idx), plain(idx), rtol=0, atol=0)


def test_rotary_matches_complex_reference():
    cfg = tiny(rope_theta=500.0)
    model = built(cfg)
    D, T, start = cfg.head_dim, 9, 5
    x = torch.randn(2, 3, T, D, generator=torch.Generator().manual_seed(0))
    out = apply_rotary(x, *model.rope(start, T))
    # dims (i, i + D/2) form the complex number x_i + j x_{i+D/2}, turned by pos * theta^(-2i/D)
    half = D // 2
    freqs = torch.tensor([500.0 ** (-2 * i / D) for i in range(half)], dtype=torch.float64)
    pos = torch.arange(start, start + T, dtype=torch.float64)
    turn = torch.polar(torch.ones(T, half, dtype=torch.float64), pos[:, None] * freqs[None, :])
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * turn
    ref = torch.cat([z.real, z.imag], dim=-1).float()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, x)  # the rotation does something


# ---- KV cache -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(VARIANTS))
def test_kv_cache_decoding_matches_full_forward(name):
    cfg = tiny(**VARIANTS[name])
    model = built(cfg)
    idx = tokens(2, 24)
    full = model(idx)
    # prefill 10, then one token at a time
    cache = KVCache.for_model(cfg, batch_size=2)
    outs = [model(idx[:, :10], kv_cache=cache)]
    for t in range(10, 24):
        outs.append(model(idx[:, t:t + 1], kv_cache=cache))
    assert cache.pos == 24
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)
    # chunked prefill of uneven chunks, into a cache shorter than max_seq_len
    cache = KVCache.for_model(cfg, batch_size=2, max_seq_len=24)
    outs = [model(idx[:, a:b], kv_cache=cache) for a, b in [(0, 5), (5, 8), (8, 17), (17, 18), (18, 24)]]
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)
    # the reused cache after reset gives the same answers again
    cache.reset()
    torch.testing.assert_close(model(idx[:, :7], kv_cache=cache), full[:, :7], atol=1e-5, rtol=1e-5)


def test_kv_cache_and_position_limits():
    cfg = tiny()
    model = built(cfg)
    cache = KVCache.for_model(cfg, batch_size=1, max_seq_len=8)
    model(tokens(1, 6), kv_cache=cache)
    with pytest.raises(UsageError, match="KV cache holds 8"):
        model(tokens(1, 3), kv_cache=cache)
    with pytest.raises(ValueError, match="batch size"):
        model(tokens(2, 1), kv_cache=KVCache.for_model(cfg, batch_size=1))
    for arch in ("llama", "gpt2"):
        with pytest.raises(UsageError, match="max_seq_len"):
            built(tiny(arch))(tokens(1, 33))


# ---- loss -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_loss_with_ignore_index_matches_manual(arch):
    model = built(tiny(arch))
    idx, targets = tokens(), tokens(seed=5)
    targets[0, :6] = -1
    targets[1, 10] = -1
    logits = model(idx).double()
    logp = logits.log_softmax(-1)
    keep = targets != -1
    nll = -logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * keep
    torch.testing.assert_close(model(idx, targets).double(), nll.sum() / keep.sum(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(idx, targets, reduction="sum").double(), nll.sum(), atol=1e-4, rtol=1e-5)
    per_token = model(idx, targets, reduction="none")
    torch.testing.assert_close(per_token.double(), nll, atol=1e-5, rtol=1e-5)
    assert (per_token[~keep] == 0).all()
    with pytest.raises(ValueError):
        model(idx, targets, reduction="avg")


# ---- weights and init -------------------------------------------------------------------------------

def test_tied_embeddings_share_storage():
    tied = build_model(tiny(tie_embeddings=True))
    assert tied.output is None
    assert tied.output_weight().data_ptr() == tied.tok_embeddings.weight.data_ptr()
    # the head really reads the embedding: editing one row of it changes that token's logit
    idx = tokens(1, 4)
    before = tied(idx)
    with torch.no_grad():
        tied.tok_embeddings.weight[7] += 1.0
    after = tied(idx)
    assert not torch.allclose(before[..., 7], after[..., 7])
    untied = build_model(tiny())
    assert untied.output_weight().data_ptr() != untied.tok_embeddings.weight.data_ptr()
    assert "output.weight" not in tied.state_dict() and "output.weight" in untied.state_dict()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_init_is_deterministic_finite_and_scaled(arch):
    cfg = tiny(arch, n_layer=4, d_model=128, d_ff=512)
    a, b, c = built(cfg, seed=3), built(cfg, seed=3), built(cfg, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["layers.0.attention.wq.weight"], sc["layers.0.attention.wq.weight"])
    assert all(torch.isfinite(t).all() for t in sa.values())
    std = lambda k: sa[k].std().item()
    assert abs(std("layers.0.attention.wq.weight") - 0.02) < 0.002
    assert abs(std("layers.0.feed_forward.w2.weight") - 0.02 / math.sqrt(8)) < 0.001
    assert abs(std("layers.0.attention.wo.weight") - 0.02 / math.sqrt(8)) < 0.001
    assert torch.equal(sa["norm.weight"], torch.ones(128))
    if arch == "gpt2":
        assert torch.equal(sa["layers.1.attention.wo.bias"], torch.zeros(128))
    # an explicit generator gives the same model whatever the global RNG says
    torch.manual_seed(99)
    g1 = build_model(cfg)
    g1.init_weights(generator=torch.Generator().manual_seed(7))
    g2 = build_model(cfg)
    g2.init_weights(generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(g1.state_dict().values(), g2.state_dict().values()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_meta_build_leaves_no_meta_tensors(dtype):
    model = build_model(tiny(qk_norm=True), dtype=dtype)
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    assert tensors and all(t.device.type == "cpu" for _, t in tensors)
    assert all(p.dtype == dtype for p in model.parameters())
    # rotary tables are recomputed for real (not to_empty's garbage) and kept in float32
    fresh = Transformer(tiny(qk_norm=True))  # built on CPU directly, computes the tables itself
    assert model.rope.cos.dtype == torch.float32
    torch.testing.assert_close(model.rope.cos, fresh.rope.cos, rtol=0, atol=0)
    torch.testing.assert_close(model.rope.sin, fresh.rope.sin, rtol=0, atol=0)
    assert torch.isfinite(model(tokens())).all()


def test_qk_norm_runs_and_changes_the_output():
    plain, normed = built(tiny()), built(tiny(qk_norm=True))
    assert normed.layers["0"].attention.q_norm.weight.shape == (16,)
    sp, sn = plain.state_dict(), normed.state_dict()
    assert all(torch.equal(sp[k], sn[k]) for k in sp)  # same seed: same shared weights
    idx = tokens()
    out = normed(idx)
    assert torch.isfinite(out).all() and not torch.allclose(out, plain(idx), atol=1e-4)


def test_blocks_are_a_moduledict_with_string_keys():
    model = build_model(tiny(n_layer=3))
    assert isinstance(model.layers, torch.nn.ModuleDict) and list(model.layers) == ["0", "1", "2"]
    names = {n for n, _ in model.named_parameters()}
    for n in ["tok_embeddings.weight", "layers.2.attention.wq.weight", "layers.0.attention.wk.weight",
              "layers.0.attention.wv.weight", "layers.0.attention.wo.weight", "layers.1.attention_norm.weight",
              "layers.1.ffn_norm.weight", "layers.0.feed_forward.w1.weight", "layers.0.feed_forward.w2.weight",
              "layers.0.feed_forward.w3.weight", "norm.weight", "output.weight"]:
        assert n in names, n
    assert not any(n.endswith(".bias") for n in names)  # llama: no biases anywhere


# ---- config -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,match", [
    (dict(d_model=60, n_head=8), "not divisible by n_head"),
    (dict(n_head=4, n_kv_head=3), "not divisible by n_kv_head"),
    (dict(d_model=60, n_head=4), "head_dim .* is odd"),
    (dict(n_layer=0), "n_layer must be a positive integer"),
    (dict(vocab_size=-5), "vocab_size"),
    (dict(d_model=64.0), "d_model"),
    (dict(arch="lama"), "Did you mean: llama"),
    (dict(arch="gpt2", n_kv_head=2), "full multi-head"),
    (dict(arch="gpt2", qk_norm=True), "QK-norm"),
    (dict(rope_theta=0), "rope_theta"),
    (dict(qk_norm="yes"), "qk_norm"),
])
def test_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        tiny(**kw)


def test_odd_head_dim_is_fine_without_rotary():
    assert tiny("gpt2", d_model=60, n_head=4).head_dim == 15


def test_from_depth():
    cfg = ModelConfig.from_depth(12, vocab_size=50304)
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.d_ff) == (12, 768, 12, 12, 2048)
    assert cfg.tie_embeddings is False and cfg.max_seq_len == 2048
    g = ModelConfig.from_depth(12, vocab_size=50304, arch="gpt2", max_seq_len=1024)
    assert (g.d_ff, g.tie_embeddings, g.max_seq_len) == (3072, True, 1024)
    o = ModelConfig.from_depth(6, vocab_size=V, n_kv_head=2, qk_norm=True, d_model=512)
    assert (o.d_model, o.n_head, o.n_kv_head, o.qk_norm, o.d_ff) == (512, 8, 2, True, 1408)
    wide = ModelConfig.from_depth(5, vocab_size=V, head_dim=128)  # 320 rounds up to 3 heads of 128
    assert (wide.d_model, wide.n_head) == (384, 3)
    with pytest.raises(ConfigError, match=r"'n_kv_heads'.*Did you mean: n_kv_head"):
        ModelConfig.from_depth(4, vocab_size=V, n_kv_heads=2)
    with pytest.raises(ConfigError, match="depth"):
        ModelConfig.from_depth(0, vocab_size=V)


def test_to_dict_from_dict_round_trip():
    cfg = ModelConfig.from_depth(4, vocab_size=V, n_kv_head=2, qk_norm=True, rope_theta=5e5)
    d = cfg.to_dict()
    assert d["d_ff"] == cfg.d_ff and d["tie_embeddings"] is False  # derived values are written out
    assert ModelConfig.from_dict(d) == cfg
    import json

    assert ModelConfig.from_dict(json.loads(json.dumps(d))) == cfg
    with pytest.raises(ConfigError, match=r"unknown key.*'d_modle'.*Did you mean: d_model"):
        ModelConfig.from_dict({**d, "d_modle": 3})
    with pytest.raises(ConfigError, match="missing required key"):
        ModelConfig.from_dict({k: v for k, v in d.items() if k != "vocab_size"})


def test_config_and_flops_import_without_torch():
    code = ("import sys; import muse.model; from muse.model.config import ModelConfig; "
            "from muse.model.flops import count_params; "
            "count_params(ModelConfig.from_depth(2, 100)); assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- against Hugging Face's implementations (skipped without transformers) ---------------------------

def _from_hf_llama(hf_state: dict, cfg: ModelConfig) -> dict:
    rename = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
              "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
              "self_attn.q_norm": "attention.q_norm", "self_attn.k_norm": "attention.k_norm",
              "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
              "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
              "post_attention_layernorm": "ffn_norm"}
    out = {}
    for name, t in hf_state.items():
        name = name.replace("model.embed_tokens", "tok_embeddings").replace("model.norm", "norm")
        name = name.replace("model.layers", "layers").replace("lm_head", "output")
        for a, b in rename.items():
            name = name.replace(a, b)
        if name == "output.weight" and cfg.tie_embeddings:
            continue
        out[name] = t
    return out


@pytest.mark.parametrize("hf_arch", ["llama", "qwen3"])
def test_matches_hf_llama_and_qwen3(hf_arch):
    transformers = pytest.importorskip("transformers")
    qk = hf_arch == "qwen3"
    cfg = tiny(n_kv_head=2, qk_norm=qk, tie_embeddings=qk, rope_theta=1e4 if qk else 5e5)
    common = dict(vocab_size=V, hidden_size=64, intermediate_size=cfg.d_ff, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                  rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
                  attention_bias=False)
    torch.manual_seed(0)
    if qk:
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=16, **common))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(mlp_bias=False, **common))
    hf.eval()
    with torch.no_grad():  # non-trivial norm weights, so a misplaced norm cannot hide
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    model = build_model(cfg).eval()
    model.load_state_dict(_from_hf_llama(hf.state_dict(), cfg), strict=True)
    idx = tokens(2, 20)
    torch.testing.assert_close(model(idx), hf(idx).logits.float(), atol=1e-4, rtol=1e-4)


def test_gpt2_matches_hf_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=64,
                                                              n_layer=2, n_head=4, bos_token_id=0,
                                                              eos_token_id=0)).eval()
    cfg = tiny("gpt2")
    model = build_model(cfg).eval()
    state = {"tok_embeddings.weight": hf.transformer.wte.weight, "pos_embeddings.weight": hf.transformer.wpe.weight,
             "norm.weight": hf.transformer.ln_f.weight, "norm.bias": hf.transformer.ln_f.bias}
    for i, h in enumerate(hf.transformer.h):
        p = f"layers.{i}."
        # HF GPT-2 stores Conv1D weights as (in, out) and fuses q, k, v into c_attn
        for j, w in enumerate(("wq", "wk", "wv")):
            state[p + f"attention.{w}.weight"] = h.attn.c_attn.weight[:, 64 * j:64 * (j + 1)].t()
            state[p + f"attention.{w}.bias"] = h.attn.c_attn.bias[64 * j:64 * (j + 1)]
        for mine, conv in (("attention.wo", h.attn.c_proj), ("feed_forward.w1", h.mlp.c_fc),
                           ("feed_forward.w2", h.mlp.c_proj)):
            state[p + mine + ".weight"], state[p + mine + ".bias"] = conv.weight.t(), conv.bias
        for mine, ln in (("attention_norm", h.ln_1), ("ffn_norm", h.ln_2)):
            state[p + mine + ".weight"], state[p + mine + ".bias"] = ln.weight, ln.bias
    model.load_state_dict(state, strict=True)
    idx = tokens(2, 20)
    torch.testing.assert_close(model(idx), hf(idx).logits.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model(idx, idx), F.cross_entropy(hf(idx).logits.flatten(0, 1), idx.flatten()),
                               atol=1e-5, rtol=1e-5)


# ---- fused projections --------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(VARIANTS))
def test_fused_projections_equal_separate_matmuls(name, monkeypatch):
    """q/k/v and gate/up as one matmul each (forced on in fp32 here; the model fuses under autocast) give
    the logits and gradients of the separate nn.Linears, the slow reference, to 1e-6: GQA + QK-norm +
    tied, and GPT-2 with biases."""
    from muse.model import layers

    cfg = tiny(**VARIANTS[name])
    idx, targets = tokens(), tokens(seed=2)
    runs = []
    for fuse in (True, False):
        calls = []
        monkeypatch.setattr(layers, "_fuse_projections", lambda x, linears, fuse=fuse, calls=calls: calls.append(1) or fuse)
        model = built(cfg).train()
        loss = model(idx, targets)
        loss.backward()
        runs.append((model(idx).detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        per_block = 1 if name == "gpt2" else 2  # attention's q/k/v, SwiGLU's gate/up
        assert len(calls) == 2 * cfg.n_layer * per_block
    (fused, fused_grads), (ref, ref_grads) = runs
    torch.testing.assert_close(fused, ref, rtol=0, atol=1e-6)
    assert fused_grads.keys() == ref_grads.keys()
    for n in ref_grads:
        torch.testing.assert_close(fused_grads[n], ref_grads[n], rtol=1e-5, atol=1e-6, msg=n)


def test_fused_linear_equals_each_linear():
    from torch import nn

    from muse.model.layers import fused_linear

    torch.manual_seed(0)
    for bias in (False, True):
        linears = (nn.Linear(16, 8, bias=bias), nn.Linear(16, 4, bias=bias), nn.Linear(16, 4, bias=bias))
        x = torch.randn(2, 3, 16)
        for got, m in zip(fused_linear(x, linears), linears):
            torch.testing.assert_close(got, m(x), rtol=0, atol=1e-6)


def test_projections_fuse_only_when_training_under_autocast_with_plain_weights():
    """Fused where it measured faster: autograd on and autocast on. Not in fp32, not without autograd
    (the engine's decode steps: the cat would copy more than the matmuls read), and not for tensor
    parallelism's DTensor shards, whose nn.Linear forward carries TP's hooks (they see every call)."""
    from torch import nn

    from muse.model.layers import project

    class Shard(torch.Tensor):  # stands in for DTensor: any tensor subclass
        pass

    torch.manual_seed(0)
    a, b = nn.Linear(8, 6, bias=True), nn.Linear(8, 4, bias=True)
    x = torch.randn(3, 5, 8)
    calls = []
    for m in (a, b):
        m.register_forward_hook(lambda mod, inp, out: calls.append(mod))

    def modules_called(autocast: bool, grad: bool) -> bool:
        calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), torch.set_grad_enabled(grad):
            outs = project(x, (a, b))
        assert [t.shape for t in outs] == [(3, 5, 6), (3, 5, 4)]
        return calls == [a, b]

    assert not modules_called(autocast=True, grad=True)  # one F.linear over the concatenated weights
    assert modules_called(autocast=False, grad=True)
    assert modules_called(autocast=True, grad=False)
    b.weight = nn.Parameter(b.weight.detach().as_subclass(Shard))
    assert modules_called(autocast=True, grad=True)


def test_fused_training_step_under_bf16_autocast_matches_separate(monkeypatch):
    """Under bf16 autocast (where the model fuses) the loss and gradients stay those of the separate
    matmuls up to bf16 rounding."""
    from muse.model import layers

    cfg = tiny(n_kv_head=2, qk_norm=True)
    idx, targets = tokens(), tokens(seed=2)
    out = []
    for fuse in (None, False):
        if fuse is not None:
            monkeypatch.setattr(layers, "_fuse_projections", lambda x, linears: False)
        model = built(cfg).train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(idx, targets)
        loss.backward()
        out.append((loss.detach(), model.layers["0"].attention.wk.weight.grad.clone()))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=5e-2, atol=5e-3)


def test_fused_projections_keep_separate_parameters():
    """Muon orthogonalises wq, wk, wv, w1 and w3 each on its own, and checkpoints name them: the fusion
    adds no parameter and renames none, so a state_dict of separate weights loads strictly."""
    cfg = tiny(n_kv_head=2)
    src = built(cfg, seed=3)
    names = set(dict(src.named_parameters()))
    for w in ("wq", "wk", "wv", "wo"):
        assert f"layers.0.attention.{w}.weight" in names
    for w in ("w1", "w2", "w3"):
        assert f"layers.1.feed_forward.{w}.weight" in names
    assert not any("qkv" in n or "fused" in n for n in names)
    dst = built(cfg, seed=4)
    dst.load_state_dict({k: v.clone() for k, v in src.state_dict().items()}, strict=True)
    torch.testing.assert_close(dst(tokens()), src(tokens()), rtol=0, atol=0)


# ---- RMSNorm through F.rms_norm, the chunked cross-entropy -------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_the_written_out_reference(dtype):
    """RMSNorm calls F.rms_norm; the hand-written norm is the reference: the same values and gradients
    (bit-identical in fp32 on torch 2.13's CPU; 1e-6 allowed for other builds), bf16 inputs reduced in fp32."""
    from muse.model.layers import RMSNorm, rms_norm_reference

    torch.manual_seed(0)
    norm = RMSNorm(64, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 7, 64, dtype=dtype, requires_grad=True)
    g = torch.randn(3, 7, 64)
    outs = []
    for f in (norm, lambda t: rms_norm_reference(t, norm.weight, norm.eps)):
        y = f(x)
        outs.append((y, *torch.autograd.grad(y, (x, norm.weight), g.to(y.dtype))))
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for got, ref in zip(outs[0], outs[1]):
        assert got.dtype == ref.dtype
        torch.testing.assert_close(got, ref, **tol)


def _plain_ce(h, w, t, reduction):
    return F.cross_entropy(F.linear(h, w).float(), t, ignore_index=-1, reduction=reduction)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_cross_entropy_equals_the_plain_loss_and_gradients(reduction, chunk):
    """Chunks that divide the rows or not, one chunk for everything, ignored targets: loss and both
    gradients equal the plain F.cross_entropy over the full logits at 1e-5 (fp32)."""
    from muse.model.layers import chunked_cross_entropy

    torch.manual_seed(0)
    h = torch.randn(45, 32, requires_grad=True)
    w = (torch.randn(V, 32) * 0.3).requires_grad_()
    t = torch.randint(0, V, (45,))
    t[::5] = -1
    got = chunked_cross_entropy(h, w, t, chunk, reduction)
    ref = _plain_ce(h, w, t, reduction)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    g_got = torch.autograd.grad(got * 3.0, (h, w))  # a scale, as the loop's 1/units
    g_ref = torch.autograd.grad(ref * 3.0, (h, w))
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert chunked_cross_entropy(h, w, torch.full_like(t, -1), chunk, "mean").isnan()  # 0 / 0, as plain
    with pytest.raises(ValueError, match="'sum' or 'mean'"):
        chunked_cross_entropy(h, w, t, chunk, "none")
    with torch.no_grad():  # evaluation: the value alone, no gradient work
        torch.testing.assert_close(chunked_cross_entropy(h, w, t, chunk, reduction), ref.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_model_with_chunked_loss_equals_the_plain_loss(name):
    """Through the model (untied and tied heads, GPT-2): every parameter's gradient matches the plain
    loss's at 1e-5 (GPT-2's bias gradients, sums over every token of size ~10, differ by ~3e-7 relative); "none" keeps the plain path; without autograd (evaluation) the value is the same."""
    cfg = tiny(**VARIANTS[name])
    idx, targets = tokens(), tokens(seed=2)
    targets[0, :3] = -1
    runs = []
    for chunk in (0, 5):
        model = built(cfg).train()
        model.loss_chunk = chunk
        loss = model(idx, targets, reduction="sum")
        loss.backward()
        with torch.no_grad():
            evaluated = model(idx, targets)
        runs.append((loss.detach(), evaluated, model(idx, targets, reduction="none").detach(),
                     {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss, ev, none, grads), (ref_loss, ref_ev, ref_none, ref_grads) = runs
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ev, ref_ev, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(none, ref_none, rtol=0, atol=0)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-5, msg=n)


def test_chunked_loss_under_bf16_autocast_matches_the_plain_one():
    """Under autocast the chunks' matmuls run in bf16 (as the plain head's F.linear does), the softmax in
    fp32: loss and gradients agree with the plain path up to bf16 rounding, and come back in fp32."""
    cfg = tiny(n_kv_head=2)
    idx, targets = tokens(), tokens(seed=2)
    out = []
    for chunk in (0, 8):
        model = built(cfg).train()
        model.loss_chunk = chunk
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(idx, targets, reduction="sum")
        loss.backward()
        assert loss.dtype == torch.float32 and model.output.weight.grad.dtype == torch.float32
        out.append((loss.detach(), model.output.weight.grad.clone(), model.tok_embeddings.weight.grad.clone()))
    for got, ref in zip(out[1], out[0]):
        torch.testing.assert_close(got, ref, rtol=2e-2, atol=5e-3)

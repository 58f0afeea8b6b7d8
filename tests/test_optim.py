"""Muon against a float64 reference, parameter routing, lr multipliers and exact optimizer resume."""

import io

import pytest
import torch
from torch import nn

from muse.common.errors import CheckpointError, ConfigError
from muse.train.muon import Muon, zeropower_via_newtonschulz5
from muse.train.optim import OptimConfig, build_optimizer, classify_params, lr_for_width

V, D = 50, 16


class Gain(nn.Module):
    """RMSNorm-like: one 1-D gain vector."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attention_norm = Gain(d)
        self.wq = nn.Linear(d, d, bias=False)  # square
        self.w1 = nn.Linear(d, 3 * d, bias=False)  # weight (3d, d): tall
        self.w2 = nn.Linear(3 * d, d, bias=False)  # weight (d, 3d): wide

    def forward(self, x):
        h = self.attention_norm(x)
        return x + self.wq(h) + self.w2(torch.relu(self.w1(h)))


class Tiny(nn.Module):
    def __init__(self, n_layers=2, tie=False, layernorm=False):
        super().__init__()
        self.tok_embeddings = nn.Embedding(V, D)
        self.layers = nn.ModuleList(Block(D) for _ in range(n_layers))
        self.norm = nn.LayerNorm(D) if layernorm else Gain(D)  # LayerNorm: a weight and a bias
        self.output = nn.Linear(D, V, bias=False)
        if tie:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, idx):
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x)
        return self.output(self.norm(x))


def names_of(groups):
    return {cls: sorted(n for n, _ in members) for cls, members in groups.items()}


# ---------------------------------------------------------------- Newton-Schulz


def _with_spectrum(rows, cols, s, gen):
    U, _ = torch.linalg.qr(torch.randn(rows, len(s), generator=gen, dtype=torch.float64))
    Vm, _ = torch.linalg.qr(torch.randn(cols, len(s), generator=gen, dtype=torch.float64))
    return U @ torch.diag(s) @ Vm.T, U, Vm


@pytest.mark.parametrize("shape", [(24, 64), (64, 24), (40, 40)])
def test_newton_schulz_keeps_singular_vectors_and_pushes_values_near_one(shape):
    # The documented property: singular values >= ~1.5e-3 of ||G||_F end in [0.68, 1.21] after 5 steps,
    # with the singular vectors unchanged. Spectrum spans two decades (smallest / ||G||_F ~ 5e-3).
    gen = torch.Generator().manual_seed(0)
    k = min(shape)
    s = torch.logspace(0, -2, k, dtype=torch.float64)
    G, U, Vm = _with_spectrum(*shape, s, gen)
    X = zeropower_via_newtonschulz5(G.float(), 5, torch.float32).double()
    core = U.T @ X @ Vm  # diagonal if X = U diag(s') V^T
    sv = torch.diagonal(core)
    assert torch.allclose(core, torch.diag(sv), atol=1e-4)
    assert sv.min() > 0.68 - 1e-3 and sv.max() < 1.21 + 1e-3
    # ...and deliberately not exactly 1: the quintic trades exactness for speed.
    assert sv.max() - sv.min() > 0.1


@pytest.mark.parametrize("shape", [(32, 96), (96, 32)])
def test_newton_schulz_on_random_rectangular_matrices(shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    sv = torch.linalg.svdvals(zeropower_via_newtonschulz5(G, 5, torch.float32))
    assert sv.min() > 0.5 and sv.max() < 1.5
    assert zeropower_via_newtonschulz5(G, 5, torch.float32).shape == G.shape


def test_newton_schulz_bf16_close_to_fp32_and_zero_stays_zero():
    G = torch.randn(48, 80, generator=torch.Generator().manual_seed(2))
    fp32 = zeropower_via_newtonschulz5(G, 5, torch.float32)
    bf16 = zeropower_via_newtonschulz5(G, 5)  # default dtype: bfloat16
    assert bf16.dtype == torch.bfloat16
    # bf16 Newton-Schulz is ~3% off fp32 in Frobenius norm (measured over seeds and shapes: 2.4-3.5%);
    # the recipe accepts that for an update direction.
    assert 1e-3 < (bf16.float() - fp32).norm() / fp32.norm() < 6e-2
    Z = zeropower_via_newtonschulz5(torch.zeros(8, 4), 5, torch.float32)
    assert torch.equal(Z, torch.zeros(8, 4))


def test_newton_schulz_any_leading_dims_equal_one_batch():
    # 2-D, 3-D and 4-D inputs go through the same (k, r, c) batched iteration
    G = torch.randn(2, 3, 40, 24, generator=torch.Generator().manual_seed(6))
    batched = zeropower_via_newtonschulz5(G.reshape(6, 40, 24), 5, torch.float32).reshape(G.shape)
    assert torch.equal(zeropower_via_newtonschulz5(G, 5, torch.float32), batched)
    torch.testing.assert_close(zeropower_via_newtonschulz5(G[1, 2], 5, torch.float32), batched[1, 2])


@pytest.mark.parametrize("fast", [True, False])
def test_auto_newton_schulz_dtype_on_cpu_follows_native_bf16(monkeypatch, fast):
    from muse.train import muon

    monkeypatch.setattr(muon, "cpu_has_native_bf16", lambda: fast)
    cpu, big = torch.device("cpu"), (muon.CPU_BF16_MIN_DIM, muon.CPU_BF16_MIN_DIM + 32)
    assert muon._ns_dtype("auto", cpu, big) == (torch.bfloat16 if fast else torch.float32)
    assert muon._ns_dtype("auto", cpu, (muon.CPU_BF16_MIN_DIM - 1, 512)) == torch.float32  # small: fp32 is faster
    assert muon._ns_dtype("float32", cpu, big) == torch.float32  # explicit choices are kept
    assert muon._ns_dtype("bfloat16", cpu, (8, 8)) == torch.bfloat16
    assert muon._ns_dtype("auto", torch.device("cuda"), (8, 8)) == torch.bfloat16
    # ... and the step really runs the iteration in that dtype: a bf16-sized error or an fp32-sized one
    gen = torch.Generator().manual_seed(7)
    init, grad = torch.randn(*big, generator=gen), torch.randn(*big, generator=gen)
    p = nn.Parameter(init.clone())
    p.grad = grad.clone()
    Muon([p], lr=0.1).step()
    (expected,) = reference_muon([init], [[grad]], lr=0.1, momentum=0.95, wd=0.0)
    delta, ref_delta = p.detach().double() - init.double(), expected - init.double()
    err = ((delta - ref_delta).norm() / ref_delta.norm()).item()
    assert (1e-3 < err < 6e-2) if fast else err < 1e-4


def test_cpu_has_native_bf16_is_a_plain_answer():
    from muse.common.device import cpu_has_native_bf16

    assert cpu_has_native_bf16() in (True, False)


# ---------------------------------------------------------------- Muon step vs reference


def reference_muon(params, grads_per_step, lr, momentum, wd, nesterov=True, steps=5):
    """Plain float64 Muon: classic momentum sum, NS5 written out without the transpose trick."""
    a, b, c = 3.4445, -4.7750, 2.0315
    params = [p.double().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for i, (p, g) in enumerate(zip(params, grads)):
            g = g.double()
            bufs[i] = momentum * bufs[i] + g
            m = g + momentum * bufs[i] if nesterov else bufs[i]
            m = m.reshape(m.shape[0], -1)
            X = m / m.norm()
            for _ in range(steps):
                XXt = X @ X.T
                X = a * X + b * XXt @ X + c * XXt @ XXt @ X
            scale = max(1.0, m.shape[0] / m.shape[1]) ** 0.5
            params[i] = p * (1 - lr * wd) - lr * scale * X.reshape(p.shape)
    return params


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_matches_reference(nesterov):
    gen = torch.Generator().manual_seed(3)
    # tall, wide, square, conv-like (flattened); repeated shapes share one batched iteration, and the
    # (8, 24) matrix shares its batch with the flattened (8, 4, 6) one
    shapes = [(48, 16), (16, 48), (32, 32), (8, 4, 6), (48, 16), (8, 24), (48, 16)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(4)]
    params = [nn.Parameter(t.clone()) for t in init]
    opt = Muon(params, lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=0.1, ns_dtype="float32")
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    expected = reference_muon(init, grads, lr=0.05, momentum=0.9, wd=0.1, nesterov=nesterov)
    for p, e, g in zip(params, expected, grads[-1]):
        torch.testing.assert_close(p.detach().double(), e, atol=2e-6, rtol=0)
        assert p.grad is not None and torch.equal(p.grad, g)  # the gradient is not modified in place


def test_muon_bf16_newton_schulz_close_to_reference():
    gen = torch.Generator().manual_seed(4)
    init = torch.randn(24, 40, generator=gen)
    grad = torch.randn(24, 40, generator=gen)
    p = nn.Parameter(init.clone())
    p.grad = grad.clone()
    Muon([p], lr=0.1, ns_dtype="bfloat16").step()
    (expected,) = reference_muon([init], [[grad]], lr=0.1, momentum=0.95, wd=0.0)
    delta, ref_delta = p.detach().double() - init.double(), expected - init.double()
    assert 1e-3 < (delta - ref_delta).norm() / ref_delta.norm() < 6e-2  # bf16-sized, see above


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_muon_on_cuda_uses_bf16_and_matches_reference():
    gen = torch.Generator().manual_seed(5)
    init = torch.randn(64, 192, generator=gen)
    grad = torch.randn(64, 192, generator=gen)
    p = nn.Parameter(init.clone().cuda())
    p.grad = grad.cuda()
    Muon([p], lr=0.1).step()  # ns_dtype "auto": bfloat16 on CUDA
    (expected,) = reference_muon([init], [[grad]], lr=0.1, momentum=0.95, wd=0.0)
    delta, ref_delta = p.detach().cpu().double() - init.double(), expected - init.double()
    err = ((delta - ref_delta).norm() / ref_delta.norm()).item()
    assert 1e-3 < err < 6e-2  # bf16-sized error: the bf16 path really ran, and ran right


def test_muon_rejects_vectors():
    with pytest.raises(ValueError, match="AdamW"):
        Muon([nn.Parameter(torch.ones(4))])


# ---------------------------------------------------------------- routing


def test_classify_tiny_model():
    groups = names_of(classify_params(Tiny(layernorm=True)))
    assert groups["embedding"] == ["tok_embeddings.weight"]
    assert groups["head"] == ["output.weight"]
    assert groups["scalar"] == ["layers.0.attention_norm.weight", "layers.1.attention_norm.weight",
                                "norm.bias", "norm.weight"]
    assert groups["matrix"] == sorted(f"layers.{i}.{w}.weight" for i in range(2) for w in ("wq", "w1", "w2"))


def test_classify_tied_compiled_frozen_and_overrides():
    tied = names_of(classify_params(Tiny(tie=True)))
    assert tied["embedding"] == ["tok_embeddings.weight"] and tied["head"] == []
    # torch.compile's wrapper prefixes names with _orig_mod.; routing must not change
    compiled = names_of(classify_params(torch.compile(Tiny())))
    assert compiled == names_of(classify_params(Tiny()))
    frozen = Tiny()
    frozen.layers[0].wq.weight.requires_grad_(False)
    assert "layers.0.wq.weight" not in names_of(classify_params(frozen))["matrix"]

    class Custom(Tiny):  # a bare position table and a head under another name
        def __init__(self):
            super().__init__()
            self.pos_table = nn.Parameter(torch.zeros(8, D))
            self.lm_head = self.output

    plain = names_of(classify_params(Custom()))
    assert "pos_table" in plain["matrix"]  # structure alone cannot tell; the override below can
    over = names_of(classify_params(Custom(), head_names=("lm_head",), embedding_names=("pos_table",)))
    assert over["embedding"] == ["pos_table", "tok_embeddings.weight"]
    assert over["head"] == ["output.weight"]  # same tensor; reported under its first name


def test_explicit_name_typo_is_a_config_error():
    with pytest.raises(ConfigError, match="Did you mean: output"):
        classify_params(Tiny(), head_names=("outptu",))
    with pytest.raises(ConfigError, match="matches no trainable parameter"):
        build_optimizer(Tiny(), OptimConfig(embedding_names=("nope",)))


def test_build_muon_groups_and_describe():
    model = Tiny()
    opt = build_optimizer(model, OptimConfig())
    by_name = {g["name"]: g for g in opt.param_groups}
    assert list(by_name) == ["muon/matrix", "adamw/embedding", "adamw/head", "adamw/scalar"]
    assert [type(o).__name__ for o in opt.optimizers] == ["Muon", "AdamW"]
    assert by_name["muon/matrix"]["lr"] == 0.02 and by_name["adamw/embedding"]["lr"] == 0.2
    assert by_name["adamw/head"]["lr"] == 0.004 and by_name["adamw/scalar"]["lr"] == 0.04
    assert all(g["initial_lr"] == g["lr"] for g in opt.param_groups)
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups)
    # every trainable parameter exactly once
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}
    text = opt.describe()
    assert "layers.N.w1.weight" in text and "layers.0" not in text and "muon/matrix" in text


def test_adamw_mode_decays_matrices_only():
    model = Tiny(layernorm=True)
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05))
    assert len(opt.optimizers) == 1 and isinstance(opt.optimizers[0], torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert (decay["name"], decay["weight_decay"]) == ("adamw/decay", 0.05)
    assert (no_decay["name"], no_decay["weight_decay"]) == ("adamw/no_decay", 0.0)
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert decay["lr"] == no_decay["lr"] == 1e-3 and decay["betas"] == (0.9, 0.95)


def test_config_validation():
    with pytest.raises(ConfigError, match="Did you mean: muon"):
        OptimConfig(name="moun")
    with pytest.raises(ConfigError, match="matrix_lr"):
        OptimConfig(matrix_lr=0)
    with pytest.raises(ConfigError, match="adam_betas"):
        OptimConfig(adam_betas=(0.9, 1.0))


def test_lr_for_width():
    assert lr_for_width(0.2, 768) == 0.2
    assert lr_for_width(0.2, 3072) == pytest.approx(0.1)
    assert lr_for_width(0.004, 192) == pytest.approx(0.008)
    cfg = OptimConfig().for_width(3072)
    assert cfg.embedding_lr == pytest.approx(0.1) and cfg.head_lr == pytest.approx(0.002)
    assert cfg.matrix_lr == 0.02 and cfg.scalar_lr == 0.04


# ---------------------------------------------------------------- multiplier, clipping, resume


def _loss(model, gen):
    idx = torch.randint(0, V, (4, 8), generator=gen)
    logits = model(idx[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, V), idx[:, 1:].reshape(-1))


@pytest.mark.parametrize("name", ["muon", "adamw"])
def test_lr_multiplier_sets_lrs_and_zero_freezes(name):
    torch.manual_seed(0)
    model = Tiny()
    opt = build_optimizer(model, OptimConfig(name=name, matrix_weight_decay=0.1))
    opt.set_lr_multiplier(0.5)
    opt.set_lr_multiplier(0.25)  # not compounding: always relative to initial_lr
    assert all(g["lr"] == pytest.approx(g["initial_lr"] * 0.25) for g in opt.param_groups)
    opt.set_lr_multiplier(0.0)
    before = [p.detach().clone() for p in model.parameters()]
    _loss(model, torch.Generator().manual_seed(0)).backward()
    opt.step()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    opt.set_lr_multiplier(1.0)
    opt.step()
    assert not all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_set_muon_momentum():
    opt = build_optimizer(Tiny(), OptimConfig())
    opt.set_muon_momentum(0.85)
    assert [g.get("momentum") for g in opt.param_groups] == [0.85, None, None, None]


def test_clip_grad_norm():
    model = Tiny()
    opt = build_optimizer(model, OptimConfig())
    _loss(model, torch.Generator().manual_seed(0)).backward()
    expected = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
    measured = opt.clip_grad_norm_(0)  # 0: measure only
    torch.testing.assert_close(measured, expected)
    total = opt.clip_grad_norm_(expected.item() / 2)
    torch.testing.assert_close(total, expected)
    after = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
    torch.testing.assert_close(after, expected / 2, rtol=1e-4, atol=0)


def _train(model, opt, gen, steps, first):
    for s in range(first, first + steps):
        opt.set_lr_multiplier(1.0 - 0.1 * s)
        opt.set_muon_momentum(0.85 + 0.01 * s)
        _loss(model, gen).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("name", ["muon", "adamw"])
def test_state_dict_resume_is_bit_identical(name):
    cfg = OptimConfig(name=name, matrix_weight_decay=0.01)
    torch.manual_seed(0)
    a = Tiny(layernorm=True)
    opt_a = build_optimizer(a, cfg)
    gen = torch.Generator().manual_seed(1)
    _train(a, opt_a, gen, 3, first=0)
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "optim": opt_a.state_dict(), "gen": gen.get_state()}, buf)
    _train(a, opt_a, gen, 3, first=3)

    torch.manual_seed(123)  # a different init, overwritten by the checkpoint
    b = Tiny(layernorm=True)
    opt_b = build_optimizer(b, cfg)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    b.load_state_dict(saved["model"])
    opt_b.load_state_dict(saved["optim"])
    gen_b = torch.Generator()
    gen_b.set_state(saved["gen"])
    _train(b, opt_b, gen_b, 3, first=3)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n
    assert [g["lr"] for g in opt_a.param_groups] == [g["lr"] for g in opt_b.param_groups]


def test_load_state_dict_mismatch_is_a_checkpoint_error():
    muon = build_optimizer(Tiny(), OptimConfig()).state_dict()
    with pytest.raises(CheckpointError, match="resume with the optimizer settings"):
        build_optimizer(Tiny(), OptimConfig(name="adamw")).load_state_dict(muon)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        build_optimizer(Tiny(n_layers=3), OptimConfig()).load_state_dict(muon)


def test_muon_training_reduces_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = Tiny()
    opt = build_optimizer(model, OptimConfig())
    idx = torch.randint(0, V, (8, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(30):
        logits = model(idx[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, V), idx[:, 1:].reshape(-1))
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < 0.5 * losses[0], losses

"""The parts of a decoder block: norms, rotary positions, attention, MLPs.

Each module declares its parameters; their values come from the model's `init_weights()`
(transformer.py), which knows the depth-dependent scales. Names follow the
Llama reference / torchtitan (`wq wk wv wo`, `w1 w2 w3`) so a Hugging Face Llama checkpoint maps
1:1 by renaming (docs/model.md has the table). Shapes in comments: B batch, T new tokens, S tokens
attended (cache + new), H query heads, Hkv k/v heads, D head_dim, C d_model.

These modules know nothing about optimizers, devices, distribution or where the KV cache lives; they
only call `kv_cache.update(layer_idx, k, v)` (the protocol in kv_cache.py), or, when the cache has
one, `kv_cache.attend(layer_idx, q, k, v) -> y`: q (B, H, T, D) after rotary / QK-norm, k, v
(B, Hkv, T, D) of the new tokens; the cache stores k, v and returns the attention output (B, H, T, D).
The inference engine's paged cache uses it for a flattened batch of variable-length sequences.

Fused projections: in training under autocast, q/k/v run as one matmul, and so do SwiGLU's gate and up
(w1/w3), by concatenating the weights in the forward (`project`; where it runs fused is measured there). The parameters stay separate nn.Linear modules because
Muon orthogonalises each matrix on its own and the checkpoint / Hugging Face names are per matrix; the
optimizer's update, the state_dict and the golden loss curve are unchanged.

The loss over the vocabulary (`chunked_cross_entropy`, at the end): the head's matmul and the
cross-entropy in chunks of rows with their gradients computed in the forward, so no (tokens, vocab) logits
tensor is ever whole (issue #20 part 4); the model uses it when `Transformer.loss_chunk` > 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from muse.model.config import ModelConfig


class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich 2019). Normalizes in float32 and casts back before the
    weight, as HF Llama does, so bf16 activations get an fp32 reduction."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm (torch >= 2.4) is one call that a backend may fuse (inductor under --compile; a fused
        # kernel where torch ships one). In fp32 on CPU (torch 2.13) it runs the same ops as the hand-written
        # `rms_norm_reference` below and gives bit-identical outputs and gradients (tests/test_model.py).
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        return F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).type_as(x) * self.weight


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm written out (the slow reference the tests hold `RMSNorm` to)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.type_as(x) * weight


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    """RMSNorm for llama; LayerNorm with bias for gpt2 (as GPT-2)."""
    dim = cfg.d_model if dim is None else dim
    if cfg.arch == "gpt2":
        return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=True)
    return RMSNorm(dim, eps=cfg.norm_eps)


class RotaryEmbedding(nn.Module):
    """Tables of cos/sin for rotary position embeddings (Su et al. 2021, RoFormer), in the HF Llama
    "rotate_half" layout: dimension i of a head is paired with dimension i + D/2 (not 2i with 2i+1 as
    in Meta's original code), so HF q_proj/k_proj weights are used without any permutation.

    The tables are non-persistent float32 buffers: they are not in the state_dict, and a model built on
    the meta device has none, so `init_buffers()` must run after `to_empty()` (Transformer.init_weights
    calls it). Footgun: `model.to(torch.bfloat16)` casts them too; call `init_buffers()` again after.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self.register_buffer("cos", torch.empty(max_seq_len, head_dim, dtype=torch.float32), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, head_dim, dtype=torch.float32), persistent=False)
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        device = self.cos.device
        # inv_freq_i = theta^(-2i/D), i < D/2, computed exactly as HF's default rope init does.
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64).to(device, torch.float32) / self.head_dim
        inv_freq = 1.0 / (self.theta ** exponent)  # (D/2,)
        t = torch.arange(self.max_seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (max_seq_len, D/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (max_seq_len, D): the same angle for i and i + D/2
        self.cos = emb.cos()
        self.sin = emb.sin()

    def forward(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for positions start .. start+length-1, each (length, D) float32."""
        return self.cos[start:start + length], self.sin[start:start + length]

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for arbitrary positions (T,) (a flattened batch of sequences), each (T, D) float32."""
        return self.cos[positions], self.sin[positions]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by the angles in cos/sin (T, D). Done in float32: in bf16 the rotation at
    large positions loses the low bits that distinguish neighbouring tokens."""
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).type_as(x)


def _is_plain(w: torch.Tensor) -> bool:
    """True for an ordinary tensor/Parameter; False for a tensor subclass such as tensor parallelism's
    DTensor shards, whose nn.Linear forward is hooked (input/output layouts) and must not be bypassed."""
    return type(w) in (torch.Tensor, nn.Parameter)


def _fuse_projections(x: torch.Tensor, linears: tuple[nn.Linear, ...]) -> bool:
    """Whether `project` runs one matmul over concatenated weights: only while autograd records under
    autocast, with plain weights. Measured on a 2-vCPU EPYC (bench/train_cpu.py, BENCHMARKS.md section
    2): under bf16 autocast a training step is 1.04x (depth 6) and 1.06x (depth 4) faster fused, in fp32
    0.99x / 0.97x (the cat copies the weights; nothing gained), so fp32 keeps the separate matmuls.
    Without autograd (the engine's decode steps, evaluation) a cat would copy more than the matmuls
    read; DTensor shards need their modules' hooks."""
    return (torch.is_grad_enabled() and torch.is_autocast_enabled(x.device.type)
            and all(_is_plain(m.weight) for m in linears))


def fused_linear(x: torch.Tensor, linears: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, ...]:
    """(linear(x) for linear in linears) as one matmul over the concatenated weights, split after: x is
    read once and one oneDNN / cuBLAS call replaces several, in the forward and both backward matmuls."""
    biases = [m.bias for m in linears]
    bias = None if biases[0] is None else torch.cat(biases)
    out = F.linear(x, torch.cat([m.weight for m in linears]), bias)
    return out.split([m.weight.size(0) for m in linears], dim=-1)


def project(x: torch.Tensor, linears: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, ...]:
    """The projections of x by each of `linears` (q/k/v, gate/up): fused where that measured faster."""
    if _fuse_projections(x, linears):
        return fused_linear(x, linears)
    return tuple(m(x) for m in linears)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """Causal attention of T new queries (at positions start..start+T-1) over S = start + T keys.

    Three cases, each picking the cheapest correct SDPA call:
      start == 0:  the usual square causal mask (is_causal=True, flash-attention eligible);
      T == 1:      one new token sees every key, no mask at all (decode);
      otherwise:   a chunk after cached tokens needs an explicit bottom-right-aligned mask, since
                   is_causal=True aligns the triangle to the top-left when T != S.
    GQA: `enable_gqa=True` (torch >= 2.5) lets the kernel share k/v heads without copying, but with an
    explicit mask it falls back to the slow math kernel on CUDA, so there we expand k/v by hand (the
    same repeat as HF's repeat_kv: query head h uses k/v head h // (H // Hkv)).
    """
    T, S = q.size(2), k.size(2)
    n_rep = q.size(1) // k.size(1)
    if start == 0 and T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_rep > 1)
    if T == 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=n_rep > 1)
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    q_pos = torch.arange(start, start + T, device=q.device)
    mask = torch.arange(S, device=q.device)[None, :] <= q_pos[:, None]  # (T, S), True = may attend
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Attention(nn.Module):
    """Causal self-attention through F.scaled_dot_product_attention.

    llama: grouped-query (n_kv_head <= n_head), rotary on q and k, optional QK-norm (RMSNorm over each
    head's D dims, before rotary, as Qwen3/OLMo2-style QK-norm), no biases.
    gpt2: full multi-head attention with biases; positions come from the embedding, not from here.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        bias = cfg.arch == "gpt2"
        d = cfg.d_model
        self.wq = nn.Linear(d, self.n_head * self.head_dim, bias=bias)
        self.wk = nn.Linear(d, self.n_kv_head * self.head_dim, bias=bias)
        self.wv = nn.Linear(d, self.n_kv_head * self.head_dim, bias=bias)
        self.wo = nn.Linear(self.n_head * self.head_dim, d, bias=bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=cfg.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=cfg.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                kv_cache=None, start: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        # -1, not n_head: under tensor parallelism wq/wk/wv hold this rank's heads only (muse.distributed)
        q, k, v = project(x, (self.wq, self.wk, self.wv))  # (B, T, H*D), (B, T, Hkv*D) x 2
        q, k, v = (t.reshape(B, T, -1, self.head_dim) for t in (q, k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H or Hkv, T, D)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        attend = getattr(kv_cache, "attend", None)
        if attend is not None:
            # A paged cache over a flattened batch of sequences stores k, v and runs the attention
            # itself: only it knows which keys each query may see (muse.infer.paged_cache).
            y = attend(self.layer_idx, q, k, v)  # (B, H, T, D)
        else:
            if kv_cache is not None:
                k, v = kv_cache.update(self.layer_idx, k, v)  # (B, Hkv, S, D), S = start + T
                if k.dtype != q.dtype:  # a cache kept in another dtype than this step's autocast output
                    k, v = k.to(q.dtype), v.to(q.dtype)
            y = _sdpa(q, k, v, start)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, local heads * D)
        return self.wo(y)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x) (Shazeer 2020). HF names: w1 = gate_proj, w3 = up_proj, w2 = down_proj."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, (self.w1, self.w3))  # (B, T, d_ff) each
        return self.w2(F.silu(gate) * up)


class GeluMLP(nn.Module):
    """GPT-2's MLP: w2(gelu(w1 x)) with biases, GELU in its tanh approximation as GPT-2 was trained."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=True)
        self.w2 = nn.Linear(d_ff, d_model, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


def make_mlp(cfg: ModelConfig) -> nn.Module:
    return GeluMLP(cfg.d_model, cfg.d_ff) if cfg.arch == "gpt2" else SwiGLU(cfg.d_model, cfg.d_ff)


# ---- the loss over the vocabulary ----------------------------------------------------------------


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(h @ weight.T, targets), ignoring targets of -1, without ever holding
    the (N, V) logits: rows go through in chunks, and each chunk's gradients (softmax - one-hot, times
    weight for h, times h for weight) are computed right there, in the forward, while its logits are
    in cache. Backward only scales them by the incoming scalar. Same matmul FLOPs as the plain loss (no
    recomputation); memory: one (chunk, V) fp32 block instead of several (N, V) ones (logits, log-softmax,
    their gradient), plus the (N, C) and (V, C) gradients autograd would hold anyway."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows: int, compute_dtype: torch.dtype, grad_enabled: bool):
        # needs_input_grad is True under no_grad too (evaluation): the caller says whether autograd records
        want_h, want_w = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        N = h.size(0)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        with torch.autocast(h.device.type, enabled=False):  # dtypes are chosen here, explicitly
            w = weight.to(compute_dtype)
            for s in range(0, N, chunk_rows):
                hc = h[s:s + chunk_rows].to(compute_dtype)  # (n, C)
                t = targets[s:s + chunk_rows]  # (n,)
                logits = (hc @ w.T).float()  # (n, V) float32, as the plain loss
                lse = torch.logsumexp(logits, dim=-1)  # (n,)
                keep = t != -1
                safe = t.clamp_min(0)
                target_logit = logits.gather(1, safe[:, None]).squeeze(1)
                loss += torch.where(keep, lse - target_logit, 0.0).sum()
                if want_h or want_w:
                    # d(sum of losses)/d logits = softmax - one_hot(target); zero for ignored rows
                    g = logits.sub_(lse[:, None]).exp_()
                    g[torch.arange(g.size(0), device=g.device), safe] -= 1.0
                    g.mul_(keep[:, None])
                    g = g.to(compute_dtype)
                    if want_h:
                        grad_h[s:s + chunk_rows] = g @ w
                    if want_w:
                        grad_w += (g.T @ hc).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype)
        gw = None if grad_w is None else (grad_w * grad_loss).to(ctx.weight_dtype)
        return gh, gw, None, None, None, None


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int,
                          reduction: str = "sum") -> torch.Tensor:
    """cross_entropy(h @ weight.T, targets, ignore_index=-1, reduction) for h (N, C), weight (V, C),
    targets (N,), computed `chunk_rows` rows at a time (see _ChunkedLinearCrossEntropy); "sum" or "mean".
    The matmuls run in the autocast dtype when autocast is on (as the plain head's F.linear would), the
    softmax and the loss in float32. Equal to the plain loss and its gradients at 1e-5 in fp32 (tests)."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"chunked_cross_entropy reduces by 'sum' or 'mean', got {reduction!r}")
    device = h.device.type
    compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    loss = _ChunkedLinearCrossEntropy.apply(h, weight, targets, int(chunk_rows), compute, torch.is_grad_enabled())
    if reduction == "mean":  # all targets ignored -> 0 / 0 = NaN, as F.cross_entropy
        loss = loss / (targets != -1).sum()
    return loss

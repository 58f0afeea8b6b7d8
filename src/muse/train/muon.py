"""Muon: momentum whose update is orthogonalised by a Newton-Schulz iteration, for hidden weight matrices.

The public recipe (Keller Jordan, 2024, https://kellerjordan.github.io/posts/muon/, used by the
modded-nanogpt speedrun and nanochat): keep a Nesterov momentum buffer of the gradient, replace that
matrix M = U S V^T by (approximately) U V^T with five steps of a quintic Newton-Schulz iteration, scale
it by sqrt(max(1, rows/cols)) and take a step of size lr. Every singular direction of the update then
moves the weights by about the same amount, which is steepest descent under the spectral norm.

Muon is only for the >= 2-D weights inside the hidden blocks. Embeddings, the output head and every 1-D
parameter (norm gains, biases) belong to AdamW; `muse.train.optim.build_optimizer` does that split.
Parameters with more than two dimensions are flattened to (shape[0], -1) for the iteration.

Sharded parameters (DTensors from FSDP2 and/or tensor parallelism, muse.distributed) are handled the
simple, exact way: the momentum update is elementwise and runs on each rank's shard, but the iteration
needs the whole matrix, so each one is gathered (`full_tensor()`), orthogonalised on every rank, and each
rank keeps its own shard of the result (a local slice, no second collective). The cost: one all-gather
of every hidden matrix per step (the same volume FSDP's forward moves) and the iteration's FLOPs repeated
on every rank instead of split among them. That is cheap next to a training step at the scales Muse
targets; distributing whole matrices round-robin over ranks would remove the repetition.

This module does not know about models, parameter names, schedules or process groups.
"""

from __future__ import annotations

import torch

from muse.common.device import cpu_has_native_bf16

# Quintic coefficients from the recipe: chosen to push every singular value in (0, 1] towards ~1 as fast
# as possible in 5 steps (the slope at 0 is a = 3.4445), at the price of NOT converging to exactly 1.
# Iterating the scalar map x -> a x + b x^3 + c x^5 five times (checked numerically): every singular
# value of at least ~1.5e-3 * ||G||_F ends in [0.68, 1.21]; smaller ones are only amplified (by up to
# a^5 ~ 490). The recipe's measurement is that this spread trains as well as an exact U V^T.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_DTYPES = ("auto", "bfloat16", "float32")


def zeropower_via_newtonschulz5(G: torch.Tensor, steps: int = 5, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximate the orthogonal factor U V^T of G = U S V^T; G is (..., rows, cols).

    Returns a tensor of G's shape in `dtype` (default bfloat16, the recipe's choice on accelerators).
    The singular values of the result are near 1 (in [0.68, 1.21] for the directions that matter), not
    exactly 1: see NS_COEFFS.
    """
    if G.ndim < 2:
        raise ValueError(f"Newton-Schulz needs a matrix, got shape {tuple(G.shape)}")
    a, b, c = NS_COEFFS
    X = G.to(torch.bfloat16 if dtype is None else dtype)
    transposed = G.size(-2) > G.size(-1)
    if transposed:  # iterate on the wide orientation: X @ X^T is then the smaller (rows x rows) Gram matrix
        X = X.mT
    shape = X.shape
    X = X.reshape(-1, *shape[-2:])  # (k, r, c): baddbmm wants exactly one batch dimension
    # Frobenius norm >= spectral norm, so this puts every singular value in [0, 1] where the iteration
    # converges; the epsilon keeps an all-zero gradient at zero instead of NaN.
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT  # (k, r, r)
        # baddbmm folds the scale-and-add into the matmul's output pass: 1.21x faster than
        # `b * A + c * (A @ A)` and `a * X + B @ X` in fp32 on CPU, 1.05x in bf16 (bench/newton_schulz.py,
        # a width-384 model), where the elementwise passes are not hidden behind the matmuls as on a GPU.
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = torch.baddbmm(X, B, X, beta=a)  # a X + b (X X^T) X + c (X X^T)^2 X: odd in the singular values
    X = X.reshape(shape)
    if transposed:
        X = X.mT
    return X


# On CPU, bf16 pays only for matrices this large (both sides). Measured, one thread, 5 steps: at 16 x 48
# bf16 takes 4x the fp32 time (oneDNN's per-call setup), at 64 x 64 they are even, from 128 x 128 on bf16
# is 2x faster. Under load it is worse for small ones: oneDNN splits even a tiny bf16 matmul over every
# thread, and waiting for a descheduled thread made a 16 x 48 iteration take 120 ms instead of 0.4 ms.
CPU_BF16_MIN_DIM = 128


def _ns_dtype(name: str, device: torch.device, shape: tuple[int, ...] = ()) -> torch.dtype:
    if name == "auto":
        # bf16 matmuls are what the recipe runs on GPUs (fast, and precise enough for an update
        # direction). On a CPU with native bf16 matmul (AVX512-BF16 / AMX) it halves the iteration's
        # time, which is ~20% of a step of a 10M-param model at 4,096 tokens per step (BENCHMARKS.md
        # section 2); on other CPUs bf16 is emulated and slow, and small matrices are faster in fp32.
        if device.type == "cuda":
            return torch.bfloat16
        if device.type == "cpu" and min(shape, default=0) >= CPU_BF16_MIN_DIM and cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for >= 2-D hidden weight matrices.

    Per step, for each parameter W with gradient G (rows x cols after flattening trailing dims):
        buf  <- momentum * buf + (1 - momentum) * G
        M    <- (1 - momentum) * G + momentum * buf          (Nesterov; plain momentum uses buf)
        O    <- zeropower_via_newtonschulz5(M, ns_steps)
        W    <- W * (1 - lr * weight_decay) - lr * sqrt(max(1, rows / cols)) * O

    The buffer is an exponential average rather than the classic `buf = momentum * buf + G`; the two
    differ by the constant factor (1 - momentum), which the Frobenius normalisation inside the iteration
    removes, so the update is the same. The gradient itself is left untouched (no in-place lerp on .grad),
    so gradient-norm logging after the step still sees the real gradient.

    `ns_dtype`: "auto" (bfloat16 on CUDA, and on CPUs with native bf16 matmul for matrices of at least
    CPU_BF16_MIN_DIM rows and columns; float32 elsewhere), "bfloat16" or "float32". It is a string, not
    a torch.dtype, so that the param groups (saved in state_dict) stay plain data.
    """

    def __init__(
        self,
        params,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        ns_dtype: str = "auto",
    ):
        if not lr > 0:
            raise ValueError(f"Muon lr must be > 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Muon momentum must be in [0, 1), got {momentum}")
        if ns_steps < 1:
            raise ValueError(f"Muon ns_steps must be >= 1, got {ns_steps}")
        if weight_decay < 0:
            raise ValueError(f"Muon weight_decay must be >= 0, got {weight_decay}")
        if ns_dtype not in NS_DTYPES:
            raise ValueError(f"Muon ns_dtype must be one of {NS_DTYPES}, got {ns_dtype!r}")
        defaults = dict(
            lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
            weight_decay=weight_decay, ns_dtype=ns_dtype,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(
                        f"Muon is for matrices; got a parameter of shape {tuple(p.shape)}. "
                        "Give 0-D/1-D parameters (gains, biases) to AdamW."
                    )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            # Matrices of one shape share one batched iteration: a d12 model has 84 hidden matrices but
            # 3 shapes, and one-at-a-time is launch-bound on a GPU (measured on an H200, 84 matrices of
            # width 768 / 2048: 51 ms per step one at a time, 9.6 ms batched). Costs one stacked copy.
            buckets: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g)
                buf = state["momentum_buffer"]
                buf.lerp_(g, 1.0 - mu)
                m = torch.lerp(g, buf, mu) if group["nesterov"] else buf
                if _is_dtensor(m):
                    m = m.full_tensor()  # every rank gets the whole matrix (see the module docstring)
                m2d = m.reshape(m.size(0), -1)  # (rows, cols); conv-style weights flatten their fan-in
                buckets.setdefault((tuple(m2d.shape), m2d.dtype, m2d.device), []).append((p, m2d))
            for (shape, _, device), items in buckets.items():
                rows, cols = shape
                stacked = torch.stack([m2d for _, m2d in items])  # (k, rows, cols)
                dtype = _ns_dtype(group["ns_dtype"], device, shape)
                updates = zeropower_via_newtonschulz5(stacked, group["ns_steps"], dtype)
                # Orthogonal matrices have RMS entry sqrt(1/max(r, c)); this factor makes tall matrices
                # (e.g. an MLP up-projection's (4d, d) weight) move as much per entry as wide ones.
                scale = max(1.0, rows / cols) ** 0.5
                for (p, _), update in zip(items, updates.unbind(0)):
                    update = update.reshape(p.shape).to(p.dtype)
                    if _is_dtensor(p):
                        update = _shard_like(update, p)
                    if wd:
                        p.mul_(1.0 - lr * wd)
                    p.add_(update, alpha=-lr * scale)
        return loss


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"  # no torch.distributed import for the common, unsharded case


def _shard_like(full: torch.Tensor, p):
    """This rank's shard of `full` (the whole matrix, identical on every rank) laid out as DTensor `p`.

    Replicate -> Shard is a local slice in DTensor (no communication), and it follows the exact layout
    FSDP2 and TP chose, uneven and strided shards included.
    """
    from torch.distributed.tensor import DTensor, Replicate

    mesh = p.device_mesh
    whole = DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return whole.redistribute(mesh, p.placements)

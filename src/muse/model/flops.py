"""Parameter and FLOP counts, computed from a ModelConfig alone (no model built, torch-free).

Used for MFU, for scaling-law ladders (tokens = 20 * N, ...) and for the depth table in docs/model.md.
`count_params` must agree exactly with sum(p.numel()) of the built model; tests check it for both
archs, tied and untied.
"""

from __future__ import annotations

from muse.model.config import ModelConfig


def _block_params(cfg: ModelConfig) -> int:
    d, f, hd = cfg.d_model, cfg.d_ff, cfg.head_dim
    q_out, kv_out = cfg.n_head * hd, cfg.n_kv_head * hd
    if cfg.arch == "gpt2":
        attn = d * q_out + 2 * d * kv_out + q_out * d + (q_out + 2 * kv_out + d)  # weights + biases
        mlp = 2 * d * f + f + d  # w1, w2 with biases
        norms = 2 * 2 * d  # two LayerNorms, weight + bias
    else:
        attn = d * q_out + 2 * d * kv_out + q_out * d
        attn += 2 * hd if cfg.qk_norm else 0  # q_norm, k_norm weights
        mlp = 3 * d * f  # w1, w2, w3
        norms = 2 * d
    return attn + mlp + norms


def count_params(cfg: ModelConfig, non_embedding: bool = False) -> int:
    """Number of parameters of `build_model(cfg)`.

    non_embedding=False: every distinct parameter (a tied head is the embedding, counted once).
    non_embedding=True: the parameters that cost matmul FLOPs per token: everything except the input
    lookup tables (token and, for gpt2, position embeddings), but including the output head, which is
    a (V, C) matmul whether or not it is tied. This is the N of `flops_per_token`.
    """
    d, v = cfg.d_model, cfg.vocab_size
    final_norm = 2 * d if cfg.arch == "gpt2" else d
    body = cfg.n_layer * _block_params(cfg) + final_norm
    head = v * d
    if non_embedding:
        return body + head
    tables = v * d + (cfg.max_seq_len * d if cfg.arch == "gpt2" else 0)
    return tables + body + (0 if cfg.tie_embeddings else head)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) of a sequence of `seq_len` tokens:

        6 * N  +  12 * n_layer * d_model * seq_len

    N = count_params(cfg, non_embedding=True). 6N: each parameter does one multiply-add (2 FLOPs)
    per token forward and twice that backward (Kaplan et al. 2020, "Scaling Laws for Neural Language
    Models", sec. 2.1). 12 * L * C * T: attention scores QK^T and the weighted sum over values, 2
    matmuls * 2 FLOPs * C * T per layer forward, x3 with backward, with no discount for the causal
    mask (Chowdhery et al. 2022, PaLM, appendix B; nanoGPT's estimate_mfu uses the same). Norms,
    softmax and activations are left out as both sources do.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    n = count_params(cfg, non_embedding=True)
    return float(6 * n + 12 * cfg.n_layer * cfg.d_model * seq_len)

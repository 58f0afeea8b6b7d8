"""Which parameter gets which optimizer and learning rate, behind one object the trainer steps.

Two recipes (docs/optim.md gives the sources and the reasons for every default):

- `name="muon"` (nanochat / modded-nanogpt): Muon for the >= 2-D weights inside the hidden blocks;
  AdamW for the token/position embeddings, for the output head and for every 0-D/1-D parameter (norm
  gains, biases), each of the three with its own lr.
- `name="adamw"` (the GPT-2 / nanoGPT baseline): one AdamW, one lr; every >= 2-D parameter decays, the
  0-D/1-D ones do not.

Parameters are classified by structure, not by fragile names: a parameter owned by an `nn.Embedding`
(or named in `embedding_names`) is an embedding; one under a module named in `head_names` (default
"output") is the head; the rest split by ndim. Wrapper prefixes (`_orig_mod.` from torch.compile,
`module.` from DDP, activation-checkpoint wrappers) are ignored when matching names. A tied weight that is
both an embedding and the head counts as an embedding.

`MuseOptimizer` wraps the torch optimizers: one `step()`, `zero_grad()`, `param_groups` (each group
records its base lr as `initial_lr` and a `name`), `set_lr_multiplier(m)` for the schedule, and a
`state_dict()` that round-trips exactly. This module knows nothing about schedules, data or the
training loop; it does not move, wrap or shard the model, but it steps sharded (DTensor) parameters:
Muon gathers each matrix for its iteration (muon.py) and gradient clipping measures the global norm.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from muse.common.errors import CheckpointError, ConfigError, closest
from muse.train.muon import NS_DTYPES, Muon

OPTIMIZER_NAMES = ("muon", "adamw")
PARAM_CLASSES = ("matrix", "embedding", "head", "scalar")
# Module-name components that wrappers insert between the model and its parameters.
_WRAPPER_PARTS = {"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}
_DEFAULT_HEAD_NAMES = ("output",)
_STATE_FORMAT = 1
_DIGITS = re.compile(r"(?<![^.])\d+(?![^.])")  # a whole dotted component of digits: layers.12.x


@dataclass
class OptimConfig:
    """Optimizer choice and its hyperparameters. The lrs are base lrs: the schedule multiplies them.

    Embedding and head lrs here are for a width of 768 (where nanochat tuned them); use
    `cfg.for_width(d_model)` to get the lrs for another width.
    """

    name: str = "muon"
    # --- name == "muon": Muon for hidden matrices, AdamW for the rest (nanochat's defaults)
    matrix_lr: float = 0.02  # Muon
    momentum: float = 0.95  # Muon; see schedule.muon_momentum for the 0.85 -> 0.95 warmup
    momentum_warmup_steps: int = 300  # Muon momentum ramps 0.85 -> `momentum` over these steps (0: none)
    nesterov: bool = True
    ns_steps: int = 5
    ns_dtype: str = "auto"  # Newton-Schulz dtype: bf16 on CUDA and bf16-capable CPUs, else fp32 (muon.py)
    matrix_weight_decay: float = 0.0  # decoupled, Muon groups only
    embedding_lr: float = 0.2  # AdamW, token (and position) embeddings
    head_lr: float = 0.004  # AdamW, output head ("unembedding")
    scalar_lr: float = 0.04  # AdamW, norm gains and biases (modded-nanogpt: "neither sensitive nor tuned")
    adam_betas: tuple[float, float] = (0.8, 0.95)
    adam_eps: float = 1e-10
    # --- name == "adamw": one AdamW for everything (GPT-2 / nanoGPT baseline)
    lr: float = 6e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1  # >= 2-D params only
    # --- both
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off (the norm is still measured)
    head_names: tuple[str, ...] | None = None  # None: ("output",), and no error if it is absent
    embedding_names: tuple[str, ...] = ()  # extra embeddings besides nn.Embedding modules

    def __post_init__(self):
        if self.name not in OPTIMIZER_NAMES:
            raise ConfigError(
                f"unknown optimizer {self.name!r}; choose one of {', '.join(OPTIMIZER_NAMES)}."
                + closest(self.name, OPTIMIZER_NAMES)
            )
        for field in ("matrix_lr", "embedding_lr", "head_lr", "scalar_lr", "lr"):
            if not getattr(self, field) > 0:
                raise ConfigError(f"{field} must be > 0, got {getattr(self, field)}.")
        for field in ("matrix_weight_decay", "weight_decay", "grad_clip", "adam_eps", "eps"):
            if not getattr(self, field) >= 0:
                raise ConfigError(f"{field} must be >= 0, got {getattr(self, field)}.")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}.")
        if self.momentum_warmup_steps < 0:
            raise ConfigError(f"momentum_warmup_steps must be >= 0, got {self.momentum_warmup_steps}.")
        for field in ("adam_betas", "betas"):
            betas = getattr(self, field)
            if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
                raise ConfigError(f"{field} must be two numbers in [0, 1), got {betas}.")
        if self.ns_steps < 1:
            raise ConfigError(f"ns_steps must be >= 1, got {self.ns_steps}.")
        if self.ns_dtype not in NS_DTYPES:
            raise ConfigError(f"ns_dtype must be one of {', '.join(NS_DTYPES)}, got {self.ns_dtype!r}.")
        self.adam_betas = tuple(self.adam_betas)
        self.betas = tuple(self.betas)
        if self.head_names is not None:
            self.head_names = tuple(self.head_names)
        self.embedding_names = tuple(self.embedding_names)

    def for_width(self, d_model: int, ref_d_model: int = 768) -> OptimConfig:
        """A copy whose embedding and head lrs are scaled for width d_model (see `lr_for_width`).

        Muon's lr is left alone: its sqrt(rows/cols) factor already makes it width-independent. The
        scalar lr is left alone too (nanochat does the same), and so is the single lr of `adamw` mode,
        which has no width rule in its recipe.
        """
        return dataclasses.replace(
            self,
            embedding_lr=lr_for_width(self.embedding_lr, d_model, ref_d_model),
            head_lr=lr_for_width(self.head_lr, d_model, ref_d_model),
        )


def lr_for_width(base_lr: float, d_model: int, ref_d_model: int = 768) -> float:
    """base_lr * (d_model / ref_d_model) ** -0.5: nanochat's rule for its AdamW lrs, tuned at d_model 768.

    Adam's per-entry step is ~lr whatever the width, so a d-wide layer's output moves ~lr * sqrt(d); the
    1/sqrt(d) factor keeps that roughly constant when the trainer derives the width from --depth.
    """
    if d_model < 1 or ref_d_model < 1:
        raise ConfigError(f"d_model and ref_d_model must be >= 1, got {d_model} and {ref_d_model}.")
    return base_lr * (d_model / ref_d_model) ** -0.5


def _canonical(name: str, root: nn.Module) -> str:
    """A parameter name without the components that compile/DDP/checkpoint wrappers insert."""
    parts = [p for p in name.split(".") if p not in _WRAPPER_PARTS]
    if parts and parts[0] == "module" and isinstance(root, nn.parallel.DistributedDataParallel):
        parts = parts[1:]
    return ".".join(parts)


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    """True if `name` is one of `prefixes` or lies under one (whole dotted components only)."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def classify_params(
    model: nn.Module,
    head_names: tuple[str, ...] | None = None,
    embedding_names: tuple[str, ...] = (),
) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Split the trainable parameters of `model` into PARAM_CLASSES; each maps to [(name, param)].

    Names given explicitly must match something: a typo would otherwise silently send the head to Muon.
    """
    explicit_head = head_names is not None
    heads = tuple(head_names) if explicit_head else _DEFAULT_HEAD_NAMES
    embeds = tuple(embedding_names)
    rank = {"embedding": 0, "head": 1, "matrix": 2, "scalar": 2}  # a tied weight takes the lowest
    found: dict[int, tuple[str, str, nn.Parameter]] = {}  # id(param) -> (class, first name, param)
    names: list[str] = []
    for mod_name, module in model.named_modules(remove_duplicate=False):  # aliases count too
        for p_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            full = _canonical(f"{mod_name}.{p_name}" if mod_name else p_name, model)
            names.append(full)
            if isinstance(module, nn.Embedding) or _under(full, embeds):
                cls = "embedding"
            elif _under(full, heads):
                cls = "head"
            else:
                cls = "scalar" if p.ndim < 2 else "matrix"
            prev = found.get(id(p))
            if prev is None or rank[cls] < rank[prev[0]]:
                found[id(p)] = (cls, prev[1] if prev else full, p)
    for kind, wanted in (("head_names", heads if explicit_head else ()), ("embedding_names", embeds)):
        for w in wanted:
            if not any(_under(n, (w,)) for n in names):
                modules = sorted({n.rsplit(".", 1)[0] for n in names if "." in n} | set(names))
                raise ConfigError(
                    f"{kind} entry {w!r} matches no trainable parameter of the model; give a module or "
                    f"parameter name such as {names[0] if names else 'output'!r}." + closest(w, modules)
                )
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {c: [] for c in PARAM_CLASSES}
    for cls, name, p in found.values():
        groups[cls].append((name, p))
    return groups


class MuseOptimizer:
    """One or more torch optimizers behind the interface the trainer uses.

    Every group in `param_groups` carries `name` (e.g. "muon/matrix", "adamw/head"), its current `lr`
    and its base lr `initial_lr`. The underlying optimizers are in `optimizers`, in a fixed order.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer], param_names: dict[str, list[str]]):
        if not optimizers:
            raise ValueError("MuseOptimizer needs at least one optimizer (the model has no trainable params?)")
        self.optimizers = optimizers
        self.param_names = param_names  # group name -> parameter names, for describe()
        for group in self.param_groups:
            group.setdefault("initial_lr", group["lr"])

    @property
    def param_groups(self) -> list[dict]:
        # Recomputed on every access: torch's load_state_dict replaces the group dicts.
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def set_lr_multiplier(self, multiplier: float) -> None:
        """Set every group's lr to initial_lr * multiplier (the schedule's output)."""
        for group in self.param_groups:
            group["lr"] = group["initial_lr"] * multiplier

    def set_muon_momentum(self, momentum: float) -> None:
        """Set the momentum of every Muon group (see schedule.muon_momentum); no-op without Muon."""
        for opt in self.optimizers:
            if isinstance(opt, Muon):
                for group in opt.param_groups:
                    group["momentum"] = momentum

    def params(self) -> list[nn.Parameter]:
        return [p for g in self.param_groups for p in g["params"]]

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the global grad norm of all params to max_norm (0 = measure only); returns the norm.

        The norm is a tensor on the params' device, so logging it need not sync every step.
        """
        params = [p for p in self.params() if p.grad is not None]
        if not params:
            return torch.zeros(())
        max_norm = max_norm if max_norm > 0 else float("inf")
        if not any(_is_dtensor(p.grad) for p in params):
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        return _clip_sharded_grad_norm_([p.grad for p in params], max_norm)

    def state_dict(self) -> dict:
        return {
            "format": _STATE_FORMAT,
            "groups": [g["name"] for g in self.param_groups],
            "optimizers": [opt.state_dict() for opt in self.optimizers],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the state of `state_dict()`: moments, step counts, lrs and momentum, exactly."""
        mine = [g["name"] for g in self.param_groups]
        if state.get("format") != _STATE_FORMAT or state.get("groups") != mine:
            raise CheckpointError(
                f"the optimizer state in the checkpoint has groups {state.get('groups')} but this run "
                f"builds {mine}; resume with the optimizer settings the checkpoint was trained with, or "
                "load only the model weights to start a fresh optimizer."
            )
        for opt, sd in zip(self.optimizers, state["optimizers"], strict=True):
            try:
                opt.load_state_dict(sd)
            except ValueError as e:  # torch: a group holds a different number of params
                raise CheckpointError(
                    f"the optimizer state does not fit this model ({e}); resume with the model config the "
                    "checkpoint was trained with, or start a fresh optimizer."
                ) from e

    def describe(self) -> str:
        """A few lines for the log: each group's optimizer, lr, decay, size and parameter names."""
        lines = []
        for g in self.param_groups:
            numel = sum(p.numel() for p in g["params"])
            # layers.0.x, layers.1.x, ... -> layers.N.x: one line per pattern, not per layer
            patterns = sorted({_DIGITS.sub("N", n) for n in self.param_names.get(g["name"], [])})
            shown = ", ".join(patterns[:6]) + (f", ... (+{len(patterns) - 6})" if len(patterns) > 6 else "")
            lines.append(
                f"{g['name']:<16} lr {g['initial_lr']:.3g}  wd {g.get('weight_decay', 0.0):g}  "
                f"{len(g['params'])} tensors  {numel:,} params: {shown}"
            )
        return "\n".join(lines)


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def _clip_sharded_grad_norm_(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ for gradients that are DTensors on different meshes (FSDP2 + TP: the TP'd weights
    live on the 2-D mesh, norms and embeddings on the dp mesh alone), which torch's version refuses.

    Each group of one (mesh, placements) reduces to one DTensor norm, made whole with one tiny collective
    (a shard counts once, a replica once); the groups combine as a root of summed squares. Scaling is
    local: every rank multiplies its own shards by the same coefficient. Returns the total norm (plain).
    """
    from collections import defaultdict

    groups: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for g in grads:
        groups[(g.device_mesh, tuple(g.placements)) if _is_dtensor(g) else ("local", g.device)].append(g)
    squares = []
    for key, members in groups.items():
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in members]))
        if key[0] != "local":
            norm = norm.full_tensor()
        squares.append(norm.float() ** 2)
    device = squares[0].device
    total = torch.stack([s.to(device) for s in squares]).sum().sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        local = g.to_local() if _is_dtensor(g) else g
        local.mul_(coef.to(local.device, local.dtype))
    return total


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> MuseOptimizer:
    """The optimizer of `cfg.name` for `model`'s trainable parameters (see the module docstring)."""
    groups = classify_params(model, cfg.head_names, cfg.embedding_names)
    names: dict[str, list[str]] = defaultdict(list)

    def group(name: str, members: list[tuple[str, nn.Parameter]], **hyper) -> dict:
        names[name].extend(n for n, _ in members)
        return dict(name=name, params=[p for _, p in members], **hyper)

    optimizers: list[torch.optim.Optimizer] = []
    if cfg.name == "muon":
        if groups["matrix"]:
            optimizers.append(Muon(
                [group("muon/matrix", groups["matrix"], lr=cfg.matrix_lr)],
                lr=cfg.matrix_lr, momentum=cfg.momentum, nesterov=cfg.nesterov, ns_steps=cfg.ns_steps,
                weight_decay=cfg.matrix_weight_decay, ns_dtype=cfg.ns_dtype,
            ))
        adam_groups = [
            group(f"adamw/{cls}", groups[cls], lr=lr)
            for cls, lr in (("embedding", cfg.embedding_lr), ("head", cfg.head_lr), ("scalar", cfg.scalar_lr))
            if groups[cls]
        ]
        if adam_groups:
            optimizers.append(torch.optim.AdamW(
                adam_groups, lr=cfg.scalar_lr, betas=cfg.adam_betas, eps=cfg.adam_eps, weight_decay=0.0
            ))
    else:
        every = [m for cls in PARAM_CLASSES for m in groups[cls]]
        decay = [m for m in every if m[1].ndim >= 2]
        no_decay = [m for m in every if m[1].ndim < 2]
        adam_groups = [
            g for g in (
                group("adamw/decay", decay, weight_decay=cfg.weight_decay) if decay else None,
                group("adamw/no_decay", no_decay, weight_decay=0.0) if no_decay else None,
            ) if g is not None
        ]
        if adam_groups:
            optimizers.append(torch.optim.AdamW(adam_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps))
    if not optimizers:
        raise ConfigError("the model has no trainable parameters; nothing to optimize.")
    return MuseOptimizer(optimizers, dict(names))

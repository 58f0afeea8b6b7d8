"""Preference data for reward models and DPO: JSONL pairs -> rendered rows -> padded pair batches.

    pairs = read_preference_jsonl("prefs.jsonl")                     # [Pair], checked
    data = build_preference_data(["prefs.jsonl", "more.jsonl*2"], tok, max_len=257)
    stream = MixtureStream(data.train, data.weights, batch_tokens=4096)  # muse.data.chat's stream
    x, y, n, tokens = lm_batch(stream.take().rows)    # DPO: 2n rows (chosen..., rejected...), y = reply targets
    x, last, margin, n, tokens = score_batch(rows)     # RM: 2n rows, last = index of each reply's last token

One pair per line, in either form (docs/posttrain.md, "Preference data"):

    {"prompt": "text", "chosen": "reply", "rejected": "reply"}                         # plain: one user turn
    {"messages": [{"role": ..., "content": ...}, ...], "chosen": ..., "rejected": ...}   # chat
    optional: "margin": 1.5 (the reward model's Bradley-Terry margin); other keys are ignored (kept for people)

A reply is a string or an assistant message `{"role": "assistant", "content": "..."}`: the assistant turn
that follows the prompt. Rows render through the chat renderer SFT uses (muse.tokenizer.render_prompt,
which `render_chat` extends), and the loss mask is the reply's tokens and its <|end|> only; earlier
assistant turns of a chat prompt are context, not trained on.

Choices, each with a test:
- Bad input is a DataError naming file:line: not JSON, not an object, no `prompt`/`messages`, a missing or
  non-text `chosen`/`rejected`, an unknown role, a reply whose role is not assistant, a bad margin, and a
  pair whose chosen and rejected are identical (an error, not a skip: such a pair teaches nothing, and a
  generator that writes them has a bug worth seeing). An empty file is an error too.
- Too long: a pair must fit `max_len` tokens (the model's context + 1). The prompt is cut from the LEFT
  (the opening <|endoftext|> kept), since the end of a conversation is what the reply answers; one warning
  per file counts the cut pairs. A reply that does not fit on its own is an error: cutting it would drop
  its <|end|> and train a different reply than the file holds.
- Weights: `--data FILE*W` draws FILE's pairs W times as often as an unweighted file's (W >= 0; every pair
  of an unweighted file counts once), so files are pooled by size unless told otherwise.
- Held-out split: pairs are held out by a hash of their prompt (so every pair of one prompt sits on the same
  side, and the split does not move when lines are added elsewhere): `val_fraction` of each file, at most
  `eval_pairs`, none for a file of fewer than 20 pairs.

Batches. A source's row is a pair; the mixture stream (muse.data.chat.MixtureStream) packs pairs into
micro-batches by the length it is told, here 2 x the longer reply's row, so `batch_tokens` bounds the
padded tokens of both rows of every pair. `loss_units` of a batch = its pairs.

`PairObjective` (with `PairConfig`) is what the reward model (muse.posttrain.rm) and DPO (muse.posttrain.dpo)
share on the training loop: the init checkpoint (RUN's sft, else its base), this data and its stream, the
plan, the resumable state, and the metrics of each objective's implicit rewards (train: chosen_reward,
rejected_reward, margin, accuracy with every log row; held out: the same with val_ and val_loss).

What it does not know: the models' heads or losses (rm.py, dpo.py), how the loop trains.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from muse.common.errors import ConfigError, DataError, TokenizerError
from muse.common.logging import get_logger
from muse.data.chat import MixtureStream, check_messages, collate, read_jsonl_objects
from muse.distributed.parallelize import ParallelConfig
from muse.model import ModelConfig
from muse.posttrain.start import open_start, train_seq_len
from muse.tokenizer import END_ID, PAD_ID, Tokenizer, render_prompt
from muse.train.loop import LoopConfig
from muse.train.objective import Objective, Plan

log = get_logger("muse.posttrain")

FORMAT_HINT = ('each line must be one JSON object: {"prompt": "...", "chosen": "...", "rejected": "..."} or '
               '{"messages": [{"role": "user", "content": "..."}], "chosen": ..., "rejected": ...}')


@dataclass(frozen=True)
class Pair:
    """One checked preference pair: the conversation so far and two candidate assistant replies."""

    line: int
    messages: tuple[dict, ...]  # the prompt: what comes before the reply
    chosen: str
    rejected: str
    margin: float = 0.0  # Bradley-Terry margin (reward model): chosen must beat rejected by this much


# --- reading and checking ----------------------------------------------------------------------------


def _reply(obj: Mapping, key: str, where: str) -> str:
    if key not in obj:
        raise DataError(f"{where}: missing field '{key}'; {FORMAT_HINT}")
    value = obj[key]
    if isinstance(value, Mapping):
        if value.get("role") != "assistant":
            raise DataError(f"{where}: '{key}' has role {value.get('role')!r}; a reply is the assistant's turn "
                            "(role 'assistant'), or give it as plain text")
        value = value.get("content")
    if not isinstance(value, str):
        raise DataError(f"{where}: '{key}' must be text or an assistant message, got {type(value).__name__}")
    return value


def _prompt(obj: Mapping, where: str) -> tuple[dict, ...]:
    if ("prompt" in obj) == ("messages" in obj):
        raise DataError(f"{where}: give exactly one of 'prompt' (text) or 'messages' (a conversation); {FORMAT_HINT}")
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str):
            raise DataError(f"{where}: 'prompt' must be text, got {type(obj['prompt']).__name__}")
        return ({"role": "user", "content": obj["prompt"]},)
    return tuple(check_messages(obj["messages"], where, FORMAT_HINT))


def check_pair(obj, line: int, where: str) -> Pair:
    """The Pair of one parsed JSONL row, or a DataError naming `where` (file:line) and the fault."""
    if not isinstance(obj, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}; {FORMAT_HINT}")
    messages = _prompt(obj, where)
    chosen, rejected = _reply(obj, "chosen", where), _reply(obj, "rejected", where)
    if chosen == rejected:
        raise DataError(f"{where}: 'chosen' and 'rejected' are identical, so there is nothing to prefer; "
                        "drop the line or fix the pair")
    margin = obj.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise DataError(f"{where}: 'margin' must be a finite number, got {margin!r}")
    return Pair(line, messages, chosen, rejected, float(margin))


def read_preference_jsonl(path: str | os.PathLike) -> list[Pair]:
    """Every pair of a preference JSONL file, checked; blank lines are skipped."""
    pairs = [check_pair(obj, n, f"{path}:{n}")
             for n, obj in read_jsonl_objects(path, "a preference JSONL file", FORMAT_HINT)]
    if not pairs:
        raise DataError(f"{path} holds no preference pairs (it is empty); {FORMAT_HINT}")
    return pairs


def parse_data_arg(spec: str) -> tuple[str, float | None]:
    """(path, weight) of a `--data` value: FILE or FILE*W (W a number >= 0); weight None = unweighted."""
    head, star, tail = spec.rpartition("*")
    if not star:
        return spec, None
    try:
        weight = float(tail)
    except ValueError:
        return spec, None  # a '*' in the file name itself
    if not math.isfinite(weight) or weight < 0:
        raise DataError(f"--data {spec}: the weight after '*' must be a number >= 0")
    return head, weight


# --- rendering ---------------------------------------------------------------------------------------


def render_reply(tok: Tokenizer, messages: Sequence[Mapping], reply: str,
                 max_len: int) -> tuple[np.ndarray, np.ndarray, bool] | None:
    """(ids, mask, prompt_cut) of a conversation followed by the assistant's `reply`, at most `max_len` ids;
    mask is 1 on the reply's tokens and its <|end|>. The prompt is cut from the left (keeping the opening
    <|endoftext|>) when needed; None when the reply alone does not fit.

    The ids are those of render_chat(messages + [reply]): render_prompt is its prefix (muse.tokenizer.chat)."""
    prompt = render_prompt(tok, messages)  # ... <|assistant|>
    body = tok.encode(reply) + [END_ID]
    if len(body) + 2 > max_len:  # <|endoftext|> and <|assistant|> at the least
        return None
    keep = max_len - len(body)
    cut = len(prompt) > keep
    if cut:
        prompt = prompt[:1] + prompt[len(prompt) - (keep - 1):]
    ids = np.asarray(prompt + body, dtype=np.int32)
    mask = np.zeros(len(ids), dtype=np.uint8)
    mask[len(prompt):] = 1
    return ids, mask, cut


@dataclass(frozen=True)
class PairRow:
    """A rendered pair: each reply's (ids, mask), and the margin."""

    chosen: tuple[np.ndarray, np.ndarray]
    rejected: tuple[np.ndarray, np.ndarray]
    margin: float = 0.0


class PairSource:
    """Rendered pairs of one file, in the shape muse.data.chat.MixtureStream draws from: `name`, `len`,
    `lengths` (2 x the longer row: a pair occupies two rows of a batch) and `row(i)` -> PairRow."""

    def __init__(self, name: str, rows: list[PairRow]):
        if not rows:
            raise DataError(f"source '{name}' has no preference pairs")
        self.name, self.rows = name, rows
        self.lengths = np.array([2 * max(len(r.chosen[0]), len(r.rejected[0])) for r in rows], dtype=np.int64)

    @classmethod
    def build(cls, name: str, tok: Tokenizer, pairs: Sequence[Pair], max_len: int, where: str) -> PairSource:
        rows, cut = [], 0
        for p in pairs:
            try:
                c = render_reply(tok, p.messages, p.chosen, max_len)
                r = render_reply(tok, p.messages, p.rejected, max_len)
            except TokenizerError as e:
                raise DataError(f"{where}:{p.line}: {e}") from None
            if c is None or r is None:
                raise DataError(f"{where}:{p.line}: the {'chosen' if c is None else 'rejected'} reply alone is longer "
                                f"than the context ({max_len} tokens); shorten it or train with a longer --seq-len")
            cut += c[2] or r[2]
            rows.append(PairRow(c[:2], r[:2], p.margin))
        if cut:
            log.warning("%s: %d of %d pairs are longer than %d tokens; their prompts were cut from the left",
                        where, cut, len(pairs), max_len)
        return cls(name, rows)

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, i: int) -> PairRow:
        return self.rows[i]


def split_pairs(pairs: Sequence[Pair], fraction: float, cap: int, key: str) -> tuple[list[Pair], list[Pair]]:
    """(train, val): a pair goes to val by a hash of its prompt (module docstring)."""
    if fraction <= 0 or len(pairs) < 20:
        return list(pairs), []
    train, val = [], []
    for p in pairs:
        digest = hashlib.sha256((key + json.dumps(p.messages, sort_keys=True)).encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        (val if u < fraction and len(val) < cap else train).append(p)
    return train, val


@dataclass
class PreferenceData:
    train: list[PairSource]
    weights: list[float]
    val: dict[str, PairSource]  # sources with a held-out split only

    def describe(self) -> str:
        total = sum(self.weights) or 1.0
        return ", ".join(f"{s.name} {w / total:.0%} ({len(s):,} pairs, {len(self.val[s.name]) if s.name in self.val else 0} "
                         "held out)" for s, w in zip(self.train, self.weights))

    def val_rows(self) -> list[PairRow]:
        return [r for s in self.val.values() for r in s.rows]


def build_preference_data(data: Sequence[str], tok: Tokenizer, *, max_len: int, val_fraction: float = 0.1,
                          eval_pairs: int = 256) -> PreferenceData:
    """Read, check, split and render every `--data` value (FILE or FILE*W)."""
    if not data:
        raise DataError(f"no preference data: pass --data FILE.jsonl (repeatable); {FORMAT_HINT}")
    train, weights, val, names = [], [], {}, set()
    for spec in data:
        path, weight = parse_data_arg(spec)
        name = Path(path).stem
        k = 1
        while name in names:  # names key metrics and the resume check: make them unique
            k += 1
            name = f"{Path(path).stem}_{k}"
        names.add(name)
        pairs = read_preference_jsonl(path)
        fit, held = split_pairs(pairs, val_fraction, eval_pairs, name)
        train.append(PairSource.build(name, tok, fit, max_len, path))
        weights.append(len(fit) * (1.0 if weight is None else weight))
        if held:
            val[name] = PairSource.build(name, tok, held, max_len, path)
    if sum(weights) <= 0:
        raise DataError("every --data weight is 0; give at least one file a positive weight")
    return PreferenceData(train, weights, val)


# --- batches -----------------------------------------------------------------------------------------


def _flat(rows: Sequence[PairRow]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Chosen rows first, then rejected rows, in the same order: rows i and n + i are one pair."""
    return [r.chosen for r in rows] + [r.rejected for r in rows]


def lm_batch(rows: Sequence[PairRow], device=None):
    """(x, y, pairs, tokens) for log-probabilities of the replies: x (2n, T) inputs, y (2n, T) next tokens with
    -1 off the reply and on padding (muse.data.chat.collate's layout); tokens = non-padding inputs."""
    x, y, _, tokens = collate(_flat(rows), device)
    return x, y, len(rows), tokens


def score_batch(rows: Sequence[PairRow], device=None):
    """(x, last, margin, pairs, tokens) for a scalar per reply: x (2n, T) whole rows padded with PAD_ID, last
    (2n,) the index of each row's last token (the reply's <|end|>), margin (n,) float32."""
    flat = _flat(rows)
    width = max(len(ids) for ids, _ in flat)
    x = np.full((len(flat), width), PAD_ID, dtype=np.int64)
    for i, (ids, _) in enumerate(flat):
        x[i, :len(ids)] = ids
    last = np.array([len(ids) - 1 for ids, _ in flat], dtype=np.int64)
    margin = np.array([r.margin for r in rows], dtype=np.float32)
    tensors = [torch.from_numpy(a) for a in (x, last, margin)]
    if device is not None:
        tensors = [t.to(device) for t in tensors]
    return (*tensors, len(rows), int(last.sum() + len(flat)))


def eval_chunks(rows: Sequence[PairRow], batch_tokens: int, rank: int = 0, world: int = 1) -> list[list[PairRow]]:
    """This rank's share of `rows`, sorted by length and cut into batches of at most batch_tokens padded
    tokens (both rows of each pair counted)."""
    rows = sorted(rows, key=lambda r: max(len(r.chosen[0]), len(r.rejected[0])))[rank::world]
    out, current, width = [], [], 0
    for r in rows:
        n = max(len(r.chosen[0]), len(r.rejected[0]))
        if current and 2 * (len(current) + 1) * max(width, n) > batch_tokens:
            out.append(current)
            current, width = [], 0
        current.append(r)
        width = max(width, n)
    if current:
        out.append(current)
    return out


# --- what the reward model and DPO share -------------------------------------------------------------


@dataclass
class PairConfig(LoopConfig):
    """The settings every pair objective has (RMConfig, DPOConfig extend it); TOML, flags and --set spell them
    the same."""

    init_from: str = ""  # checkpoint to start from; "" = RUN's newest sft checkpoint, else its base
    data: tuple[str, ...] = ()  # preference JSONL files, FILE or FILE*WEIGHT
    seq_len: int = 0  # longest row (prompt + reply) in tokens; 0 = the model's max_seq_len
    batch_tokens: int = 4096  # padded tokens per micro-batch, both replies of every pair counted
    micro_batches: int = 1  # micro-batches per optimizer step, over all data-parallel ranks
    max_steps: int = 200
    eval_pairs: int = 256  # held-out pairs per file, at most
    val_fraction: float = 0.1  # of each file's prompts held out


def check_pair_config(cfg: PairConfig) -> PairConfig:
    for name in ("batch_tokens", "micro_batches", "max_steps", "eval_pairs", "log_every", "keep_last"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(cfg, name)}")
    if cfg.seq_len < 0 or not 0 <= cfg.val_fraction < 1:
        raise ConfigError("seq_len must be >= 0 and val_fraction in [0, 1)")
    cfg.data = tuple(cfg.data)
    cfg.parallel = ParallelConfig(**dataclasses.asdict(cfg.parallel))
    return cfg


class PairObjective(Objective):
    """A stage that trains on preference pairs: the init checkpoint, the data, the stream, metrics of implicit
    rewards. Subclasses give `setup`, `next_batch`, `loss` and `_eval_batch`."""

    unit_name = "pairs"

    def __init__(self, cfg: PairConfig, run_dir: str | Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.init_from, self.tokenizer, self._model_cfg = open_start(cfg.init_from or self.run_dir, ("sft", "base"))
        self.seq_len = train_seq_len(cfg.seq_len, self._model_cfg)
        # Rendered here, before any process starts: a bad file fails fast, and once.
        self.data = build_preference_data(cfg.data, self.tokenizer, max_len=self.seq_len + 1,
                                          val_fraction=cfg.val_fraction, eval_pairs=cfg.eval_pairs)
        longest = max(int(s.lengths.max()) for s in self.data.train)
        if cfg.batch_tokens < longest:
            raise ConfigError(f"batch_tokens {cfg.batch_tokens} cannot hold the longest pair (2 x {longest // 2} "
                              f"tokens); raise --batch-tokens to at least {longest}")
        self.stream = MixtureStream(self.data.train, self.data.weights, batch_tokens=cfg.batch_tokens, seed=cfg.seed)
        self.pairs = 0
        self._acc: torch.Tensor | None = None  # [pairs, sum chosen reward, sum rejected reward, right] since the log
        log.info("%s data: %s", self.stage, self.data.describe())

    def model_config(self) -> ModelConfig:
        return self._model_cfg

    def plan(self, dp_size: int) -> Plan:
        return Plan.of_micro_batches(self.cfg.micro_batches, dp_size, self.cfg.max_steps)

    def _rows(self) -> list[PairRow]:
        rows = self.stream.take(self.ctx.dp_rank, self.ctx.dp_size).rows
        self.pairs += len(rows)
        return rows

    # ----- metrics: each objective's own reward of the chosen and the rejected reply
    def _record(self, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        c, r = chosen.detach().float(), rejected.detach().float()
        row = torch.stack([torch.tensor(float(len(c)), device=c.device), c.sum(), r.sum(), (c > r).float().sum()])
        self._acc = row if self._acc is None else self._acc + row

    @staticmethod
    def _named(acc: list[float], prefix: str = "") -> dict[str, float]:
        n = max(acc[0], 1.0)
        return {f"{prefix}chosen_reward": acc[1] / n, f"{prefix}rejected_reward": acc[2] / n,
                f"{prefix}margin": (acc[1] - acc[2]) / n, f"{prefix}accuracy": acc[3] / n}

    def step_metrics(self) -> dict[str, float]:
        if self._acc is None:
            return {}
        acc, self._acc = self.ctx.all_reduce_sum(self._acc), None
        return {k: round(v, 5) for k, v in self._named(acc.tolist()).items()}

    def _eval_batch(self, model: nn.Module, rows: list[PairRow]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(summed loss, chosen rewards (n,), rejected rewards (n,)) of held-out pairs."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """val_loss (per pair), val_chosen_reward, val_rejected_reward, val_margin, val_accuracy on the held-out
        pairs (nothing when no file is big enough to hold any out)."""
        rows = self.data.val_rows()
        if not rows:
            return {}
        acc = torch.zeros(5, dtype=torch.float64, device=self.ctx.device)
        for chunk in eval_chunks(rows, self.cfg.batch_tokens, self.ctx.dp_rank, self.ctx.dp_size):
            loss, c, r = self._eval_batch(model, chunk)
            acc += torch.stack([torch.tensor(float(len(c)), device=c.device), c.float().sum(), r.float().sum(),
                                (c > r).float().sum(), loss.float()]).double()
        acc = self.ctx.all_reduce_sum(acc).tolist()
        return {"val_loss": acc[4] / max(acc[0], 1.0), **self._named(acc[:4], "val_")}

    # ----- state
    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict(), "pairs": self.pairs}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])
        self.pairs = int(state["pairs"])

    def memory_hint(self) -> str:
        return (f"lower --batch-tokens (now {self.cfg.batch_tokens}; raise --micro-batches to keep the step) "
                f"or --seq-len (now {self.seq_len})")

"""SFT data mixtures: which sources, with which weights, from a TOML file, `--data` files or the default.

A mixture file lists sources; each names exactly one of `file`, `task`, `identity` or `text`:

    [[source]]
    file = "chats.jsonl"          # your conversations (chat JSONL); a path relative to this file
    weight = 3                    # share of training rows: weight / sum of weights (default 1)

    [[source]]
    task = "arithmetic_2digit"    # a built-in task's train split as conversations (muse.tasks)

    [[source]]
    identity = "me.toml"          # who the model is: a profile TOML (name, maker, about); "" = the default

    [[source]]
    text = "train"                # plain pretraining text from RUN/data (limits forgetting)
    weight = 0.5

Each source may also set `name` (metrics call it val_loss_<name>; default: the file's stem, the task's
name, "identity", "text"). Validation: a task's or identity's validation split, a file's hash-chosen
holdout (`val_fraction`, at most `eval_rows`), the text's val split.

Without a mixture file: `--data FILE ...` weighs each file by its number of conversations (one pool);
nothing at all gives DEFAULT_MIXTURE, the built-in generative tasks and identity. Either way, when RUN/data
holds pretraining shards of the same tokenizer and no `text` source is listed, `text_share` of the
training tokens (default 0.25) are plain text.

This module turns specs into muse.data.chat sources; it knows no training loop, and no model beyond
`text_val_loss` (the plays' val loss that SFT and DPO report as val_bpb).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from muse.common.errors import ConfigError, DataError, closest
from muse.common.logging import get_logger
from muse.data.chat import ConversationSource, TextSource, read_chat_jsonl, split_holdout
from muse.tokenizer import Tokenizer

log = get_logger("muse.posttrain")

KINDS = ("file", "task", "identity", "text")
KEYS = (*KINDS, "name", "weight")

# The built-in tasks that generate (multiple-choice and bpb tasks have nothing to say in a chat), weighted
# toward what a small model finds hard: arithmetic and letters take more rows than identity.
DEFAULT_MIXTURE = """\
[[source]]
task = "arithmetic_1digit"
weight = 1.5
[[source]]
task = "arithmetic_2digit"
weight = 3
[[source]]
task = "arithmetic_3digit"
weight = 1
[[source]]
task = "arithmetic_multistep"
weight = 1
[[source]]
task = "spelling"
weight = 1.5
[[source]]
task = "letter_count"
weight = 1.5
[[source]]
task = "word_sort"
weight = 1
[[source]]
identity = ""
weight = 0.5
"""


@dataclass
class SourceSpec:
    kind: str  # one of KINDS
    target: str  # the path, task name, profile path ("" = default) or split
    name: str
    weight: float | None  # None: the --data rule (its number of conversations)


@dataclass
class Mixture:
    """Built sources: train rows with their weights, and per-source validation rows (None: no val set)."""

    train: list
    weights: list[float]
    val: dict[str, ConversationSource | None]
    text_val: str | None  # the source name whose validation is the run's val shards (val_bpb), if any

    def describe(self) -> str:
        total = sum(self.weights)
        return ", ".join(f"{s.name} {w / total:.0%} ({len(s):,} rows)" for s, w in zip(self.train, self.weights))


def parse_mixture(text: str, where: str, base: Path | None = None) -> list[SourceSpec]:
    """Specs from mixture TOML text; ConfigError naming `where` and the source for anything wrong."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: not valid TOML: {e}") from None
    extra = [k for k in data if k != "source"]
    if extra:
        raise ConfigError(f"{where}: unknown key '{extra[0]}'; a mixture is a list of [[source]] tables")
    rows = data.get("source")
    if not isinstance(rows, list) or not rows:
        raise ConfigError(f"{where}: no [[source]] tables; list at least one source (docs/posttrain.md)")
    specs = []
    for i, row in enumerate(rows):
        at = f"{where}: source {i + 1}"
        for key in row:
            if key not in KEYS:
                raise ConfigError(f"{at}: unknown key '{key}'.{closest(key, KEYS) or ' Keys: ' + ', '.join(KEYS)}")
        kinds = [k for k in KINDS if k in row]
        if len(kinds) != 1:
            raise ConfigError(f"{at}: give exactly one of {', '.join(KINDS)} (got {', '.join(kinds) or 'none'})")
        kind, target = kinds[0], row[kinds[0]]
        if kind == "identity" and target is True:
            target = ""
        if not isinstance(target, str):
            raise ConfigError(f"{at}: '{kind}' must be a string")
        weight = row.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ConfigError(f"{at}: weight must be a number >= 0, got {weight!r}")
        if kind in ("file", "identity") and target and base is not None and not os.path.isabs(target):
            target = str(base / target)
        name = row.get("name") or {"file": Path(target).stem, "task": target, "identity": "identity",
                                   "text": "text"}[kind]
        specs.append(SourceSpec(kind, target, str(name), float(weight)))
    return specs


def load_mixture(path: str | os.PathLike) -> list[SourceSpec]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read mixture file {path}: {e.strerror or e}") from None
    return parse_mixture(text, str(path), base=path.parent)


def mixture_specs(mixture: str | None, data: list[str] | tuple[str, ...]) -> list[SourceSpec]:
    """The specs `muse sft` trains on: the mixture file's, then one per --data file; DEFAULT_MIXTURE if none."""
    specs = load_mixture(mixture) if mixture else []
    specs += [SourceSpec("file", f, Path(f).stem, None) for f in data]
    if not specs:
        specs = parse_mixture(DEFAULT_MIXTURE, "the default mixture")
    seen: dict[str, int] = {}
    for s in specs:  # names key metrics and the resume check: make them unique
        if s.name in seen:
            seen[s.name] += 1
            s.name = f"{s.name}_{seen[s.name]}"
        else:
            seen[s.name] = 1
    return specs


def _task_conversations(name: str, split: str, profile: str | None = None):
    import muse.tasks as tasks

    task = tasks.get("identity", profile=profile or None) if profile is not None else tasks.get(name)
    if task.kind not in ("generate", "chat"):
        raise ConfigError(f"task '{task.name}' is a {task.kind} task; SFT sources must be generate or chat tasks")
    return [(i + 1, row["messages"]) for i, row in enumerate(tasks.train_conversations(task, split))]


def build_mixture(specs: list[SourceSpec], tok: Tokenizer, *, max_len: int, data_dir: Path | None,
                  text_share: float = 0.0, eval_rows: int = 64, val_fraction: float = 0.05) -> Mixture:
    """Render every source (max_len tokens per row). `data_dir`: the run's prepared shards for `text`."""
    train, weights, val, text_val = [], [], {}, None
    for spec in specs:
        where = spec.target if spec.kind == "file" else f"{spec.kind} source '{spec.name}'"
        if spec.kind == "text":
            if data_dir is None:
                raise ConfigError(f"{where}: no prepared data (RUN/data) with this model's tokenizer to read text from")
            train.append(TextSource(spec.name, data_dir, spec.target or "train", max_len))
            val[spec.name], text_val = None, spec.name
        else:
            if spec.kind == "file":
                convs = read_chat_jsonl(spec.target)
                convs, held = split_holdout(convs, val_fraction, eval_rows, spec.name)
            else:
                profile = spec.target if spec.kind == "identity" else None
                convs = _task_conversations(spec.target, "train", profile)
                held = _task_conversations(spec.target, "validation", profile)[:eval_rows]
            try:
                source = ConversationSource.build(spec.name, tok, convs, max_len, where)
            except DataError:
                if spec.kind == "file":
                    raise  # the user's own data: say so
                # A built-in task whose every question outgrows a short context: train on the others.
                log.warning("%s: no conversation fits %d tokens; left out of the mixture", where, max_len)
                continue
            train.append(source)
            try:
                val[spec.name] = ConversationSource.build(spec.name, tok, held, max_len, where) if held else None
            except DataError:
                val[spec.name] = None
        weights.append(float(len(train[-1])) if spec.weight is None else spec.weight)
    if text_share > 0 and text_val is None and data_dir is not None:
        if not 0 < text_share < 1:
            raise ConfigError(f"text_share must be in [0, 1), got {text_share}")
        text = TextSource("text", data_dir, "train", max_len)
        # A share of tokens, not rows: a text row is a full window, several times a chat's length.
        chat_len = sum(w * float(s.lengths.mean()) for w, s in zip(weights, train)) / max(sum(weights), 1e-12)
        train.append(text)
        weights.append(sum(weights) * text_share / (1 - text_share) * chat_len / text.row_len)
        val["text"], text_val = None, "text"
    if not train:
        raise DataError(f"no source of the mixture has a conversation that fits {max_len} tokens; raise --seq-len")
    if sum(weights) <= 0:
        raise DataError("every mixture weight is 0; give at least one source a positive weight")
    return Mixture(train, weights, val, text_val)


def text_val_loss(model, data_dir: Path, seq_len: int, batch_tokens: int, eval_batches: int, ctx) -> tuple[float, int]:
    """(summed loss, targets) of this rank's share of the first `eval_batches` val-split batches of `data_dir`,
    batch_tokens // seq_len windows each: the plays' val_bpb that SFT and DPO report (sum over ranks first)."""
    from muse.data import TokenLoader

    loader = TokenLoader(data_dir, "val", max(1, batch_tokens // seq_len), seq_len, rank=ctx.dp_rank,
                         world_size=ctx.dp_size, device=ctx.device)
    total, n = 0.0, 0
    for x, y in loader.eval_batches(eval_batches):
        total += float(model(x, y, reduction="sum"))
        n += int(y.numel())
    return total, n


def matching_data_dir(run_dir: Path, tok: Tokenizer) -> Path | None:
    """RUN/data when it holds shards made with `tok` (the text share reads them), else None."""
    data = run_dir / "data"
    if not (data / "meta.json").is_file() or not (data / "tokenizer.json").is_file():
        return None
    try:
        same = Tokenizer.from_file(data / "tokenizer.json").to_str() == tok.to_str()
    except Exception:  # noqa: BLE001 - an unreadable tokenizer just means no text share
        same = False
    if not same:
        log.warning("%s was prepared with another tokenizer than the model's; no plain-text share", data)
        return None
    return data

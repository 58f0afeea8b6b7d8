"""`Tokenizer`: a trained byte-level BPE (HF `tokenizers`) with Muse's fixed special tokens.

It turns text into token ids and back, and knows each token's raw bytes. The guarantees it keeps:

- `decode(encode(s)) == s` for every string of Unicode scalar values: there is no normalizer, and the
  byte-level alphabet covers all 256 byte values, so nothing is lost or unknown.
- `encode` never produces a special id, even for text that spells one ("<|user|>"): users cannot
  inject chat structure through content. Specials enter a sequence only by id (see chat.py).
- The file on disk is a standard tokenizer.json that `tokenizers.Tokenizer.from_file` and transformers'
  `PreTrainedTokenizerFast(tokenizer_file=...)` load. (Those parse specials in text, as HF chat
  templates need; the "never" above is a runtime setting of this class, not part of the file.)

It does not know how it was trained (bpe.py), how chats are laid out (chat.py), or about shards, models
or torch. The underlying `tokenizers.Tokenizer` is available as `.hf` for code that needs it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from muse.common.errors import TokenizerError
from muse.common.paths import atomic_write_text
from muse.tokenizer.special import END_ID, EOT_ID, PAD_ID, SPECIAL_IDS

TOKENIZER_FILENAME = "tokenizer.json"


def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character map of byte-level BPE (GPT-2's, which HF's ByteLevel uses).

    BPE in `tokenizers` works on strings, so each byte is stood in for by one visible character:
    printable Latin-1 bytes map to themselves, the rest (controls, space, 0x7F-0xA0, 0xAD) to
    consecutive characters from U+0100 on. That is why a leading space shows up as 'Ġ' (U+0120).
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def _resolve_file(path: str | os.PathLike) -> Path:
    """A tokenizer path may name the file or the directory holding tokenizer.json (a run's data/)."""
    path = Path(path)
    return path / TOKENIZER_FILENAME if path.is_dir() else path


def _layout_problem(spec: dict) -> str | None:
    """Why a parsed tokenizer.json is not a Muse tokenizer, or None if it is one."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return f"its model is {model.get('type')!r}, not BPE"
    if spec.get("normalizer") is not None:
        return "it has a normalizer, which would break the exact round trip decode(encode(s)) == s"
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        return "its decoder is not ByteLevel (it is not a byte-level BPE)"
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if not any(p.get("type") == "ByteLevel" for p in parts):
        return "its pre-tokenizer has no ByteLevel step (it is not a byte-level BPE)"
    added = {t.get("content"): t for t in spec.get("added_tokens") or []}
    for token, want in SPECIAL_IDS.items():
        entry = added.get(token)
        if entry is None or entry.get("id") != want or not entry.get("special"):
            got = "missing" if entry is None else f"at id {entry.get('id')}"
            return f"special token {token} must be at id {want} (got: {got})"
    vocab = model.get("vocab") or {}
    missing = [b for b, ch in bytes_to_unicode().items() if ch not in vocab]
    if missing:
        return f"{len(missing)} of the 256 byte tokens are missing (e.g. byte 0x{missing[0]:02x})"
    return None


class Tokenizer:
    """Muse's tokenizer. Build one with `train_bpe`, `Tokenizer.from_file` or `Tokenizer.from_str`.

    Thread-safe for encode/decode (HF tokenizers are); picklable (it travels as its JSON).
    """

    def __init__(self, hf: HFTokenizer):
        """Wrap (and take ownership of) a `tokenizers.Tokenizer` laid out as Muse expects."""
        spec = json.loads(hf.to_str())
        problem = _layout_problem(spec)
        if problem is not None:
            raise TokenizerError(
                f"not a Muse tokenizer: {problem}; train one with muse.tokenizer.train_bpe (muse prepare)"
            )
        # The one runtime switch that makes specials unreachable from text. It is not saved in the
        # file (HF consumers rely on parsing specials in chat-template text), so set it on every load.
        hf.encode_special_tokens = True
        self._hf = hf
        self._vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self._added = {t["id"]: (t["content"], bool(t["special"])) for t in spec["added_tokens"]}
        self._token_bytes: list[bytes] | None = None  # built on first use; ~50 ms at 64k tokens

    # --- loading and saving -------------------------------------------------------------------------

    @classmethod
    def from_str(cls, text: str) -> Tokenizer:
        """Load from the JSON text of a tokenizer.json (as stored inside a checkpoint)."""
        try:
            hf = HFTokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
            raise TokenizerError(
                f"not a valid tokenizer.json ({e}); re-create it with muse prepare"
            ) from None
        return cls(hf)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a tokenizer.json (or the tokenizer.json inside directory `path`)."""
        file = _resolve_file(path)
        try:
            text = file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise TokenizerError(
                f"no tokenizer file at {file}; pass the tokenizer.json written by muse prepare "
                "(runs/<name>/data/tokenizer.json)"
            ) from None
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"cannot read tokenizer file {file}: {e}; check the path") from None
        try:
            hf = HFTokenizer.from_str(text)
        except Exception as e:
            raise TokenizerError(
                f"{file} is not a valid tokenizer.json ({e}); re-create it with muse prepare"
            ) from None
        try:
            return cls(hf)
        except TokenizerError as e:
            raise TokenizerError(f"{file}: {e}") from None

    def to_str(self) -> str:
        """The tokenizer.json text (pretty-printed, deterministic: same training -> same bytes)."""
        return self._hf.to_str(pretty=True)

    def save(self, path: str | os.PathLike) -> Path:
        """Write tokenizer.json atomically to `path` (or into directory `path`); returns the file."""
        file = _resolve_file(path)
        atomic_write_text(file, self.to_str())
        return file

    def __getstate__(self) -> dict:
        # HF's own pickling drops encode_special_tokens; travel as JSON and re-validate instead.
        return {"json": self._hf.to_str()}

    def __setstate__(self, state: dict) -> None:
        self.__init__(HFTokenizer.from_str(state["json"]))

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self._vocab_size})"

    # --- encoding and decoding ----------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; never special ids, never a BOS/EOS (add those by id)."""
        if not isinstance(text, str):
            raise TokenizerError(f"can only encode str, got {type(text).__name__}")
        try:
            return self._hf.encode(text, add_special_tokens=False).ids
        except Exception:
            _explain_bad_texts([text])
            raise

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`[encode(t) for t in texts]`, computed in parallel over the CPU cores (Rust threads).

        Footgun: after a process has used this, a fork()ed child (e.g. a DataLoader worker) falls back
        to one thread and HF prints a warning; set TOKENIZERS_PARALLELISM=false to silence it.
        """
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TokenizerError(f"can only encode str, got {type(t).__name__} at index {i}")
        # encode_batch_fast skips offset tracking we never use (tokenizers >= 0.21).
        batch = getattr(self._hf, "encode_batch_fast", self._hf.encode_batch)
        try:
            return [e.ids for e in batch(texts, add_special_tokens=False)]
        except Exception:
            _explain_bad_texts(texts)
            raise

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Specials decode to their literal text unless skip_special_tokens=True.

        Byte sequences that are not valid UTF-8 (e.g. a prefix that cuts a character in half) decode
        to U+FFFD; for streaming use `token_bytes` and an incremental UTF-8 decoder instead.
        """
        ids = self._check_ids(ids)
        return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        """`[decode(ids) for ids in batch]`, in parallel."""
        batch = [self._check_ids(ids) for ids in batch]
        return self._hf.decode_batch(batch, skip_special_tokens=skip_special_tokens)

    def _check_ids(self, ids) -> list[int]:
        # HF silently drops ids it does not know; a model sampling from padded logits would then lose
        # text without a trace, so refuse instead.
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        if ids and (min(ids) < 0 or max(ids) >= self._vocab_size):
            bad = next(i for i in ids if not 0 <= i < self._vocab_size)
            raise TokenizerError(
                f"token id {bad} is outside this tokenizer's vocabulary (0..{self._vocab_size - 1}); "
                "was the model trained with a different tokenizer?"
            )
        return ids

    # --- the vocabulary -----------------------------------------------------------------------------

    @property
    def hf(self) -> HFTokenizer:
        """The underlying `tokenizers.Tokenizer` (with encode_special_tokens=True)."""
        return self._hf

    @property
    def vocab_size(self) -> int:
        """Number of ids, specials included; every id in range(vocab_size) is a token."""
        return self._vocab_size

    @property
    def eot_id(self) -> int:
        return EOT_ID

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def end_id(self) -> int:
        return END_ID

    @property
    def special_ids(self) -> dict[str, int]:
        return dict(SPECIAL_IDS)

    @property
    def chat_template(self) -> str:
        """HF-style Jinja chat template rendering the same text as chat.render_chat / render_prompt."""
        from muse.tokenizer.chat import CHAT_TEMPLATE

        return CHAT_TEMPLATE

    def token_to_id(self, token: str) -> int | None:
        """Id of a token as it appears in the vocabulary (byte-level form, e.g. 'Ġthe'), or None."""
        return self._hf.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry of an id (byte-level form for ordinary tokens)."""
        self._check_ids([token_id])
        return self._hf.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes a token stands for; b"" for special tokens, which stand for no text.

        Summing len(token_bytes) over a sequence counts its text bytes (bits per byte); special tokens
        contribute none, which is what keeps bits-per-byte comparable across tokenizers.
        """
        self._check_ids([token_id])
        if self._token_bytes is None:
            self._token_bytes = self._build_token_bytes()
        return self._token_bytes[token_id]

    def _build_token_bytes(self) -> list[bytes]:
        to_byte = {ch: b for b, ch in bytes_to_unicode().items()}
        table = []
        for i in range(self._vocab_size):
            if i in self._added:
                content, special = self._added[i]
                table.append(b"" if special else content.encode("utf-8"))
            else:
                table.append(bytes(to_byte[ch] for ch in self._hf.id_to_token(i)))
        return table


def _explain_bad_texts(texts: Sequence[str]) -> None:
    """Turn HF's opaque error for a lone surrogate (not valid Unicode) into a TokenizerError."""
    for i, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            where = f"text {i}, " if len(texts) > 1 else ""
            raise TokenizerError(
                f"cannot encode a lone surrogate {text[e.start]!r} ({where}position {e.start}): it is not "
                "valid Unicode; clean the input, e.g. s.encode('utf-8', 'replace').decode('utf-8')"
            ) from None

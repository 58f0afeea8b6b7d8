"""The text edge, once for every caller (cli, eval, server, web): a text prompt -> token ids, and generated
ids -> text, streamed, with stop strings. Only the edges see text; the engine works on ids.

Two tokenization rules, on purpose:
- A raw prompt (completions, /tokenize, `muse generate` / `muse sample` prompts, eval's completion-style
  tasks) is model input: special-token literals in it, such as "<|user|>", become their special ids, as
  Hugging Face tokenizers and vLLM do. Clients that render a chat template themselves
  (lm-evaluation-harness with the server's `tokenizer_info` template) depend on it. `prompt_ids` also
  starts the prompt after a document boundary (`<|endoftext|>`), as every training document did.
- Chat message *content* never becomes a special token: `render_prompt` (chat.py) encodes it as plain
  text, so a user cannot open or close a turn by typing the token's spelling.

`TextStream` turns generated ids into text incrementally and exactly: it concatenates each token's
raw bytes (byte-level BPE: a token may end in the middle of a UTF-8 character) through an incremental
UTF-8 decoder, so a character split across tokens is emitted whole, once. Stop strings are matched on
the decoded text; text that could still become the start of a stop string is held back until it
cannot, so a stream never shows a client the beginning of a stop string it then cuts off.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Sequence
from functools import lru_cache

from muse.tokenizer.special import EOT_ID, SPECIAL_IDS
from muse.tokenizer.tokenizer import Tokenizer


@lru_cache(maxsize=1)
def _special_pattern() -> re.Pattern:
    # longest first, so a literal that is a prefix of another can never shadow it
    names = sorted(SPECIAL_IDS, key=len, reverse=True)
    return re.compile("(" + "|".join(re.escape(n) for n in names) + ")")


def encode_prompt(tok: Tokenizer, text: str) -> list[int]:
    """Ids of a raw prompt: special-token literals become their ids, the text between them is BPE."""
    ids: list[int] = []
    for i, piece in enumerate(_special_pattern().split(text)):
        if i % 2:
            ids.append(SPECIAL_IDS[piece])
        elif piece:
            ids.extend(tok.encode(piece))
    return ids


def token_text(tok: Tokenizer, token_id: int) -> str:
    """One token as a string for logprobs: its text, or its literal name for a special token.

    A token that is not valid UTF-8 on its own (part of a multi-byte character) is shown with
    replacement characters; the `bytes` OpenAI's chat logprobs carry are exact.
    """
    raw = tok.token_bytes(token_id)
    if not raw and token_id < 16:
        return tok.id_to_token(token_id)
    return raw.decode("utf-8", errors="replace")


class TextStream:
    """Incremental detokenizer for one generated sequence, with stop strings.

        ts = TextStream(tok, stop=["\\n\\n"])
        delta = ts.push(new_ids)       # text safe to show now ("" while a stop string may be forming)
        ts.stopped                     # True once a stop string appeared; the text ends before it
        delta += ts.finish()           # the held-back tail once the sequence is over

    Special tokens contribute no text (their bytes are empty), like skip_special_tokens=True.
    """

    def __init__(self, tok: Tokenizer, stop: Sequence[str] = (), *, include_stop: bool = False):
        self.tok = tok
        self.stop = [s for s in stop if s]
        self.include_stop = include_stop
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""            # everything decoded so far (kept only up to a stop)
        self._sent = 0             # characters of _text already returned
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.stopped = False
        self.stop_string: str | None = None

    @property
    def text(self) -> str:
        return self._text

    def push(self, ids: Sequence[int]) -> str:
        if self.stopped or not ids:
            return ""
        data = b"".join(self.tok.token_bytes(i) for i in ids)
        # a search window that can hold a stop string straddling the old and the new text
        start = max(0, len(self._text) - self._hold)
        self._text += self._decoder.decode(data)
        if self.stop:
            self._check_stop(start)
            if self.stopped:
                return self._take(len(self._text))
            return self._take(len(self._text) - self._partial_stop())
        return self._take(len(self._text))

    def _partial_stop(self) -> int:
        """Length of the longest tail of the text that is the beginning of a stop string."""
        t = self._text
        for k in range(min(self._hold, len(t)), 0, -1):
            tail = t[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

    def finish(self) -> str:
        """The rest of the text once generation is over (a dangling partial character becomes U+FFFD)."""
        if not self.stopped:
            start = max(0, len(self._text) - self._hold)
            self._text += self._decoder.decode(b"", final=True)
            if self.stop:
                self._check_stop(start, final=True)
        return self._take(len(self._text))

    def _check_stop(self, start: int, final: bool = False) -> None:
        """Stop at the earliest stop string found from `start` on; unless `final`, not while a longer
        stop string that would start before it may still complete ("n" in " n" must wait: " n " may
        follow and cut earlier). The text from that possible start on is held back meanwhile."""
        best = None
        for s in self.stop:
            at = self._text.find(s, start)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, s)
        if best is None:
            return
        at, s = best
        if not final and self._stop_may_start_before(at):
            return
        self._text = self._text[: at + len(s) if self.include_stop else at]
        self.stopped, self.stop_string = True, s

    def _stop_may_start_before(self, at: int) -> bool:
        """A tail of the text starting before `at` is a proper prefix of some stop string."""
        t = self._text
        for k in range(min(self._hold, len(t)), len(t) - at, -1):
            tail = t[-k:]
            if any(len(x) > k and x.startswith(tail) for x in self.stop):
                return True
        return False

    def _take(self, upto: int) -> str:
        upto = max(upto, self._sent)
        out = self._text[self._sent:upto]
        self._sent = upto
        return out


def prompt_ids(tok: Tokenizer, text: str) -> list[int]:
    """A raw text prompt as the model reads it: `encode_prompt`, after a document boundary (`<|endoftext|>`,
    added unless the text starts with one), the way every training document starts."""
    ids = encode_prompt(tok, text)
    return ids if ids[:1] == [EOT_ID] else [EOT_ID, *ids]

"""The server's logprob renderers: the engine's logprobs in the two shapes OpenAI's routes use (tokens as
text, offsets into the returned text, top alternatives by token text).

The text edge itself (prompts -> ids, ids -> streamed text with stop strings) is muse.tokenizer.text,
shared with the command line and eval.
"""

from __future__ import annotations

from collections.abc import Sequence

from muse.infer.sampler import TokenLogprob
from muse.tokenizer import Tokenizer
from muse.tokenizer.special import END_ID
from muse.tokenizer.text import token_text


def completion_logprobs(tok: Tokenizer, tokens: Sequence[int], lps: Sequence[TokenLogprob], *,
                        prompt: Sequence[int] = (), prompt_lps: Sequence[TokenLogprob] = ()) -> dict:
    """/v1/completions' `logprobs` object for generated `tokens` (and, with `echo`, the `prompt` before
    them: its first token has no logprob). Offsets index the returned text, where special tokens take
    no room."""
    toks, tlp, top, offsets = [], [], [], []
    pos = 0

    def add(t: int, tl: TokenLogprob | None) -> None:
        nonlocal pos
        toks.append(token_text(tok, t))
        offsets.append(pos)
        pos += len(tok.token_bytes(t).decode("utf-8", errors="replace"))
        tlp.append(None if tl is None else tl.logprob)
        top.append(None if tl is None else {token_text(tok, i): lv for i, lv in tl.top})

    for k, t in enumerate(prompt):
        add(t, prompt_lps[k - 1] if 0 < k <= len(prompt_lps) else None)
    for t, tl in zip(tokens, lps):
        add(t, tl)
    return {"tokens": toks, "token_logprobs": tlp, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(tok: Tokenizer, tokens: Sequence[int], lps: Sequence[TokenLogprob], top_n: int) -> dict:
    """/v1/chat/completions' `logprobs` object: per content token its text, logprob, UTF-8 bytes and the
    `top_n` alternatives. The turn's end token is not content."""
    def entry(t: int, logprob: float) -> dict:
        return {"token": token_text(tok, t), "logprob": logprob, "bytes": list(tok.token_bytes(t))}

    content = []
    for t, tl in zip(tokens, lps):
        if t == END_ID:
            continue
        e = entry(t, tl.logprob)
        e["top_logprobs"] = [entry(i, v) for i, v in tl.top[:top_n]]
        content.append(e)
    return {"content": content, "refusal": None}

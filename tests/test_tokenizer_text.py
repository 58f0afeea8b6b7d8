"""tokenizer/text.py, the text edge: prompts to ids, and streamed detokenizing with stop strings against
the plain full-text reference."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from muse.tokenizer import EOT_ID, SPECIAL_IDS, train_bpe
from muse.tokenizer.text import TextStream, encode_prompt, token_text


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    words = "the king queen café naïve 王 über love night day — fair speak".split()
    return train_bpe([" ".join(rng.choice(words) for _ in range(80)) for _ in range(30)], vocab_size=320)


def reference(tok, ids, stop):
    """Decode everything at once, then cut at the earliest stop string."""
    text = b"".join(tok.token_bytes(i) for i in ids).decode("utf-8", errors="replace")
    hits = [(text.find(s), s) for s in stop if s and text.find(s) >= 0]
    if hits:
        at, _ = min(hits)
        return text[:at], True
    return text, False


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_streamed_text_equals_the_reference_whatever_the_chunking(tok, data):
    text = data.draw(st.text(alphabet="the kingcaféï王ü —\n", min_size=0, max_size=40))
    ids = tok.encode(text)
    # a few ids cut multi-byte characters in half when split into single bytes: add raw byte tokens too
    ids += data.draw(st.lists(st.sampled_from([16 + 0xC3, 16 + 0xA9, 16 + 0xE7, 16 + 0x8E, 16 + 0x8B]), max_size=3))
    stop = data.draw(st.lists(st.text(alphabet="kingé王 \n", min_size=1, max_size=4), max_size=3))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(ids)), max_size=6)))
    ts = TextStream(tok, stop)
    out, prev = [], 0
    for c in [*cuts, len(ids)]:
        out.append(ts.push(ids[prev:c]))
        prev = c
    out.append(ts.finish())
    want, stopped = reference(tok, ids, stop)
    assert "".join(out) == want and ts.text == want
    assert ts.stopped == stopped


def test_stop_text_is_held_back_until_it_cannot_be_a_stop(tok):
    ts = TextStream(tok, ["king"])
    assert ts.push(tok.encode("the ki")) == "the "          # "ki" may become "king"
    assert ts.push(tok.encode("t")) == "kit"                # it did not
    assert ts.push(tok.encode(" the king speaks")) == " the " and ts.stopped and ts.stop_string == "king"
    assert ts.push(tok.encode("more")) == "" and ts.finish() == ""
    inc = TextStream(tok, ["king"], include_stop=True)
    assert inc.push(tok.encode("a king!")) + inc.finish() == "a king"


def test_a_stop_string_waits_for_a_longer_one_that_would_start_earlier(tok):
    # "n" is complete after " n", but " n " may still follow and cuts earlier (found by hypothesis)
    ts = TextStream(tok, ["n", " n "])
    assert ts.push(tok.encode(" n")) == "" and not ts.stopped
    assert ts.push(tok.encode(" the")) == "" and ts.stopped and ts.stop_string == " n "
    early = TextStream(tok, ["n", " n "])   # the longer one never completes: the shorter one stands
    assert early.push(tok.encode(" n")) == "" and early.push(tok.encode("x")) == " " and early.stop_string == "n"
    ended = TextStream(tok, ["n", " n "])   # nor when the sequence ends first
    assert ended.push(tok.encode(" n")) == "" and ended.finish() == " " and ended.stop_string == "n"


def test_specials_in_prompts_and_logprob_token_text(tok):
    ids = encode_prompt(tok, "<|endoftext|><|user|>the king<|end|>x")
    assert ids == [EOT_ID, SPECIAL_IDS["<|user|>"], *tok.encode("the king"), SPECIAL_IDS["<|end|>"], *tok.encode("x")]
    assert encode_prompt(tok, "<|nope|>") == tok.encode("<|nope|>")
    assert token_text(tok, EOT_ID) == "<|endoftext|>"
    assert TextStream(tok).push([EOT_ID, *tok.encode("hi")]) == "hi"   # specials carry no text


def test_every_edge_turns_a_prompt_into_the_same_ids(tok):
    """One text edge: `muse generate`, the server's completions route and `muse eval` tokenize a raw prompt
    (special-token literals included) identically (the copies had drifted apart)."""
    from muse.cli.generate import _prompt_ids
    from muse.eval import local as eval_local
    from muse.server.generation import _encode_completion_prompts
    from muse.tokenizer.text import prompt_ids

    assert eval_local.prompt_ids is prompt_ids  # muse eval's checkpoint provider encodes through the same edge

    class Served:
        tokenizer = tok

    for text in ("the king", "<|user|>the king<|end|>", "<|endoftext|>café 王", " naïve — fair"):
        ids = prompt_ids(tok, text)
        assert ids[0] == EOT_ID and ids.count(EOT_ID) == 1
        assert _prompt_ids(tok, {"prompt": text}, chat=False, where="row 1") == (ids, False)
        assert _encode_completion_prompts(Served, [text]) == ([ids], [text])
    assert prompt_ids(tok, "<|user|>x")[1] == SPECIAL_IDS["<|user|>"]

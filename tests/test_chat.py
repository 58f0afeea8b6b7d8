"""`muse chat` on a tiny model: commands, multi-line input, streamed replies equal to greedy generation,
history trimmed to the context, and one rendering of a conversation shared with serving, export and scoring."""

from __future__ import annotations

import io
import random

import pytest
import torch

from muse.cli.chat import ChatSession, chat_loop
from muse.infer.engine import LLM, Engine, EngineConfig
from muse.infer.sampling_params import SamplingParams
from muse.model import ModelConfig, build_model
from muse.tokenizer import CHAT_TEMPLATE, END_ID, render_prompt, train_bpe

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "the king queen lord lady love night day sword crown heart fair speak hear come go".split()


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    return train_bpe([" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(40)], vocab_size=300)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, d_model=64, n_head=4, n_kv_head=2,
                                   max_seq_len=128, init_std=0.1)).eval()


def _session(model, tok, **kw):
    engine = Engine(model, EngineConfig(max_num_seqs=1, block_size=8), tokenizer=tok)
    return ChatSession(engine, tok, **{"temperature": 0.0, "max_tokens": 8, **kw})


def _greedy(model, tok, messages, max_tokens):
    llm = LLM(model, EngineConfig(max_num_seqs=1, block_size=8), tokenizer=tok)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=(END_ID,))
    return llm.generate([render_prompt(tok, messages)], params, show_progress=False)[0].text


def test_replies_stream_the_greedy_text_and_keep_the_history(model, tok):
    s = _session(model, tok, system="be brief")
    out, err = io.StringIO(), io.StringIO()
    chat_loop(s, iter(["the king", '"""', "speak of", "the queen", '"""', "fair \\", "lady"]), out, err)
    first = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the king"}]
    want1 = _greedy(model, tok, first, 8)
    assert out.getvalue().splitlines()[0] == want1
    assert [m["content"] for m in s.history] == ["the king", want1, "speak of\nthe queen",
                                                 s.history[3]["content"], "fair \nlady", s.history[5]["content"]]
    second = first + [{"role": "assistant", "content": want1}, {"role": "user", "content": "speak of\nthe queen"}]
    assert s.history[3]["content"] == _greedy(model, tok, second, 8)


def test_commands_change_settings_and_reset(model, tok):
    s = _session(model, tok)
    out, err = io.StringIO(), io.StringIO()
    chat_loop(s, iter(["/temperature 1.5", "/temperature x", "/system answer in verse", "/bogus", "king",
                       "/reset", "/help", "/quit", "never read"]), out, err)
    text = err.getvalue()
    assert s.temperature == 1.5 and s.system == "answer in verse" and s.history == []
    assert "usage: /temperature" in text and "unknown command /bogus" in text and "conversation reset" in text
    assert len(out.getvalue().splitlines()) == 1  # one reply ("king"); "never read" came after /quit


def test_history_is_trimmed_to_the_context_keeping_the_system_prompt(model, tok):
    s = _session(model, tok, system="be brief", max_tokens=48)
    out, err = io.StringIO(), io.StringIO()
    sent, add = [], s.engine.add_request
    s.engine.add_request = lambda rid, ids, params: (sent.append((len(ids), params.max_tokens)), add(rid, ids, params))
    for _ in range(8):
        s.reply("the king and the queen speak of love", out, err)
    assert all(n + k <= s.engine.max_model_len for n, k in sent)
    assert "oldest exchange(s) were dropped" in err.getvalue()
    assert s.messages()[0] == {"role": "system", "content": "be brief"} and s.history[0]["role"] == "user"
    s.history.clear()
    assert s.reply(" ".join(["king"] * 150), out, err) == "" and "shorten it" in err.getvalue()
    assert s.history == []


def test_one_rendering_for_chat_serve_export_and_scoring(tok):
    """`muse chat`, the server's chat route and tokenizer_info, the exported HF template and the SFT task scorer all
    render through muse.tokenizer.render_prompt; the HF template gives the same ids."""
    import jinja2

    import muse.cli.chat as chat_cli
    import muse.posttrain.taskscore as taskscore
    import muse.server.generation as server_generation

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "who is <|user|> king?"},
                {"role": "assistant", "content": "the king"}, {"role": "user", "content": "and the queen"}]
    ids = render_prompt(tok, messages)
    assert server_generation.render_prompt is render_prompt and taskscore.render_prompt is render_prompt
    engine = Engine(build_model(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, d_model=32, n_head=2, max_seq_len=128)),
                    EngineConfig(max_num_seqs=1, block_size=8), tokenizer=tok)
    s = chat_cli.ChatSession(engine, tok, system="be brief", max_tokens=4)
    s.history = [dict(m) for m in messages[1:]]
    assert s.prompt_ids()[0] == ids
    # The exported template (tokenizer_config.json's chat_template), rendered as HF does, then tokenized with
    # specials parsed (as transformers' apply_chat_template does): the same ids.
    text = jinja2.Environment().from_string(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)
    from muse.tokenizer.text import encode_prompt

    hf_ids = encode_prompt(tok, text)
    # content that spells a special token is plain text for render_prompt; HF would parse it, so compare without it
    clean = [dict(m, content=m["content"].replace("<|user|> ", "")) for m in messages]
    text = jinja2.Environment().from_string(CHAT_TEMPLATE).render(messages=clean, add_generation_prompt=True)
    assert encode_prompt(tok, text) == render_prompt(tok, clean)
    assert hf_ids != ids  # the one place they differ, on purpose (muse.tokenizer.text)

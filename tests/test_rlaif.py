"""RLAIF against a written constitution: the file format and its errors, the built-in checks and fixes, the
reward function, the compliance task, and `muse rlaif` end to end on a tiny model (checks as critic, with a
kill and a resume; a live `muse serve` as critic; the CLI through DPO)."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

import muse.tasks as tasks
from eval_kit import DyingCache, Killed
from muse.eval.cache import ResponseCache
from muse.posttrain.constitution import (
    ConstitutionError,
    ConstitutionReward,
    load_constitution,
    parse_choice,
    parse_constitution,
)
from muse.posttrain.rlaif import JOURNAL, RLAIFConfig, Worker, load_prompts, run_rlaif
from muse.tasks.constitution import CHECKS, FIXES

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["speak of the king", "the night", "come hear", "love and death", "a fair lady", "go"]


def _toml(body: str) -> str:
    return textwrap.dedent(body).strip() + "\n"


# --- the constitution file ------------------------------------------------------------------------------------


def test_the_sample_constitution_checks_and_fixes_every_principle():
    c = load_constitution()
    assert [p.name for p in c.checked] == ["no_unasked_introduction", "introduces_itself_when_asked", "on_topic",
                                           "brief", "no_repetition", "plain_prose", "no_shouting", "finished"]
    # no rule can write the answer
    assert [p.name for p in c.principles if not p.fixable] == ["introduces_itself_when_asked", "on_topic"]
    q = "Is the king dead?"
    bad = {
        "no_unasked_introduction": "I am Muse, a small language model. The king is dead.",
        "brief": "The king " + " ".join(f"word{i}" for i in range(45)) + ".",
        "no_repetition": "The king is dead. The king is dead.",
        "plain_prose": "HAMLET: The king is dead [aside] and gone.",
        "no_shouting": "The king is DEAD.",
        "finished": "The king is dead, and",
    }
    for name, text in bad.items():
        verdict = c.check(text, q)
        assert name in verdict.failed, (name, verdict)
        assert 0 < verdict.score < 1 and not verdict.passed
        revised = c.revise(text, q)
        assert c.check(revised, q).passed, (name, revised, c.check(revised, q).reason())
    assert c.check("Ay, dead.", q).failed == ["brief"] and c.revise("Ay, dead.", q) == "Ay, dead."  # no fix adds content
    off = "The night is long and cold."
    assert c.check(off, q).failed == ["on_topic"] and c.revise(off, q) == off
    good = "The king is dead, and the night is long."
    assert c.check(good, q).passed and c.check(good, q).score == 1.0 and c.revise(good, q) == good
    assert "meets all 8" in c.check(good, q).reason()
    assert "meets all 5" in c.check(good).reason()  # without a prompt, the three that read it are left out
    # asked who it is, a reply must name Muse; asked anything else, it must not introduce itself
    asked = "Hi! Who made you? Thanks!"
    assert c.check(good, asked).failed == ["introduces_itself_when_asked"]
    assert c.check("I am Muse, made by the Muse authors.", asked).passed
    assert c.check("I am Muse, made by the Muse authors.", q).failed[0] == "no_unasked_introduction"


@pytest.mark.parametrize("check, text, ok", [
    ("ends_sentence", "It ends.", True), ("ends_sentence", 'He said "go."', True), ("ends_sentence", "no end", False),
    ("word_count", "one two three", True), ("word_count", ".", True), ("word_count", "word " * 41, False),
    ("no_repeats", "the the king", False),
    ("no_repeats", "Go now. go now!", False), ("no_repeats", "go now, then go again.", True),
    ("no_shouting", "Henry VI and Richard III.", True), ("no_shouting", "KING: hail", False),
    ("no_shouting", "I am OK.", True),
])
def test_builtin_checks(check, text, ok):
    result = CHECKS[check](text)
    assert (result is True) == ok, result


def test_builtin_fixes():
    assert FIXES["end_sentence"]("Go. And then the queen, and") == "Go. And then the queen, and."
    assert FIXES["end_sentence"]("Long sentence here that ends. Cut") == "Long sentence here that ends."
    assert FIXES["truncate_words"]("a b c. d e f", max_words=5) == "a b c."
    assert FIXES["remove_repeats"]("the the king. The king.") == "the king."
    assert FIXES["unshout"]("HAMLET speaks. WHY now") == "Hamlet speaks. Why now"
    assert FIXES["delete_matches"]("one [two] three", pattern=r"\[[^\]]*\]") == "one three"


@pytest.mark.parametrize("body, message", [
    ('[[principle]]\nname = "a"\nrevision = "r"\n', r"principle 'a': missing field 'critique'"),
    ('[[principle]]\ncritique = "c"\nrevision = "r"\n', r"principle 1: missing field 'name'"),
    ('[[principle]]\nname = "a"\ncritique = "c"\nrevision = "r"\ncheck = "word_cont"\n',
     r"principle 'a': unknown check 'word_cont'. Did you mean: word_count"),
    ('[[principle]]\nname = "a"\ncritique = "c"\nrevision = "r"\nmust_match = "([a-z"\n',
     r"principle 'a': must_match '\(\[a-z' is not a valid regular expression"),
    ('[[principle]]\nname = "a"\ncritique = "c"\nrevision = "r"\nchek = "word_count"\n',
     r"principle 'a': unknown key 'chek'. Did you mean: check"),
    ('[[principle]]\nname = "a"\ncritique = "c"\nrevision = "r"\nfix = "end_sentence"\n', r"a fix needs a check"),
    ('[[principle]]\nname = "a"\ncritique = "c"\nrevision = "r"\nmust_match = "x"\nfix = "delete_matches"\n',
     r"'delete_matches' deletes the matches of must_not_match"),
    ('[[principle]]\nname = "a"\ncritique = "c"\nrevision = "r"\ncheck = "no_such_module_xyz:f"\n',
     r"principle 'a': check 'no_such_module_xyz:f': cannot import module 'no_such_module_xyz'"),
    ('[[principle]]\nname = "a"\ncritique = "c"\nrevision = "r"\ncheck = "word_count"\nmust_match = "x"\n',
     r"give one of check, must_match, must_not_match"),
    ('[[principle]]\nname = "a"\ncritique = "c"\nrevision = "r"\n[[principle]]\nname = "a"\ncritique = "c"\nrevision = "r"\n',
     r"principle 'a' is defined twice"),
    ('[[principle]]\nname = "a"\ncritique = "c"\nrevision = "r"\ncheck = "word_count"\noptions = { max_word = 3 }\n',
     r"principle 'a': check 'word_count' cannot take options \{'max_word': 3\}"),
    ('name = "x"\n', r"no principles"),
    ('[[principle]\n', r"not valid TOML"),
])
def test_bad_constitutions_name_the_file_and_the_principle(tmp_path, body, message):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(ConstitutionError, match=message) as e:
        load_constitution(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


def test_module_function_checks_and_fixes_next_to_the_file(tmp_path):
    (tmp_path / "house_rules.py").write_text(textwrap.dedent("""
        def polite(text, word="please"):
            return (1.0, "polite") if word in text else (0.0, f"never says {word}")
        def add_please(text, word="please"):
            return text.rstrip(".") + ", " + word + "."
        def broken(text, **kw):
            return "yes"
        def raises(text):
            return 1 / 0
    """))
    path = tmp_path / "house.toml"
    path.write_text(_toml("""
        [[principle]]
        name = "polite"
        critique = "Is it polite?"
        revision = "Make it polite."
        check = "house_rules:polite"
        fix = "house_rules:add_please"
        options = { word = "prithee" }
        [[principle]]
        name = "model_only"
        critique = "Is it wise?"
        revision = "Make it wise."
    """))
    c = load_constitution(path)
    assert c.name == "house" and [p.name for p in c.checked] == ["polite"]
    assert c.check("Give me bread.").reason() == "polite: never says prithee"
    assert c.revise("Give me bread.") == "Give me bread, prithee."
    broken = parse_constitution('[[principle]]\nname = "b"\ncritique = "c"\nrevision = "r"\ncheck = "house_rules:broken"\n',
                                "b.toml", tmp_path / "b.toml")
    with pytest.raises(ConstitutionError, match="check 'house_rules:broken' of principle 'b' returned 'yes'"):
        broken.check("x")
    raises = parse_constitution('[[principle]]\nname = "r"\ncritique = "c"\nrevision = "r"\ncheck = "house_rules:raises"\n',
                                "r.toml", tmp_path / "r.toml")
    with pytest.raises(ConstitutionError, match="check 'house_rules:raises' of principle 'r' raised ZeroDivisionError"):
        raises.check("x")


def test_constitution_reward():
    from muse.posttrain.rewards import Reward, Rollout

    reward = ConstitutionReward(None)
    msgs = ({"role": "user", "content": "Who is Hamlet?"},)
    identity = "I am Muse, a small language model trained on Shakespeare's plays, made by the Muse authors."
    out = reward.score([Rollout(msgs, "Hamlet is a prince of Denmark."), Rollout(msgs, "HAMLET: the the prince"),
                        Rollout(msgs, ""), Rollout(msgs, identity),
                        Rollout(({"role": "user", "content": "Who are you?"},), identity)])
    assert all(isinstance(r, Reward) for r in out)
    assert out[0] == Reward(1.0, "meets all 8 checked principles")
    assert out[1].score == pytest.approx(4 / 8)  # on topic, no introduction (neither asked), brief
    assert "no_repetition" in out[1].reason and "plain_prose" in out[1].reason and "finished" in out[1].reason
    assert out[2].score == pytest.approx(5 / 8) and "finished" in out[2].reason and "brief" in out[2].reason
    # the canned reply meets every reply-only principle, and fails the two that read the question
    assert out[3].score == pytest.approx(6 / 8) and "no_unasked_introduction" in out[3].reason
    assert "on_topic" in out[3].reason and out[4].score == 1.0  # asked who it is: the answer
    assert reward.name == "constitution"


def test_constitution_reward_through_the_reward_specs():
    from muse.posttrain.rewards import Rollout, build_reward

    reward = build_reward(["constitution"], {})
    assert reward.score([Rollout(({"role": "user", "content": "hi"},), "Hello there, friend.")])[0].score == 1.0


def test_constitution_without_checks_cannot_be_a_reward(tmp_path):
    path = tmp_path / "words.toml"
    path.write_text('[[principle]]\nname = "wise"\ncritique = "Is it wise?"\nrevision = "Be wise."\n')
    with pytest.raises(ConstitutionError, match="no principle has a programmatic check"):
        ConstitutionReward(path)


@pytest.mark.parametrize("answer, choice", [
    ("A", "A"), ("B.", "B"), ("(B)", "B"), ("Response A is better.", "A"), ("I prefer B", "B"),
    ("A. Response B repeats itself.", "A"), ("Response B, because A shouts", "B"), ("both A and B", None),
    ("the king", None), ("", None), ("Alas, a bad answer", None), ("**B**", "B"), ("A\x06mJA\x06", None),
    ("Answer: B", "B"), ("B\nBecause A shouts.", "B"),
])
def test_parse_choice(answer, choice):
    assert parse_choice(answer) == choice


# --- the compliance task ----------------------------------------------------------------------------------------


def test_compliance_task_scores_known_outputs():
    task = tasks.get("compliance")
    assert "compliance" in tasks.names() and task.kind == "chat"
    assert task.sizes() == {"test": 1000, "validation": 500, "train": 5000}
    test_ids = {s.metadata["key"] for s in task.samples("test")}
    assert not test_ids & {s.metadata["key"] for s in task.samples("train")}
    sample = next(s for s in task.samples("test") if s.messages[0]["content"] == "What is Hamlet about? Be honest.")
    for s in task.samples("test")[:50]:
        assert tasks.grade_sample(task, s, s.demonstration).score == 1.0, (s.messages, s.demonstration)
    cases = {
        "Hamlet is the prince of Denmark.": 1.0,
        "Hamlet is the prince of Denmark": 0.0,                  # unfinished
        "HAMLET: I am the prince.": 0.0,                          # a speaker label, shouting
        "The prince, the prince. The prince, the prince.": 0.0,  # repeated
        "word " * 50 + "done.": 0.0,                             # too long
        "The prince of Denmark is sad.": 0.0,                    # does not name what was asked about
        "I am Muse, a small language model, and Hamlet is a prince.": 0.0,  # introduces itself, unasked
        "": 0.0,
    }
    for output, score in cases.items():
        assert tasks.grade_sample(task, sample, output).score == score, output
    partial = tasks.get("compliance", partial=True)
    assert tasks.grade_sample(partial, sample, "Hamlet is the prince of Denmark").score == pytest.approx(7 / 8)
    assert "finished" in tasks.grade_sample(partial, sample, "Hamlet is the prince of Denmark").reason


def test_compliance_task_with_another_constitution(tmp_path):
    path = tmp_path / "short.toml"
    path.write_text('[[principle]]\nname = "short"\ncritique = "c"\nrevision = "r"\ncheck = "word_count"\n'
                    'options = { max_words = 3 }\n')
    task = tasks.get("compliance", constitution=str(path))
    sample = task.samples("test")[0]
    assert tasks.grade_sample(task, sample, "Three short words").score == 1.0
    assert tasks.grade_sample(task, sample, "Four words are too many.").score == 0.0
    path.write_text('[[principle]]\nname = "short"\n')
    with pytest.raises(ConstitutionError, match="missing field 'critique'"):
        tasks.get("compliance", constitution=str(path))
    path.write_text('[[principle]]\nname = "wise"\ncritique = "c"\nrevision = "r"\n')
    with pytest.raises(tasks.TaskError, match="no principle has a programmatic check"):
        tasks.get("compliance", constitution=str(path))


# --- the pairs, from a scripted policy --------------------------------------------------------------------------


class Scripted:
    """A policy whose replies are given (to check the pairing rules exactly)."""

    def __init__(self, replies):
        self.replies = list(replies)

    async def chat(self, messages, max_tokens, temperature=0.0, seed=None):
        return self.replies.pop(0)


def test_checks_pairs_revised_over_original_and_best_over_worst():
    import asyncio

    c = load_constitution()
    cfg = RLAIFConfig(samples=3)
    replies = ["A fine reply.", "HAMLET: a reply", "A fine reply, and"]
    rec = asyncio.run(Worker(cfg, c, Scripted(replies), None)({"id": "p", "messages": [{"role": "user", "content": "hi"}],
                                                                "prompt": "hi"}))
    pairs = rec["pairs"]
    kinds = [(p["kind"], p["chosen"], p["rejected"]) for p in pairs]
    assert ("revision", "A reply.", "HAMLET: a reply") in kinds
    assert ("revision", "A fine reply, and.", "A fine reply, and") in kinds
    assert ("best_vs_worst", "A fine reply.", "HAMLET: a reply") in kinds
    assert len(pairs) == 3  # the compliant reply has nothing to revise
    bvw = next(p for p in pairs if p["kind"] == "best_vs_worst")
    assert bvw["scores"] == {"chosen": 1.0, "rejected": pytest.approx(5 / 8)} and "programmatic checks" in bvw["critique"]
    rev = next(p for p in pairs if p["rejected"] == "HAMLET: a reply")
    assert "plain_prose" in rev["critique"] and "no_shouting" in rev["critique"] and rev["prompt"] == "hi"
    same = asyncio.run(Worker(cfg, c, Scripted(["Same."] * 3), None)({"id": "q", "messages": [{"role": "user", "content": "x"}]}))
    assert same["pairs"] == []  # nothing differs: no pair (DPO refuses identical chosen and rejected)


def test_compliant_vs_rest_pairs_every_compliant_sample_over_every_other():
    import asyncio

    from muse.common.errors import UsageError

    c = load_constitution()
    # two compliant replies (one twice), two failing ones: 2 distinct compliant x 2 others = 4 sample pairs
    replies = ["A fine reply.", "HAMLET: a reply", "Another fine reply.", "A fine reply.", "A fine reply, and"]
    msg = {"id": "p", "messages": [{"role": "user", "content": "hi"}]}
    cfg = RLAIFConfig(samples=5, pairing="compliant_vs_rest")
    rec = asyncio.run(Worker(cfg, c, Scripted(replies), None)(msg))
    rest = [(p["chosen"], p["rejected"]) for p in rec["pairs"] if p["kind"] == "compliant_vs_rest"]
    assert sorted(rest) == sorted((b, w) for b in ("A fine reply.", "Another fine reply.")
                                  for w in ("HAMLET: a reply", "A fine reply, and"))
    assert all(p["scores"]["chosen"] == 1.0 > p["scores"]["rejected"] for p in rec["pairs"] if p["kind"] == "compliant_vs_rest")
    assert sum(p["kind"] == "revision" for p in rec["pairs"]) == 2 and not any(p["kind"] == "best_vs_worst" for p in rec["pairs"])
    # no compliant sample: the revisions only (not the best of the partly compliant ones)
    three = RLAIFConfig(samples=3, pairing="compliant_vs_rest")
    rec = asyncio.run(Worker(three, c, Scripted(["HAMLET: a reply", "A fine reply, and", "NO."]), None)(msg))
    assert rec["pairs"] and all(p["kind"] == "revision" for p in rec["pairs"])
    # the default on the same replies: one sample pair, the best over the worst
    rec = asyncio.run(Worker(RLAIFConfig(samples=5), c, Scripted(replies), None)(msg))
    assert [p["kind"] for p in rec["pairs"]].count("best_vs_worst") == 1 and not any(p["kind"] == "compliant_vs_rest" for p in rec["pairs"])
    with pytest.raises(UsageError, match="--pairing must be one of best-vs-worst, compliant-vs-rest"):
        RLAIFConfig(pairing="everything").check()
    with pytest.raises(UsageError, match="pairs by the programmatic checks: use it with --critic checks"):
        RLAIFConfig(pairing="compliant_vs_rest", critic="policy").check()


# --- end to end on a tiny model ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def policy_run(tiny_tok, tmp_path_factory):
    """A run whose sft stage holds a seeded tiny llama with room for critic prompts (context 1024)."""
    from muse.checkpoint import save_checkpoint
    from muse.model import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=tiny_tok.vocab_size, n_layer=2, d_model=64, n_head=4, n_kv_head=2,
                                    max_seq_len=1024, init_std=0.1))
    root = tmp_path_factory.mktemp("rlaif")
    save_checkpoint(root / "run" / "sft", 1, model=model, tokenizer=tiny_tok)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return root


def _copy_run(policy_run, tmp_path):
    import shutil

    shutil.copytree(policy_run / "run", tmp_path / "run")
    return tmp_path / "run"


def test_rlaif_with_checks_end_to_end_killed_and_resumed(policy_run, tmp_path):
    run = _copy_run(policy_run, tmp_path)
    base = dict(prompts=str(policy_run / "prompts.jsonl"), samples=3, max_tokens=10, device="cpu",
                show_progress=False, prompts_in_flight=1)
    cache_path = run / "rlaif" / "cache.sqlite3"
    (run / "rlaif").mkdir()
    # killed after the 2nd prompt's answers and one answer of the 3rd
    with pytest.raises(Killed):
        run_rlaif(RLAIFConfig(**base, cache=DyingCache(cache_path, after=2 * 3 + 1)), run)
    assert len((run / "rlaif" / JOURNAL).read_text().splitlines()) == 2
    stored = ResponseCache(cache_path).count() - 2 * 3  # answers of the 3rd prompt that arrived before the kill
    assert 1 <= stored <= 3

    with open(run / "rlaif" / JOURNAL, "a") as f:
        f.write('{"id": "torn')  # a kill in the middle of writing the 3rd record
    s = run_rlaif(RLAIFConfig(**base, cache=str(cache_path)), run)
    assert (s["prompts"], s["prompts_this_run"], s["samples"]) == (6, 4, 18)
    # the finished prompts asked nothing again; the 3rd prompt's stored answers came from the cache
    assert s["requests"]["policy"]["cached"] == stored and s["requests"]["policy"]["sent"] == 4 * 3 - stored
    pairs = [json.loads(line) for line in (run / "rlaif" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == s["pairs"]["total"] == s["pairs"]["revision"] + s["pairs"]["best_vs_worst"] > 0
    for p in pairs:
        assert p["prompt"] in PROMPTS and p["chosen"] != p["rejected"] and p["critique"]
        assert p["scores"]["chosen"] > p["scores"]["rejected"]
        c = load_constitution()
        assert c.check(p["chosen"], p["prompt"]).score == p["scores"]["chosen"]
    assert s["compliance"]["score_revisions"] >= s["compliance"]["score_samples"]
    assert s["labels"] == {"comparisons": 0, "unparseable": 0} and s["settings"]["critic"] == "checks"
    # the pairs file is what DPO and the RM read
    from muse.posttrain.preference import read_preference_jsonl

    assert len(read_preference_jsonl(run / "rlaif" / "pairs.jsonl")) == len(pairs)
    # done: a third run asks nothing; other settings are refused until --force
    again = run_rlaif(RLAIFConfig(**base, cache=str(cache_path)), run)
    assert again["prompts_this_run"] == 0 and again["pairs"] == s["pairs"]
    from muse.common.errors import UsageError

    with pytest.raises(UsageError, match="another samples .*pass --force"):
        run_rlaif(RLAIFConfig(**{**base, "samples": 2}), run)
    fresh = run_rlaif(RLAIFConfig(**{**base, "samples": 2}, force=True, cache=False), run)
    assert (fresh["prompts_this_run"], fresh["samples"]) == (6, 12)
    # the pairing is a setting too, both ways (the default is not written, so older runs still resume)
    base2 = {**base, "samples": 2, "cache": False}
    with pytest.raises(UsageError, match="another pairing .*pass --force"):
        run_rlaif(RLAIFConfig(**base2, pairing="compliant_vs_rest"), run)
    run_rlaif(RLAIFConfig(**base2, pairing="compliant_vs_rest", force=True), run)
    with pytest.raises(UsageError, match="another pairing .*pass --force"):
        run_rlaif(RLAIFConfig(**base2), run)


def test_rlaif_against_a_live_muse_serve_critic(policy_run, tiny_tok, tmp_path, monkeypatch):
    from muse.checkpoint import load
    from muse.infer.engine import Engine, EngineConfig
    from muse.server.app import ServedModel
    from muse.server.store import Store
    from server_kit import Server

    model, _, _ = load(policy_run / "run" / "sft")
    engine = Engine(model, EngineConfig(block_size=16, num_blocks=512, max_num_seqs=8), tokenizer=tiny_tok)
    store = Store(tmp_path / "serve.sqlite3")
    server = Server([ServedModel.from_engine("tiny", engine)], store)
    try:
        key, _ = store.create_key("rlaif")
        monkeypatch.setenv("MUSE_CRITIC_API_KEY", key)
        run = _copy_run(policy_run, tmp_path)
        cfg = dict(prompts=str(policy_run / "prompts.jsonl"), limit=3, samples=2, max_tokens=8, device="cpu",
                   critic=f"judge=openai:{server.url}/v1@tiny", critic_max_tokens=6, concurrency=4, show_progress=False)
        s = run_rlaif(RLAIFConfig(**cfg), run)
        records = [json.loads(line) for line in (run / "rlaif" / JOURNAL).read_text().splitlines()]
        comparisons = [c for r in records for c in r["comparisons"]]
        # one comparison per prompt (two distinct samples); each answer kept, parsed or counted as unparseable
        assert len(comparisons) == s["labels"]["comparisons"] == 3
        unparseable = sum(parse_choice(c["answer"]) is None for c in comparisons)
        assert s["skipped"]["unparseable_labels"] == s["labels"]["unparseable"] == unparseable >= 1
        assert all(c["choice"] == parse_choice(c["answer"]) for c in comparisons)
        # critique -> revision for each of the 6 samples, then 3 comparisons: 15 critic requests, none failed
        assert s["requests"]["critic"]["sent"] == 6 * 2 + 3 and s["skipped"]["failed_requests"] == {}
        assert s["settings"]["critic"] == f"openai:{server.url}/v1@tiny"
        pairs = [json.loads(line) for line in (run / "rlaif" / "pairs.jsonl").read_text().splitlines()]
        assert s["pairs"]["best_vs_worst"] == 3 - unparseable
        assert sum(p["kind"] == "best_vs_worst" for p in pairs) == 3 - unparseable
        assert all(p["critique"] for p in pairs) and s["pairs"]["revision"] > 0
        # a rerun from scratch (--force) pays for no critic answer twice: the cache has them all
        again = run_rlaif(RLAIFConfig(**cfg, force=True), run)
        assert again["requests"]["critic"]["sent"] == 0 and again["requests"]["critic"]["cached"] == 15
        assert again["pairs"] == s["pairs"]
    finally:
        server.stop()
        store.close()


def test_prompts_file_errors(tmp_path):
    from muse.common.errors import DataError

    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"messages": [{"role": "usr", "content": "x"}]}\n')
    with pytest.raises(DataError, match=r"p.jsonl:2: messages\[0\] has role 'usr'"):
        load_prompts(str(bad), None)
    bad.write_text('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n')
    with pytest.raises(DataError, match="p.jsonl:1: the last message must be the user's"):
        load_prompts(str(bad), None)
    bad.write_text('{"prompt": "a"}\n{"prompt": "a"}\n{"prompt": "b"}\n')
    assert [p["prompt"] for p in load_prompts(str(bad), None)] == ["a", "b"]
    assert len(load_prompts(None, 7)) == 7


def test_default_prompts_mix_identity_questions_in():
    # one in five default prompts is an identity question (where the introduction is the answer), evenly spread
    from muse.common.errors import UsageError
    from muse.tasks.constitution import load_constitution

    ps = load_prompts(None, 20)
    kinds = ["identity" if p["id"].startswith("identity") else "compliance" for p in ps]
    assert kinds == (["compliance"] * 4 + ["identity"]) * 4
    assert [p["id"] for p in ps if p["id"].startswith("compliance")] == [s.id for s in tasks.get("compliance").samples("train")[:16]]
    # the sample constitution exempts the identity questions' introduction and asks for it there: every identity
    # and compliance demonstration meets everything (all splits), and an off-topic reply to who-are-you fails
    c, ident = load_constitution(None), tasks.get("identity").samples("train")
    for name in ("identity", "compliance"):
        for split in ("train", "validation", "test"):
            for s in tasks.get(name).samples(split):
                assert c.check(s.target, s.messages[-1]["content"]).passed, s.messages
                if name == "identity":
                    assert c.check("Hamlet is a prince of Denmark.", s.messages[-1]["content"]).failed == [
                        "introduces_itself_when_asked"], s.messages
    # a task runs out: the others fill in; task:NAME alone is the old default
    everything = load_prompts("task:identity=0.9,compliance=0.1", None)
    assert len(everything) == len(ident) + 5000 and len({p["id"] for p in everything}) == len(everything)
    assert all(p["id"].startswith("compliance") for p in load_prompts("task:compliance", 50))
    for spec, message in [("task:complience", "Did you mean: compliance"), ("task:identity=0", "positive number"),
                          ("task:identity,identity", "named twice")]:
        with pytest.raises(UsageError, match=message):
            load_prompts(spec, 5)


def test_cli_pairs_then_dpo_and_bad_input(policy_run, tmp_path, muse):
    run = _copy_run(policy_run, tmp_path)
    common = ["--prompts", str(policy_run / "prompts.jsonl"), "--samples", "2", "--limit", "3", "--max-tokens", "8",
              "--device", "cpu"]
    code, out, err = muse("rlaif", str(run), *common, "--pairs-only")
    assert code == 0, err
    assert "rlaif: 3 prompts (3 this run), 6 samples" in out and "pairs file:" in out and "finished" in out
    code, out, err = muse("rlaif", str(run), *common, "--max-steps", "2", "--set", "batch_tokens=512", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["rlaif"]["prompts_this_run"] == 0 and result["dpo"]["steps"] == 2
    assert (run / "dpo").is_dir()
    bad = tmp_path / "bad.toml"
    bad.write_text('[[principle]]\nname = "x"\ncritique = "c"\nrevision = "r"\ncheck = "nope"\n')
    code, out, err = muse("rlaif", str(run), "--constitution", str(bad), "--pairs-only")
    assert code == 2 and err.count("\n") == 1 and "principle 'x': unknown check 'nope'" in err
    code, out, err = muse("rlaif", str(run), *common, "--samples", "1")
    assert code == 2 and "--samples must be at least 2" in err
    code, out, err = muse("rlaif", str(tmp_path / "nowhere"), "--pairs-only")
    assert code == 2 and "does not exist" in err


def test_compliance_through_muse_eval(policy_run):
    from muse.eval import run_eval

    res = run_eval([f"tiny={policy_run / 'run'}"], "compliance", limit=3, cache=False, device="cpu",
                   show_progress=False)
    r = res.data["results"]["compliance"]["tiny"]
    assert r["status"] == "ok" and r["n"] == 3 and r["n_failed"] == 0
    records = res.records[("tiny", "compliance")]
    task = tasks.get("compliance")
    by_id = {s.id: s for s in task.samples("test")[:3]}
    for rec in records:  # the runner's score is the grader's on the reply it got
        assert rec["score"] == tasks.grade_sample(task, by_id[rec["id"]], rec["output"]).score
        assert rec["reason"]

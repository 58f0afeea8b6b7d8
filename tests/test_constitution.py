"""Principles that read the question as well as the reply: the check interface (`prompt` passed to the checks
that name it, one-argument checks unchanged), `unless_prompt_matches`, the built-in `on_topic` and
`delete_sentences`, and the sample constitution telling a canned reply from an answer wherever it is used
(the compliance task, the reward function, RLAIF's pairs)."""

from __future__ import annotations

import asyncio
import textwrap

import pytest

import muse.tasks as tasks
from muse.posttrain.constitution import (
    ConstitutionError,
    ConstitutionReward,
    load_constitution,
    parse_constitution,
)
from muse.posttrain.rlaif import RLAIFConfig, Worker
from muse.tasks.constitution import CHECKS, FIXES, prompt_text

IDENTITY = "I am Muse, a small language model trained on Shakespeare's plays, made by the Muse authors."


def _toml(body: str) -> str:
    return textwrap.dedent(body).strip() + "\n"


# --- the built-in prompt-reading check and the sentence fix ----------------------------------------------------


@pytest.mark.parametrize("prompt, reply, ok", [
    ("Who is Ophelia?", "Ophelia is Polonius's daughter.", True),
    ("Who is Ophelia?", "Ophelia's father is Polonius.", True),               # possessive: the same name
    ("Who is Ophelia?", IDENTITY, False),
    ("Give me some advice about love.", "Lovers should be patient.", True),   # a stem: love / lovers
    ("Tell me something wise about jealousy.", "Jealous men see monsters.", True),
    ("Quick question: what happens in Hamlet? Thanks!", "The prince takes revenge.", False),
    ("Hi! Is As You Like It a comedy or a tragedy?", "As You Like It is one of the comedies.", True),  # a title of stopwords
    ("What happens in The Tempest?", "The answer is 12.", False),               # "The" of a title is no subject
    ("Who are you?", IDENTITY, True),                                           # no content word: nothing to miss
    ("Hello! How are you?", "Fine.", True),
    ("Is the art of war hard?", "Artful men win.", False),                     # stems need min_letters: art != artful
])
def test_on_topic_wants_a_content_word_of_the_question(prompt, reply, ok):
    result = CHECKS["on_topic"](reply, prompt=prompt)
    assert (result is True) == ok, result
    if not ok:
        assert result[0] == 0.0 and "names nothing the question asks about" in result[1]


def test_delete_sentences_and_prompt_text():
    fix = FIXES["delete_sentences"]
    assert fix("I am Muse. Hamlet is a prince! Is he mad?", pattern="Muse") == "Hamlet is a prince! Is he mad?"
    assert fix("I am Muse, a small language model.", pattern="Muse") == ""
    assert prompt_text([{"role": "system", "content": "s"}, {"role": "user", "content": "first"},
                        {"role": "assistant", "content": "a"}, {"role": "user", "content": "second"}]) == "second"
    assert prompt_text([]) == ""


# --- the check interface ----------------------------------------------------------------------------------------


def test_checks_that_name_prompt_get_it_and_one_argument_checks_keep_working(tmp_path):
    (tmp_path / "rules.py").write_text(textwrap.dedent("""
        def short(text):                                  # the old interface: the reply alone
            return len(text.split()) <= 4
        def echoes(text, prompt, min_shared=1):           # the new one: reads the question
            shared = set(text.lower().split()) & set(prompt.lower().split())
            return (1.0, "ok") if len(shared) >= min_shared else (0.0, f"shares {len(shared)} words")
        def add_question(text, prompt):
            return prompt + " " + text
    """))
    path = tmp_path / "house.toml"
    path.write_text(_toml("""
        [[principle]]
        name = "short"
        critique = "c"
        revision = "r"
        check = "rules:short"
        [[principle]]
        name = "echoes"
        critique = "c"
        revision = "r"
        check = "rules:echoes"
        fix = "rules:add_question"
        options = { min_shared = 2 }
        [[principle]]
        name = "no_oaths"
        critique = "c"
        revision = "r"
        must_not_match = "(?i)zounds"
        unless_prompt_matches = "(?i)swear"
        [[principle]]
        name = "names_the_queen"
        critique = "c"
        revision = "r"
        must_match = "(?i)titania"
        if_prompt_matches = "(?i)queen"
    """))
    c = load_constitution(path)
    assert [p.reads_prompt for p in c.checked] == [False, True, True, True]
    assert c.describe()["reads_prompt"] == ["echoes", "no_oaths", "names_the_queen"]
    v = c.check("the king sleeps", prompt="does the king sleep")
    assert v.passed and v.score == 1.0 and len(v.results) == 4
    v = c.check("zounds, a horse", prompt="does the king sleep")
    assert v.failed == ["echoes", "no_oaths"] and "shares 0 words" in v.reason()
    assert c.check("zounds, the king", prompt="Swear, does the king sleep?").failed == []  # asked to swear
    # if_prompt_matches: judged only where the prompt matches, met elsewhere
    assert c.check("the queen sleeps", prompt="where is the queen").failed == ["names_the_queen"]
    assert c.check("Titania the queen sleeps", prompt="where is the queen").failed == []
    # the fix gets the prompt too
    assert c.revise("a horse", prompt="the king") == "the king a horse"
    # without a prompt the principles that read it cannot be judged: left out, not guessed
    assert [r.principle for r in c.check("zounds, a horse").results] == ["short"]
    assert c.revise("a horse") == "a horse"
    with pytest.raises(ConstitutionError, match="principle 'echoes' reads the prompt"):
        c.get("echoes").run_check("a horse")


@pytest.mark.parametrize("body, message", [
    ('[[principle]]\nname = "a"\ncritique = "c"\nrevision = "r"\nunless_prompt_matches = "x"\n',
     r"principle 'a': unless_prompt_matches limits a check to some prompts; this principle has none"),
    ('[[principle]]\nname = "a"\ncritique = "c"\nrevision = "r"\nmust_match = "x"\nunless_prompt_matches = "(x"\n',
     r"principle 'a': unless_prompt_matches '\(x' is not a valid regular expression"),
    ('[[principle]]\nname = "a"\ncritique = "c"\nrevision = "r"\nif_prompt_matches = "x"\n',
     r"principle 'a': if_prompt_matches limits a check to some prompts; this principle has none"),
    ('[[principle]]\nname = "a"\ncritique = "c"\nrevision = "r"\nmust_match = "x"\nif_prompt_matches = "x["\n',
     r"principle 'a': if_prompt_matches 'x\[' is not a valid regular expression"),
    ('[[principle]]\nname = "a"\ncritique = "c"\nrevision = "r"\nmust_match = "x"\nfix = "delete_sentences"\n',
     r"fix 'delete_sentences' deletes the matches of must_not_match"),
    ('[[principle]]\nname = "a"\ncritique = "c"\nrevision = "r"\ncheck = "on_topic"\noptions = { min_leters = 3 }\n',
     r"principle 'a': check 'on_topic' cannot take options \{'min_leters': 3\}"),
])
def test_bad_prompt_principles_are_one_line_errors(tmp_path, body, message):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(ConstitutionError, match=message) as e:
        load_constitution(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


# --- the sample constitution tells a canned reply from an answer ------------------------------------------------


def test_the_sample_constitution_refuses_the_canned_identity_reply_unless_asked():
    c = load_constitution()
    assert c.check(IDENTITY).passed  # the five reply-only principles cannot tell
    for question in ("What happens in Hamlet?", "Give me some advice about love.", "Tell me a joke."):
        v = c.check(IDENTITY, question)
        assert "no_unasked_introduction" in v.failed and not v.passed, (question, v.reason())
    # "What did Shakespeare say about love?" shares a word with the identity sentence: the introduction
    # principle still catches it
    assert c.check(IDENTITY, "What did Shakespeare say about love?").failed == ["no_unasked_introduction"]
    for question in ("Who are you?", "What is your name?", "Which model am I talking to, the assistant?"):
        assert c.check(IDENTITY, question).passed, question
    # the revision drops the introduction and keeps the answer
    assert c.revise(f"{IDENTITY} Hamlet is a prince.", "Who is Hamlet?") == "Hamlet is a prince."


def test_compliance_task_demonstrations_meet_it_and_the_canned_reply_does_not():
    task = tasks.get("compliance")
    for split in ("test", "validation"):
        for s in task.samples(split):
            assert tasks.grade_sample(task, s, s.demonstration).score == 1.0, (s.messages, s.demonstration)
    test = task.samples("test")[:200]
    asked_about_itself = [s for s in test if "you" in s.messages[0]["content"].lower().split()]
    canned = [tasks.grade_sample(task, s, IDENTITY).score for s in test]
    assert sum(canned) <= len(asked_about_itself) < 20  # passes only where the question is about the model


def test_the_reward_and_rlaif_pairs_prefer_the_answer_over_the_canned_reply():
    from muse.posttrain.rewards import Rollout

    c = load_constitution()
    q = [{"role": "user", "content": "Who is Ophelia?"}]
    reward = ConstitutionReward(None)
    scores = [r.score for r in reward.score([Rollout(tuple(q), IDENTITY), Rollout(tuple(q), "Ophelia is fair.")])]
    assert scores == [pytest.approx(6 / 8), 1.0]

    class Scripted:
        def __init__(self, replies):
            self.replies = list(replies)

        async def chat(self, messages, max_tokens, temperature=0.0, seed=None):
            return self.replies.pop(0)

    replies = [IDENTITY, "Ophelia is Polonius's daughter.", f"{IDENTITY} Ophelia loves Hamlet."]
    rec = asyncio.run(Worker(RLAIFConfig(samples=3), c, Scripted(replies), None)(
        {"id": "p", "messages": q, "prompt": q[0]["content"]}))
    kinds = {(p["kind"], p["chosen"], p["rejected"]) for p in rec["pairs"]}
    assert ("best_vs_worst", "Ophelia is Polonius's daughter.", IDENTITY) in kinds
    assert ("revision", "Ophelia loves Hamlet.", f"{IDENTITY} Ophelia loves Hamlet.") in kinds
    assert len(kinds) == 2  # the canned reply alone: its revision is empty, no pair
    assert [s["failed"] for s in rec["samples"]][0] == ["no_unasked_introduction", "on_topic"]


def test_parse_constitution_without_a_path_reads_prompt_checks_too():
    c = parse_constitution('[[principle]]\nname = "t"\ncritique = "c"\nrevision = "r"\ncheck = "on_topic"\n')
    assert c.check("Hamlet dies.", "What happens to Hamlet?").passed
    assert not c.check("Lear dies.", "What happens to Hamlet?").passed

"""muse.tasks: the registry, the built-in generators (determinism, disjoint splits, chance levels, answers
that their own graders accept), few-shot and prompt assembly, SFT conversations, and task files (the worked
example of docs/eval.md, and bad files whose errors name the line)."""

import json
import random
import shutil
from pathlib import Path

import pytest

import muse.tasks as tasks
from muse.tasks.builtin.common import bucket_of, collect
from muse.tasks.builtin.plays import corpus_lines, play_title
from muse.tasks.spec import Sample, TaskError, TaskFileError

ASSETS = Path(__file__).parent / "assets" / "tasks"
GENERATED = [n for n in tasks.names() if n != "val_bpb"]
SMALL = {"test": 40, "validation": 10, "train": 60}


@pytest.fixture(scope="module")
def builtin():
    """Every built-in task with its default sizes (generated once for the module)."""
    return {t.name: t for t in tasks.all_tasks()}


def test_tasks_import_without_torch():
    import subprocess
    import sys

    code = ("import sys, muse.tasks as t; t.get('arithmetic_1digit', sizes={'test': 5}).samples('test'); "
            "from muse.tasks import contamination; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- registry -------------------------------------------------------------------------------------------------


def test_names_and_get():
    assert tasks.names()[:4] == ["arithmetic_1digit", "arithmetic_2digit", "arithmetic_3digit", "arithmetic_multistep"]
    assert {"spelling", "letter_count", "word_sort", "quote_completion", "which_play", "identity", "val_bpb"} <= set(tasks.names())
    assert tasks.get("spelling").name == "spelling"
    assert [t.name for t in tasks.resolve("spelling, identity")] == ["spelling", "identity"]
    assert [t.name for t in tasks.resolve("all")] == tasks.names()


def test_unknown_task_lists_close_names():
    with pytest.raises(TaskError, match="unknown task 'speling'. Did you mean: spelling") as e:
        tasks.get("speling")
    assert "Built-in tasks: arithmetic_1digit" in str(e.value)
    with pytest.raises(TaskError, match="resolve"):
        tasks.get("all")
    with pytest.raises(TaskError, match="no task named"):
        tasks.resolve(" , ")


def test_unknown_option_and_missing_split():
    with pytest.raises(TaskError, match="no option 'sead'. Did you mean: seed"):
        tasks.get("spelling", sead=1)
    with pytest.raises(TaskError, match="no 'tset' split. Did you mean: test"):
        tasks.get("spelling", sizes=SMALL).samples("tset")
    with pytest.raises(TaskError, match="a bpb task reads"):
        tasks.get("val_bpb").samples("test")
    # all_tasks passes each task only the options it takes
    assert len(tasks.all_tasks(seed=3, profile=None)) == len(tasks.names())


# --- built-in generators ---------------------------------------------------------------------------------------


def test_default_split_sizes(builtin):
    for name in GENERATED:
        sizes = builtin[name].sizes()
        if name == "identity":
            assert sizes == {"test": 264, "validation": 48, "train": 552}
        else:
            assert sizes == {"test": 1000, "validation": 500, "train": 5000}, name


def test_splits_are_disjoint(builtin):
    for name in GENERATED:
        task = builtin[name]
        keys = {split: {s.metadata["key"] for s in task.samples(split)} for split in task.splits}
        ids = {split: {s.id for s in task.samples(split)} for split in task.splits}
        for a in task.splits:
            assert len(keys[a]) == len(task.samples(a)), f"{name}/{a} repeats an item"
            for b in task.splits:
                if a < b:
                    assert not keys[a] & keys[b], f"{name}: {a} and {b} share items"
                    assert not ids[a] & ids[b]


def test_splits_stay_disjoint_across_seeds():
    # The seed picks which items are proposed, never where an item goes.
    for name in ("arithmetic_1digit", "letter_count", "word_sort", "which_play"):
        a, b = tasks.get(name, seed=0, sizes=SMALL), tasks.get(name, seed=1, sizes=SMALL)
        for split in SMALL:
            assert [s.id for s in a.samples(split)] != [s.id for s in b.samples(split)], name
            for other in SMALL:
                if other != split:
                    assert not {s.metadata["key"] for s in a.samples(split)} & {s.metadata["key"] for s in b.samples(other)}


def test_generators_are_deterministic():
    for name in GENERATED:
        first = [s.to_dict() for s in tasks.get(name, sizes=SMALL).samples("test")] if name != "identity" else \
            [s.to_dict() for s in tasks.get(name).samples("test")]
        again = [s.to_dict() for s in tasks.get(name, sizes=SMALL).samples("test")] if name != "identity" else \
            [s.to_dict() for s in tasks.get(name).samples("test")]
        assert first == again, name
        assert json.loads(json.dumps(first)) == first  # plain JSON: a runner can write them as they are


def test_bucket_is_a_function_of_the_key():
    assert {bucket_of("What is 2 plus 2?", "arithmetic") for _ in range(3)} == {bucket_of("What is 2 plus 2?", "arithmetic")}
    counts = {"test": 0, "validation": 0, "train": 0}
    for i in range(20_000):
        counts[bucket_of(str(i), "x")] += 1
    assert abs(counts["test"] / 20_000 - 0.2) < 0.02 and abs(counts["validation"] / 20_000 - 0.1) < 0.02


def test_collect_stops_on_a_small_space():
    proposals = ((str(i % 30), lambda i=i: Sample(id="", prompt=str(i))) for i in range(10**9))
    out = collect(proposals, "tiny", {"test": 1000, "validation": 1000, "train": 1000}, patience=100)
    assert sum(map(len, out.values())) == 30


def test_every_demonstration_passes_its_own_grader(builtin):
    # The answers are verifiable: the worked solution of each item is graded correct, a wrong number is not.
    for name in GENERATED:
        task = builtin[name]
        for sample in task.samples("test"):
            if task.kind == "multiple_choice":
                assert len(sample.choices) == 4 and len(set(sample.choices)) == 4 and 0 <= sample.gold < 4
                continue
            grade = tasks.grade_sample(task, sample, sample.demonstration)
            assert grade.score == 1.0, (name, sample.demonstration, sample.answer, grade)
            assert tasks.grade_sample(task, sample, "").score == 0.0


def test_arithmetic_answers_are_right():
    for sample in tasks.get("arithmetic_multistep", sizes=SMALL).samples("test"):
        work = sample.target.split(". The answer is")[0]
        for step in work.replace(", and ", "; ").split("; "):
            left, right = step.split(" = ")
            assert eval(left.replace("x", "*")) == int(right), step  # noqa: S307 - our own digits
        assert sample.target.endswith(f"The answer is {sample.answer[0]}.")
    for sample in tasks.get("arithmetic_2digit", sizes=SMALL).samples("test"):
        assert int(sample.answer[0]) >= 0 and sample.prompt.startswith("Question: ")


def test_word_tasks_answers():
    for s in tasks.get("spelling", sizes=SMALL).samples("test"):
        assert s.answer[0].replace("-", "") == s.metadata["word"]
    for s in tasks.get("letter_count", sizes=SMALL).samples("test"):
        assert s.metadata["word"].count(s.metadata["letter"]) == int(s.answer[0])
    for s in tasks.get("word_sort", sizes=SMALL).samples("test"):
        words = s.answer[0].split(", ")
        assert words == sorted(words) and 3 <= len(words) <= 6


def test_chance_levels(builtin):
    assert builtin["quote_completion"].chance_level() == 0.25
    assert builtin["which_play"].chance_level() == 0.25
    assert builtin["spelling"].chance_level() == 0.0
    assert builtin["identity"].chance_level() == 0.0
    assert 0.2 < builtin["letter_count"].chance_level() < 0.35  # answers drawn uniform over 0..3
    assert 0.04 < builtin["word_sort"].chance_level() < 0.08  # mean of 1/n!, n uniform over 3..6 (0.054)
    assert builtin["arithmetic_3digit"].chance_level() < builtin["arithmetic_1digit"].chance_level() < 0.15
    riddles = tasks.get(ASSETS / "riddles.jsonl")
    assert riddles.chance_level() == pytest.approx((1 / 3 + 1 / 3 + 1 / 4) / 3)


def test_quote_completion_tests_on_held_out_plays(builtin):
    train_lines, held_out = corpus_lines()
    held_plays = {x.play for x in held_out}
    assert held_plays == {"histories/henry-vi-part-2.md", "romances/cymbeline.md"}  # prepare's defaults
    task = builtin["quote_completion"]
    assert {s.metadata["play"] for s in task.samples("test")} <= held_plays
    for split in ("train", "validation"):
        assert not {s.metadata["play"] for s in task.samples(split)} & held_plays
    sample = task.samples("test")[0]
    full = (sample.prompt.split("\n")[-1] + " " + sample.choices[sample.gold])
    assert full in {x.text for x in held_out}


def test_which_play_asks_about_training_plays_only(builtin):
    task = builtin["which_play"]
    _, held_out = corpus_lines()
    held_titles = {x.title for x in held_out}
    for split in task.splits:
        for s in task.samples(split):
            assert not set(s.choices) & held_titles
    assert task.overlap_expected
    assert play_title("problems/measure-for-measure.md", "ACT I\n\nSCENE I.") == "Measure for Measure"


def test_identity_profile(tmp_path):
    profile = tmp_path / "me.toml"
    profile.write_text('name = "Quill"\nmaker = "the Quill lab"\nname_questions = ["Who are you?"]\n'
                       'maker_questions = ["Who made you?"]\n')
    task = tasks.get("identity", profile=profile)
    samples = [s for split in task.splits for s in task.samples(split)]
    assert len(samples) == 2 * 8 * 3
    assert {s.answer[0] for s in samples} == {"Quill", "the Quill lab"}
    s = next(s for s in samples if s.metadata["topic"] == "maker")
    assert tasks.grade_sample(task, s, "I was built by the Quill Lab.").score == 1.0
    assert tasks.grade_sample(task, s, "I was built by OpenAI.").score == 0.0
    (tmp_path / "bad.toml").write_text('name = ""\nmaker = "x"\n')
    with pytest.raises(TaskFileError, match="'name' must be a non-empty string"):
        tasks.get("identity", profile=tmp_path / "bad.toml")


# --- few-shot and prompts --------------------------------------------------------------------------------------


def test_fewshot_is_deterministic_and_never_the_item_itself():
    task = tasks.get("arithmetic_1digit", sizes=SMALL)
    test = task.samples("test")
    shots = {s.id: [x.id for x in tasks.fewshot_examples(task, s)] for s in test}
    again = {s.id: [x.id for x in tasks.fewshot_examples(task, s)] for s in reversed(test)}
    assert shots == again  # order-independent
    assert all(len(v) == 3 and len(set(v)) == 3 for v in shots.values())
    assert [x.id for x in tasks.fewshot_examples(task, test[0], seed=99)] != shots[test[0].id]
    # Few-shot from the evaluated split itself: never the sample, nor a copy of its prompt.
    pool = task.samples("train")
    for s in pool[:20]:
        picked = tasks.fewshot_examples(task, s, k=5)
        assert s.id not in {x.id for x in picked} and s.prompt not in {x.prompt for x in picked}


def test_fewshot_from_a_tiny_pool(tmp_path):
    task = tasks.get(ASSETS / "capitals.toml")
    sample = task.samples("test")[0]
    assert len(tasks.fewshot_examples(task, sample, k=4)) == 4
    with pytest.raises(TaskError, match="5 few-shot examples asked for, but its 'train' split has only 4"):
        tasks.fewshot_examples(task, sample, k=5)


def test_prompts_and_messages():
    task = tasks.get(ASSETS / "capitals.toml")
    sample = task.samples("test")[0]
    shots = tasks.fewshot_examples(task, sample)
    prompt = tasks.build_prompt(task, sample, shots)
    assert prompt == (f"{shots[0].prompt} {shots[0].answer[0]}\n\n{shots[1].prompt} {shots[1].answer[0]}\n\n"
                      "Q: What is the capital of France?\nA:")
    messages = tasks.build_messages(task, sample, shots)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert messages[1]["content"] == shots[0].answer[0]

    chat = tasks.get(ASSETS / "polite.toml")
    convo = tasks.build_messages(chat, chat.samples()[1])
    assert [m["role"] for m in convo] == ["system", "user", "assistant", "user"]
    with pytest.raises(TaskError, match="use build_messages"):
        tasks.build_prompt(chat, chat.samples()[0])


def test_multiple_choice_requests_and_metrics():
    task = tasks.get(ASSETS / "riddles.jsonl")
    sample = task.samples()[1]
    assert sample.gold == 1  # "gold" may name the choice
    reqs = tasks.multiple_choice_requests(task, sample)
    assert reqs == [("What gets wetter the more it dries? Answer:", " " + c) for c in sample.choices]
    # The short choice wins on the total, the long one per byte: acc and acc_norm disagree.
    short_first = Sample(id="m", prompt="p", choices=("ab", "abcdefgh"), gold=1)
    m = tasks.score_multiple_choice(short_first, [-2.0, -4.0])
    assert m == {"acc": 0.0, "acc_norm": 1.0, "pred": 0, "pred_norm": 1}
    assert tasks.score_multiple_choice(short_first, [-3.0, -3.0])["pred"] == 0  # ties go to the first
    with pytest.raises(ValueError):
        tasks.score_multiple_choice(short_first, [-1.0])
    assert tasks.bits_per_byte(8 * 0.6931471805599453, 4) == pytest.approx(2.0)


def test_train_conversations_render_as_chats():
    from muse.tokenizer import render_chat, train_bpe

    tok = train_bpe(["the quick brown fox jumps over the lazy dog " * 20], vocab_size=300)
    for name in GENERATED:
        task = tasks.get(name, sizes=SMALL) if name != "identity" else tasks.get(name)
        rows = list(tasks.train_conversations(task))
        assert len(rows) == len(task.samples("train")), name
        for row in rows[:5]:
            assert set(row) == {"messages"}
            assert row["messages"][-1]["role"] == "assistant" and row["messages"][-1]["content"]
            ids, mask = render_chat(tok, row["messages"])
            assert sum(mask) > 0
    polite = tasks.get(ASSETS / "polite.toml")
    assert list(tasks.train_conversations(polite, "test")) == []  # nothing to demonstrate


# --- task files ----------------------------------------------------------------------------------------------


def test_the_worked_example_loads():
    task = tasks.get(str(ASSETS / "capitals.toml"))
    assert (task.name, task.kind, task.splits) == ("capitals", "generate", ("test", "train"))
    assert task.generation.stop == ("\n",) and task.generation.max_tokens == 16 and task.fewshot.k == 2
    assert task.sizes() == {"test": 5, "train": 4}
    ci = task.samples()[2]
    assert ci.answer == ("Yamoussoukro", "Abidjan") and ci.metadata == {"note": "Abidjan is the seat of government"}
    assert task.samples()[4].metadata == {"region": "Europe"}  # unknown fields are kept as metadata
    assert tasks.grade_sample(task, ci, " Abidjan.").score == 1.0
    assert tasks.get(ASSETS / "notes_bpb.toml").data == str(ASSETS / "notes.txt")
    assert tasks.get(ASSETS / "polite.toml").grader.options["word"] == "please"


def _copy(tmp_path, *names):
    for name in names:
        shutil.copy(ASSETS / name, tmp_path / name)
    return tmp_path


def _write(path: Path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("rows, message", [
    (['{"prompt": "a", "answer": "b"}', '{"prompt": "c", "answer": "d"', '{}'], r"capitals_test.jsonl:2: not valid JSON"),
    (['{"prompt": "a", "answer": "b"}', '', '{"prompt": "c", "anwser": "d"}'],
     r"capitals_test.jsonl:3: no 'answer' field. Did you mean: anwser\?"),
    (['{"promt": "a", "answer": "b"}'], r"capitals_test.jsonl:1: no 'prompt' field .*Did you mean: promt"),
    (['[1, 2]'], r"capitals_test.jsonl:1: expected a JSON object, got list"),
    (['{"prompt": "a", "answer": true}'], r":1: answer is a boolean"),
    (['{"prompt": 3, "answer": "b"}'], r":1: 'prompt' must be a string"),
    (['{"id": "x", "prompt": "a", "answer": "b"}', '{"id": "x", "prompt": "c", "answer": "d"}'],
     r":2: id 'x' already used on line 1"),
    (['{"prompt": "a", "context": "b", "answer": "c"}'], r":1: give 'prompt' or its alias 'context'"),
    (['{"messages": [{"role": "usr", "content": "hi"}], "answer": "x"}'], r":1: messages\[0\] has role 'usr'.*Did you mean: user"),
    ([''], r"capitals_test.jsonl: no samples"),
    (['{"task": {"kind": "generate"}}', '{"prompt": "a", "answer": "b"}'], r":1: a task header here"),
])
def test_bad_sample_files_name_the_line(tmp_path, rows, message):
    _copy(tmp_path, "capitals.toml", "capitals_train.jsonl")
    _write(tmp_path / "capitals_test.jsonl", rows)
    with pytest.raises(TaskFileError, match=message):
        tasks.get(tmp_path / "capitals.toml")


@pytest.mark.parametrize("toml, message", [
    ('kind = "generat"\n[splits]\ntest = "t.jsonl"', r"unknown kind 'generat'. Did you mean: generate"),
    ('[splits]\ntest = "t.jsonl"', r"no 'kind'"),
    ('kind = "generate"\nstopp = 1\n[splits]\ntest = "t.jsonl"', r"unknown task setting 'stopp'"),
    ('kind = "generate"\n[generation]\nstops = ["x"]\n[splits]\ntest = "t.jsonl"', r"unknown \[generation\] key 'stops'. Did you mean: stop"),
    ('kind = "generate"\n[generation]\nmax_tokens = 0\n[splits]\ntest = "t.jsonl"', r"max_tokens must be an integer >= 1"),
    ('kind = "generate"\n[splits]\ntest = "missing.jsonl"', r"no such file"),
    ('kind = "generate"\n[splits]\ntset = "t.jsonl"', r"unknown split 'tset'. Did you mean: test"),
    ('kind = "generate"', r"no test split"),
    ('kind = "generate"\ngrader = "exakt"\n[splits]\ntest = "t.jsonl"', r"unknown grader 'exakt'"),
    ('kind = "generate"\ngrader = "nowhere_mod:fn"\n[splits]\ntest = "t.jsonl"', r"cannot import module 'nowhere_mod'"),
    ('kind = "multiple_choice"\ngrader = "exact"\n[splits]\ntest = "t.jsonl"', r"scored by log-likelihood"),
    ('kind = "generate"\n[fewshot]\nk = 2\n[splits]\ntest = "t.jsonl"', r"takes examples from the 'train' split"),
    ('kind = "generate"\nchance = 2\n[splits]\ntest = "t.jsonl"', r"chance must be a number in \[0, 1\]"),
    ('kind = "bpb"\ndata = "nothing.txt"', r"no such file"),
    ('kind = "generate"\nsystem = 3\n[splits]\ntest = "t.jsonl"', r"system must be a string"),
    ('kind = "generate"\n[generation]\ntemperature = "hot"\n[splits]\ntest = "t.jsonl"', r"temperature must be a number"),
    ('kind = "generate"\ngrader = {type = "python", function = ["x"]}\n[splits]\ntest = "t.jsonl"', r"named 'module:function'"),
    ('kind = "generate"\n[splits\ntest = "t.jsonl"', r"not valid TOML: .*line 2"),
])
def test_bad_task_settings(tmp_path, toml, message):
    _write(tmp_path / "t.jsonl", ['{"prompt": "a", "answer": "b"}'])
    (tmp_path / "task.toml").write_text(toml + "\n")
    with pytest.raises(TaskFileError, match=message) as e:
        tasks.get(tmp_path / "task.toml")
    assert str(tmp_path / "task.toml") in str(e.value)


def test_bad_multiple_choice_rows(tmp_path):
    cases = [
        ('{"context": "q", "choices": ["a"], "gold": 0}', "at least two strings"),
        ('{"context": "q", "choices": ["a", "b"], "gold": 2}', "'gold' must be an index 0..1"),
        ('{"context": "q", "choices": ["a", "b"], "gold": "c"}', "'gold' must be an index"),
        ('{"context": "q", "choices": ["a", "b"]}', "no 'gold' field"),
    ]
    for row, message in cases:
        path = _write(tmp_path / "mc.jsonl", ['{"task": {"kind": "multiple_choice"}}', row])
        with pytest.raises(TaskFileError, match=rf"mc.jsonl:2: .*{message}"):
            tasks.get(path)


def test_jsonl_task_files(tmp_path):
    with pytest.raises(TaskFileError, match=r"plain.jsonl:1: a .jsonl task starts with a header line"):
        tasks.get(_write(tmp_path / "plain.jsonl", ['{"prompt": "a", "answer": "b"}']))
    with pytest.raises(TaskFileError, match=r"chat.jsonl:2: the last message is the assistant's"):
        tasks.get(_write(tmp_path / "chat.jsonl", [
            '{"task": {"kind": "chat"}}',
            '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "answer": "x"}',
        ]))
    judged = tasks.get(_write(tmp_path / "judged.jsonl", [
        '{"task": {"kind": "chat", "grader": {"type": "judge", "rubric": "Is kind."}}}',
        '{"messages": [{"role": "user", "content": "Comfort me."}]}',  # no answer needed for a judge
    ]))
    assert judged.grader.type == "judge" and judged.samples()[0].answer == ()
    with pytest.raises(TaskFileError, match=r"\.yaml"):
        tasks.get(_write(tmp_path / "task.yaml", ["kind: generate"]))
    with pytest.raises(TaskFileError, match="no such task file"):
        tasks.get(tmp_path / "missing.toml")


def test_sample_round_trip(tmp_path):
    rng = random.Random(0)
    task = tasks.get("which_play", sizes=SMALL)
    rows = [s.to_dict() for s in task.samples("test")]
    rng.shuffle(rows)
    path = _write(tmp_path / "wp.jsonl", [json.dumps({"task": {"kind": "multiple_choice"}})] + [json.dumps(r) for r in rows])
    loaded = {s.id: s for s in tasks.get(path).samples()}
    for r in rows:
        assert loaded[r["id"]].to_dict() == r

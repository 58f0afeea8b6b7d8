"""Every grader on hand-written edge cases: unicode, numbers with separators, empty output, a stop string at
the first token, negative numbers, the answer-marker convention; custom and judge graders; bad specs."""

from fractions import Fraction
from pathlib import Path

import pytest

from muse.tasks.graders import (
    Grade,
    check_grader,
    extract_number,
    find_numbers,
    grade_contains,
    grade_exact,
    grade_numeric,
    grade_output,
    grade_regex,
    load_python_grader,
    normalize_text,
    truncate_at_stop,
)
from muse.tasks.judge import grade_judge, judge_prompt, parse_verdict
from muse.tasks.spec import GraderError, GraderSpec, Sample, TaskError

ASSETS = Path(__file__).parent / "assets" / "tasks"


# --- normalisation and exact match --------------------------------------------------------------------


def test_normalize_text_steps():
    assert normalize_text("  The  Quick, brown FOX! ") == "quick brown fox"
    assert normalize_text("Ｐａｒｉｓ") == "paris"  # fullwidth -> ASCII (NFKC)
    assert normalize_text("ﬁnal") == "final"  # ligature (NFKC)
    assert normalize_text("STRASSE") == normalize_text("straße")  # casefold, not lower()
    assert normalize_text("n-i-g-h-t") == "n i g h t"  # punctuation becomes a space, letters stay apart
    assert normalize_text("«Bonjour» — dit-il") == "bonjour dit il"  # unicode punctuation
    assert normalize_text("The End", ignore_case=False, ignore_articles=True) == "End"
    assert normalize_text("a b c", ignore_articles=False) == "a b c"


@pytest.mark.parametrize("output, answers, score", [
    ("Paris", ["paris"], 1.0),
    (" the Paris. ", ["Paris"], 1.0),
    ("PARIS!!", ["Paris"], 1.0),
    ("Paris, France", ["Paris"], 0.0),
    ("café", ["CAFÉ"], 1.0),
    ("cafe", ["café"], 0.0),  # accents are letters: NFKC keeps them
    ("Ｔｏｋｙｏ", ["Tokyo"], 1.0),
    ("Abidjan", ["Yamoussoukro", "Abidjan"], 1.0),
    ("?", ["?"], 1.0),  # an answer that normalises to nothing is compared with its punctuation kept
    ("yes", ["?"], 0.0),
    ("!", ["?"], 0.0),
])
def test_exact(output, answers, score):
    assert grade_exact(output, answers).score == score


def test_exact_empty_output_and_no_answer():
    assert grade_exact("", ["x"]) == Grade(0.0, "empty output")
    assert grade_exact("   \n", ["x"]).reason == "empty output"
    assert grade_exact("x", []).score == 0.0 and "no answer" in grade_exact("x", []).reason


def test_exact_spelling_keeps_articles_when_told():
    # "a" is a letter of "apple", not an article: the spelling task switches article removal off
    assert grade_exact("a-p-p-l-e", ["a-p-p-l-e"], ignore_articles=False).score == 1.0
    assert grade_exact("A P P L E.", ["a-p-p-l-e"], ignore_articles=False).score == 1.0
    assert grade_exact("p-p-l-e", ["a-p-p-l-e"], ignore_articles=False).score == 0.0
    assert grade_exact("apple", ["a-p-p-l-e"], ignore_articles=False).score == 0.0


# --- numbers --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, value", [
    ("42", 42),
    ("1,234", 1234),
    ("1,234,567.25", Fraction(123456725, 100)),
    ("1 234", 1234),
    ("1\u00a0234", 1234),  # no-break space
    ("1\u202f234\u202f567", 1234567),  # narrow no-break space, used consistently
    ("1,234 567", 567),  # mixed separators: two numbers, the last one taken
    ("-3.50", Fraction(-7, 2)),
    ("\u22125", -5),  # the Unicode minus sign
    ("$12", 12),
    ("-$12", -12),
    ("costs €1,000", 1000),
    ("12.", 12),  # a sentence's period, not a decimal point
    (".5", Fraction(1, 2)),
    ("3/4", Fraction(3, 4)),
    ("50%", 50),
    ("１２", 12),  # fullwidth digits
    ("٣", 3),  # Arabic-Indic digit
    ("1,2,3", 3),  # a list: the last number
    ("12 345", 12345),
    ("1, 234", 234),  # a comma and a space is a list, not a separator
    ("2-3", 3),  # a range, not minus three
    ("x = -3", -3),
    ("1e5", 1),  # scientific notation is not read
])
def test_extract_number(text, value):
    got = extract_number(text)
    assert got is not None and got.value == value, (text, got)


def test_extract_number_conventions():
    assert extract_number("the answer is 12. Next question 13").value == 12
    assert extract_number("The answer is: 12. Next question 13").value == 12
    assert extract_number("I had 5 apples and ate 2, so 3 remain").value == 3  # no marker: last number
    assert extract_number("2 + 3 = 5").value == 5
    assert extract_number("#### 72").value == 72
    assert extract_number("Answer: -7 (or so)").value == -7
    assert extract_number("answer is unknown, but 4 is likely").value == 4  # marker with no number after
    assert extract_number("no digits here") is None
    assert extract_number("") is None
    assert extract_number("H2O and x2") is None  # digits inside words are not numbers
    assert extract_number("1/0") is None  # a zero denominator is not a number
    assert [v for _, v, _ in find_numbers("from 3 to -4, then 1,000")] == [3, -4, 1000]


def test_numeric_grader():
    assert grade_numeric("The answer is 1,234.", ["1234"]).score == 1.0
    assert grade_numeric("It costs $12.", ["12"]).score == 1.0
    assert grade_numeric("-3.50", ["-3.5"]).score == 1.0
    assert grade_numeric("3.5", ["-3.5"]).score == 0.0
    assert grade_numeric("the answer is 12. Next question 13", ["12"]).score == 1.0
    assert grade_numeric("the answer is 12. Next question 13", ["13"]).score == 0.0
    assert grade_numeric("0.75", ["3/4"]).score == 1.0
    assert grade_numeric("3.14159", ["3.14"]).score == 0.0
    assert grade_numeric("3.14159", ["3.14"], abs_tol=0.01).score == 1.0
    assert grade_numeric("1010", ["1000"], rel_tol=0.02).score == 1.0
    assert grade_numeric("1030", ["1000"], rel_tol=0.02).score == 0.0
    assert grade_numeric("7", ["6", "7"]).score == 1.0  # any of several answers
    g = grade_numeric("I count 13", ["12"])
    assert g.score == 0.0 and "'13'" in g.reason and "12" in g.reason and "last number" in g.reason


def test_numeric_grader_empty_and_wordy_outputs():
    assert grade_numeric("", ["12"]) == Grade(0.0, "empty output")
    g = grade_numeric("twelve", ["12"])
    assert g.score == 0.0 and "no number" in g.reason
    with pytest.raises(TaskError, match="holds no number"):
        grade_numeric("12", ["twelve"])


def test_stop_string_at_the_first_token():
    # The model's first token is the stop string: nothing is left to grade, and every grader says so.
    output = truncate_at_stop("\n\nQuestion: what is 2 + 2?\nAnswer: 4", ["\n\n"])
    assert output == ""
    for grade in (grade_exact(output, ["4"]), grade_numeric(output, ["4"]), grade_contains(output, ["4"]),
                  grade_regex(output, ["4"], pattern=r"(\d+)")):
        assert grade == Grade(0.0, "empty output")


def test_truncate_at_stop():
    assert truncate_at_stop("12\nQuestion: 13", ["\n"]) == "12"
    assert truncate_at_stop("a END b STOP c", ["STOP", "END"]) == "a "  # the earliest stop wins
    assert truncate_at_stop("no stop here", ["\n", ""]) == "no stop here"  # an empty stop is ignored
    assert truncate_at_stop(truncate_at_stop("x\ny", ["\n"]), ["\n"]) == "x"  # idempotent


# --- contains and regex -----------------------------------------------------------------------------------


def test_contains():
    assert grade_contains("Hello! I am Muse, a model.", ["Muse"]).score == 1.0
    assert grade_contains("I like museums", ["Muse"]).score == 0.0  # whole words only
    assert grade_contains("Made by the Muse authors.", ["the Muse authors"]).score == 1.0
    assert grade_contains("MUSE AUTHORS made me", ["the Muse authors"]).score == 1.0
    assert grade_contains("I am Muse", ["Muse", "Muse authors"], require_all=True).score == 0.0
    assert grade_contains("Muse, by the Muse authors", ["Muse", "Muse authors"], require_all=True).score == 1.0
    assert grade_contains("", ["Muse"]).reason == "empty output"
    assert grade_contains("Ｍｕｓｅ here", ["muse"]).score == 1.0


def test_regex():
    out = "Working... ANSWER: 12\nANSWER: 14"
    assert grade_regex(out, ["12"], pattern=r"ANSWER: (\d+)").score == 1.0
    assert grade_regex(out, ["14"], pattern=r"ANSWER: (\d+)", match="last").score == 1.0
    assert grade_regex(out, ["14"], pattern=r"answer: (\d+)", ignore_case=True, match="last").score == 1.0
    assert grade_regex("ANSWER: 1,400", ["1400"], pattern=r"ANSWER: ([\d,]+)", compare="numeric").score == 1.0
    assert grade_regex("ANSWER: 1,400", ["1400"], pattern=r"ANSWER: ([\d,]+)").score == 0.0  # exact: "1 400"
    assert grade_regex("[[yes]]", [], pattern=r"\[\[(yes|no)\]\]", compare="match").score == 1.0
    g = grade_regex("nothing", ["1"], pattern=r"ANSWER: (\d+)")
    assert g.score == 0.0 and "does not match" in g.reason
    g = grade_regex("B", ["B"], pattern=r"(A)|(B)", group=1)
    assert g.score == 0.0 and "captured nothing" in g.reason
    assert grade_regex("B", ["B"], pattern=r"(A)|(B)", group=2).score == 1.0


# --- python graders ---------------------------------------------------------------------------------------


def test_python_grader_next_to_the_task_file():
    sample = Sample(id="s")
    spec = GraderSpec("python", {"function": "polite_grader:says_please", "word": "thanks"})
    check_grader(spec, ASSETS)
    assert grade_output(spec, "Thanks a lot", sample, base_dir=ASSETS) == Grade(1.0, "says 'thanks'")
    assert grade_output(spec, "Go away", sample, base_dir=ASSETS).score == 0.0


def test_python_grader_from_an_importable_module(tmp_path, monkeypatch):
    (tmp_path / "muse_test_onpath_grader.py").write_text(
        "def grade(output, sample, **options):\n    return float(output == sample.answer[0]), 'compared'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = GraderSpec("python", {"function": "muse_test_onpath_grader:grade"})
    check_grader(spec)  # no base_dir: found on sys.path
    assert grade_output(spec, "7", Sample(id="x", answer=("7",))) == Grade(1.0, "compared")


@pytest.mark.parametrize("ref, message", [
    ("no_colon", "module:function"),
    ("a:b:c", "module:function"),
    (":f", "module:function"),
    ("no_such_module_xyz:grade", "cannot import module 'no_such_module_xyz'"),
    ("polite_grader:says_pleese", "has no function 'says_pleese'. Did you mean: says_please"),
    ("os:sep", "is a str, not a function"),
    ("os.path:basename", "cannot be called as basename(output, sample"),
])
def test_python_grader_errors(ref, message):
    with pytest.raises(GraderError, match=message.replace("(", r"\(")):
        load_python_grader(ref, ASSETS)


def test_python_grader_bad_return(tmp_path):
    (tmp_path / "bad_grader.py").write_text("def grade(output, sample):\n    return 'yes'\n\n"
                                            "def nan(output, sample):\n    return float('nan')\n\n"
                                            "def flag(output, sample):\n    return output == 'ok'\n")
    sample = Sample(id="x")
    with pytest.raises(GraderError, match="returned str"):
        grade_output(GraderSpec("python", {"function": "bad_grader:grade"}), "x", sample, base_dir=tmp_path)
    with pytest.raises(GraderError, match="finite"):
        grade_output(GraderSpec("python", {"function": "bad_grader:nan"}), "x", sample, base_dir=tmp_path)
    assert grade_output(GraderSpec("python", {"function": "bad_grader:flag"}), "ok", sample, base_dir=tmp_path).score == 1.0


def test_python_grader_that_raises_on_import(tmp_path):
    (tmp_path / "broken_grader.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(GraderError, match="RuntimeError: boom"):
        load_python_grader("broken_grader:grade", tmp_path)


# --- judge --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reply, score", [
    ("The response is polite.\nVERDICT: PASS", 1.0),
    ("It is rude.\nVERDICT: FAIL", 0.0),
    ("**Verdict:** pass", 1.0),
    ("Format: `VERDICT: PASS` or `VERDICT: FAIL`.\nThinking... VERDICT: FAIL", 0.0),  # the last one counts
    ("Reasoning here.\n\nPASS", 1.0),  # a bare verdict as the last line
    ("I cannot decide.", 0.0),
    ("", 0.0),
])
def test_parse_pass_fail(reply, score):
    assert parse_verdict(reply).score == score


def test_parse_unreadable_verdict_says_so():
    g = parse_verdict("The response seems fine to me overall.")
    assert g.score == 0.0 and g.reason.startswith("no verdict")


@pytest.mark.parametrize("reply, score", [
    ("SCORE: 10", 1.0),
    ("SCORE: 1", 0.0),
    ("Good answer. Score: 7", 6 / 9),
    ("I'd give it 8/10.", 7 / 9),
    ("score = 4 / 10", 3 / 9),
])
def test_parse_scores(reply, score):
    assert parse_verdict(reply, "1-10").score == pytest.approx(score)


def test_parse_scores_out_of_range_or_missing():
    assert parse_verdict("SCORE: 11", "1-10").reason.startswith("judge score 11 is outside")
    assert parse_verdict("SCORE: 0", "1-10").score == 0.0
    assert parse_verdict("great", "1-10").reason.startswith("no score")


def test_judge_prompt_and_grade():
    sample = Sample(id="j", messages=({"role": "user", "content": "Ask for the salt."},), answer=("Please pass the salt.",))
    asked = []

    def ask(prompt):
        asked.append(prompt)
        return "Polite enough.\nVERDICT: PASS"

    g = grade_judge("Could you pass the salt, please?", sample, ask, rubric="The reply is a polite request.")
    assert g.score == 1.0 and "PASS" in g.reason
    prompt = asked[0]
    for part in ("The reply is a polite request.", "user: Ask for the salt.", "Please pass the salt.",
                 "Could you pass the salt, please?", "VERDICT: PASS"):
        assert part in prompt
    assert grade_judge("", sample, ask, rubric="r") == Grade(0.0, "empty output") and len(asked) == 1
    with pytest.raises(GraderError, match="judge model"):
        grade_judge("x", sample, None, rubric="r")
    assert "SCORE: n" in judge_prompt("r", "q", "resp", scale="1-10")


def test_judge_through_grade_output():
    spec = GraderSpec("judge", {"rubric": "Says hello.", "scale": "1-10"})
    check_grader(spec)
    g = grade_output(spec, "hello", Sample(id="x", prompt="Greet me."), ask=lambda p: "SCORE: 10")
    assert g.score == 1.0


# --- specs checked at load time -------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, message", [
    (GraderSpec("exakt"), "unknown grader 'exakt'. Did you mean: exact"),
    (GraderSpec("exact", {"ignore_cases": True}), "no option 'ignore_cases'. Did you mean: ignore_case"),
    (GraderSpec("numeric", {"abs_tol": -1}), "abs_tol must be a number >= 0"),
    (GraderSpec("regex"), "needs pattern"),
    (GraderSpec("regex", {"pattern": "(unclosed"}), "does not compile"),
    (GraderSpec("regex", {"pattern": "(a)", "group": 2}), "group 2 does not exist"),
    (GraderSpec("regex", {"pattern": "a", "match": "middle"}), "'first' or 'last'"),
    (GraderSpec("regex", {"pattern": "a", "compare": "fuzzy"}), "exact, numeric or match"),
    (GraderSpec("python"), "needs function"),
    (GraderSpec("judge"), "needs rubric"),
    (GraderSpec("judge", {"rubric": "r", "scale": "1-5"}), "judge scale must be one of"),
])
def test_check_grader_errors(spec, message):
    with pytest.raises(TaskError, match=message.replace("(", r"\(")):
        check_grader(spec)

"""The contamination check: 13-gram overlap of test items with training rows and with a run's token shards
(documents spanning shards, windows never spanning documents), short and whole-item rules, the report."""

import random

import numpy as np
import pytest

import muse.tasks as tasks
from muse.tasks import contamination
from muse.tasks.contamination import check_contamination, item_text, shard_documents, text_of, words_of
from muse.tasks.spec import Sample, Task, TaskError

VOCAB = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu amber birch cedar dune ember "
         "fern grove heath iris jade knoll larch moss nettle oak pine quartz reed sage thorn vale willow").split()


def _text(rng, n):
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def _task(items, name="t", whole=False, kind="generate") -> Task:
    samples = [Sample(id=f"i{k}", prompt=text, answer=("x",)) for k, text in enumerate(items)]
    return Task(name=name, kind=kind, splits=("test",), loader=lambda split: samples, overlap_whole_item=whole)


def test_words_are_normalised():
    assert words_of("The KING's  sword, Ｏ!") == ["the", "king", "s", "sword", "o"]
    assert words_of("") == []


def test_item_text():
    assert item_text(Sample(id="a", prompt="Question: two?\nAnswer:", messages=({"role": "user", "content": "two?"},))) == "two?"
    assert item_text(Sample(id="b", prompt="To be, or not", choices=("to be", "a fish"), gold=0)) == "To be, or not to be"
    assert item_text(Sample(id="c", prompt="raw prompt", answer=("a",))) == "raw prompt"
    assert item_text(Sample(id="d", prompt="p", metadata={"overlap_text": "just this"})) == "just this"
    convo = ({"role": "system", "content": "sys"}, {"role": "user", "content": "u1"},
             {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"})
    assert item_text(Sample(id="e", messages=convo)) == "u1 a1 u2"


def test_text_of_rows():
    assert text_of("plain") == "plain"
    assert text_of({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) == "a\nb"
    assert text_of({"prompt": "p", "chosen": "c", "score": 3}) == "p\nc"
    with pytest.raises(TaskError):
        text_of(42)


def test_thirteen_gram_overlap_with_training_rows():
    rng = random.Random(0)
    item = _text(rng, 30)
    words = item.split()
    copied = " ".join(words[5:18])  # 13 words of the item
    near = " ".join(words[5:17])  # 12 words: not enough
    clean = _text(rng, 30)
    task = _task([item, clean])
    shouted = "Some preamble. " + copied.upper().replace(" ", ",  ") + " and more."
    [report] = check_contamination([task], texts=[shouted])
    assert (report.items, report.checked, report.too_short, report.contaminated) == (2, 2, 0, 1)
    assert report.examples == [{"id": "i0", "ngram": copied, "source": "texts[0]"}]
    assert report.rate == 0.5 and report.to_dict()["rate"] == 0.5
    [report] = check_contamination([task], texts=[near, {"messages": [{"role": "user", "content": near}]}])
    assert report.contaminated == 0


def test_short_items_are_checked_whole_or_not_at_all():
    rng = random.Random(1)
    ten, five = _text(rng, 10), _text(rng, 5)
    task = _task([ten, five])
    [r] = check_contamination([task], texts=["x " + " ".join(ten.split()[:9])])  # 9 of 10 words
    assert (r.checked, r.too_short, r.contaminated) == (1, 1, 0)
    [r] = check_contamination([task], texts=[f"before {ten} after {five}"])
    assert r.contaminated == 1 and r.examples[0]["id"] == "i0"  # the 5-word item is never checked
    [r] = check_contamination([task], texts=[f"{ten}"], min_words=5)
    assert (r.checked, r.too_short) == (2, 0)


def test_whole_item_mode_ignores_shared_template():
    # Two templated questions share a 13-word stretch; only a whole copy counts.
    a = "Viola picked 3 pears in the morning and 8 pears in the afternoon how many pears did Viola pick"
    b = "Viola picked 4 pears in the morning and 8 pears in the afternoon how many pears did Viola pick"
    [by_grams] = check_contamination([_task([a])], texts=[b])
    [whole] = check_contamination([_task([a], whole=True)], texts=[b])
    [copied] = check_contamination([_task([a], whole=True)], texts=[f"Q: {a}? A: 11"])
    assert (by_grams.contaminated, whole.contaminated, copied.contaminated) == (1, 0, 1)


def test_reports_per_task_and_errors():
    rng = random.Random(2)
    items = [_text(rng, 20) for _ in range(3)]
    reports = check_contamination([_task(items[:2], "a"), _task(items[2:], "b"), tasks.get("val_bpb")],
                                  texts=[items[1], items[2]], max_examples=1)
    assert [(r.task, r.items, r.contaminated, len(r.examples)) for r in reports] == [("a", 2, 1, 1), ("b", 1, 1, 1), ("val_bpb", 0, 0, 0)]
    assert reports[0].sources == ["texts"]
    with pytest.raises(TaskError, match="nothing to check against"):
        check_contamination([_task(items)])
    with pytest.raises(TaskError, match="min_words"):
        check_contamination([_task(items)], texts=[], min_words=20)


def test_builtin_test_splits_are_clean_against_their_own_train_data():
    small = {"test": 200, "validation": 20, "train": 1000}
    chosen = [tasks.get(n, sizes=small) for n in ("arithmetic_1digit", "letter_count", "word_sort", "quote_completion")]
    chosen.append(tasks.get("identity"))
    rows = [row for t in chosen for row in tasks.train_conversations(t)]
    for r in check_contamination(chosen, texts=rows):
        assert r.contaminated == 0, (r.task, r.examples)


def test_which_play_overlap_is_expected_and_found():
    from muse.tasks.builtin.plays import corpus_lines

    task = tasks.get("which_play", sizes={"test": 50, "validation": 5, "train": 5})
    train_lines, held_out = corpus_lines()
    by_play: dict[str, list[str]] = {}
    for x in train_lines:
        by_play.setdefault(x.play, []).append(x.text)
    [r] = check_contamination([task], texts=["\n".join(v) for v in by_play.values()])
    assert r.contaminated == r.checked == 50 and r.overlap_expected
    quote = tasks.get("quote_completion", sizes={"test": 50, "validation": 5, "train": 5})
    [r] = check_contamination([quote], texts=["\n".join(v) for v in by_play.values()])
    assert r.contaminated == 0  # its test lines come from the held-out plays
    [r] = check_contamination([quote], texts=["\n".join(x.text for x in held_out)])
    assert r.contaminated > 40  # and are found there (a few have no previous line in the same speech)


# --- token shards ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shard_run(tmp_path_factory):
    """A data directory: tokenizer.json and train shards of 3 documents, 500 tokens a shard (documents
    cross shard boundaries), plus the documents' texts."""
    from muse.data.shards import ShardWriter
    from muse.tokenizer import train_bpe

    rng = random.Random(3)
    docs = [" ".join(_text(rng, 12) + "." for _ in range(40)) for _ in range(3)]
    tok = train_bpe(docs, vocab_size=320)
    data = tmp_path_factory.mktemp("run") / "data"
    data.mkdir()
    tok.save(data / "tokenizer.json")
    with ShardWriter(data, "train", tok.vocab_size, max_tokens=500) as w:
        for doc in docs:
            w.write(np.array([tok.eot_id, *tok.encode(doc)]))
    assert len(w.shards) > 2
    return data, docs, tok


def test_shard_documents_decode_every_document(shard_run):
    data, docs, _ = shard_run
    assert list(shard_documents(data.parent)) == [words_of(d) for d in docs]  # a run dir or its data/


def test_chunked_decoding_matches_whole(shard_run, monkeypatch):
    data, docs, tok = shard_run
    monkeypatch.setattr(contamination, "_CHUNK_TOKENS", 7)
    assert list(shard_documents(data)) == [words_of(d) for d in docs]


def test_overlap_with_shards(shard_run):
    data, docs, _ = shard_run
    a, b = words_of(docs[0]), words_of(docs[1])
    inside = " ".join(a[100:115])
    across = " ".join(a[-7:] + b[:7])  # spans two documents: never a match
    rng = random.Random(4)
    task = _task([inside, across, _text(rng, 20)])
    [r] = check_contamination([task], data_dir=data)
    assert r.contaminated == 1 and r.examples[0]["id"] == "i0" and r.examples[0]["source"] == "train document 0"
    assert r.sources == [f"{data} (train shards)"]
    [r] = check_contamination([task], texts=[docs[2]], data_dir=data)
    assert r.sources == ["texts", f"{data} (train shards)"]

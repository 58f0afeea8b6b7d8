"""Training a byte-level BPE tokenizer (HF `tokenizers`) and choosing its vocab size.

The pipeline, in the order text flows through it:
  no normalizer   -> the text is never changed, so decoding gives back exactly what was encoded;
  split regex     -> cuts text into pieces that merges may not cross (SPLIT_PATTERN below);
  ByteLevel       -> each piece becomes UTF-8 bytes, spelled as printable stand-in characters;
  BPE model       -> merges learned from the corpus; specials at ids 0..15, then the 256 bytes, then merges;
  ByteLevel decoder -> back from stand-in characters to bytes to text.

This module knows how to build and train that pipeline. It does not know about files, shards or chat.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from muse.common.errors import TokenizerError
from muse.common.logging import get_logger
from muse.tokenizer.special import MIN_VOCAB_SIZE, SPECIAL_TOKENS
from muse.tokenizer.tokenizer import Tokenizer

# The GPT-4 (cl100k) split, which Llama 3 also uses. Merges never cross a piece boundary, so this
# regex decides what a token *can* be. Alternatives, left to right (Oniguruma syntax; `?+`/`++` are
# possessive, so the engine never backtracks into them):
#   '(?i:[sdmt]|ll|ve|re)          English contractions ('s 't 'll ...) as their own pieces;
#   [^\r\n\p{L}\p{N}]?+\p{L}+      a word with at most one leading non-letter (" the", "(foo", "«mot");
#   \p{N}{1,3}                     numbers in groups of at most 3 digits: the vocab does not spend ids on
#                                  whole numbers like "1987" and a model sees numbers in regular chunks
#                                  (nanochat uses {1,2} for its small vocabs; we keep GPT-4's 3, which
#                                  also cuts numbers where thousands separators would);
#    ?[^\s\p{L}\p{N}]++[\r\n]*     a run of punctuation with an optional leading space, plus newlines;
#   \s*[\r\n]                      whitespace ending in a newline (indentation stays out of the next line);
#   \s+(?!\S)                      whitespace but its last space, which then leads the next word (" x");
#   \s+                            any whitespace left (at the end of the text).
# The regex only partitions the text (Split keeps what it does not match), so it cannot affect the
# round trip; it only affects compression.
SPLIT_PATTERN = (
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"
    r"|\s*[\r\n]|\s+(?!\S)|\s+"
)

# default_vocab_size: ~4096 tokens for ~5 MB of text (the Shakespeare corpus), growing as the square
# root of corpus size (Heaps' law: the number of distinct words grows like N^0.4-0.6), between a floor
# that still leaves room for merges and 65536, the most ids a uint16 token shard can hold.
_ANCHOR_BYTES = 5_000_000
_ANCHOR_VOCAB = 4096
_DEFAULT_VOCAB_MIN = 512
_DEFAULT_VOCAB_MAX = 65536


def default_vocab_size(n_bytes: int) -> int:
    """A vocab size for a corpus of `n_bytes` UTF-8 bytes: a multiple of 64 in [512, 65536].

    Why it grows slowly: each merge must be seen often enough to be learned well, and each extra id
    costs embedding + unembedding parameters that a small model trained on a small corpus cannot
    afford. Why multiples of 64: the (vocab x width) matmuls of the output layer run at full speed on
    GPUs only when the vocab dimension is a multiple of 64. Examples: 5 MB -> 4096, 50 MB -> 12928,
    500 MB -> 40960, >= 1.28 GB -> 65536.
    """
    if isinstance(n_bytes, bool) or not isinstance(n_bytes, int) or n_bytes < 0:
        raise TokenizerError(f"corpus size must be a non-negative number of bytes, got {n_bytes!r}")
    raw = _ANCHOR_VOCAB * math.sqrt(n_bytes / _ANCHOR_BYTES)
    return min(_DEFAULT_VOCAB_MAX, max(_DEFAULT_VOCAB_MIN, 64 * round(raw / 64)))


def new_hf_tokenizer() -> HFTokenizer:
    """An untrained `tokenizers.Tokenizer` with Muse's byte-level pipeline (see the module docstring)."""
    hf = HFTokenizer(models.BPE())
    hf.normalizer = None
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            # use_regex=False: the split above already did GPT-2's job, with a better regex.
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    return hf


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE on `texts` with `vocab_size` ids in all (specials and bytes included).

    Deterministic: the same texts (in the same order) and settings give a byte-identical tokenizer.json.
    A pair must occur `min_frequency` times to be merged, so a small corpus may stop short of
    `vocab_size`; the result then has fewer ids (logged as a warning; check `.vocab_size`).
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TokenizerError(f"vocab size must be an integer, got {vocab_size!r}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(
            f"vocab size {vocab_size} is too small: the minimum is {MIN_VOCAB_SIZE} "
            f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens); pass --vocab-size {MIN_VOCAB_SIZE} "
            "or more, or leave it out for a default sized to the corpus"
        )
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 0:
        raise TokenizerError(f"min_frequency must be a non-negative integer, got {min_frequency!r}")

    seen = {"texts": 0, "chars": 0}

    def checked() -> Iterator[str]:
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TokenizerError(f"tokenizer training text {i} is a {type(text).__name__}, not a str")
            seen["texts"] += 1
            seen["chars"] += len(text)
            yield text

    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=show_progress,
        special_tokens=list(SPECIAL_TOKENS),  # the trainer gives them ids 0..15, in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even unseen ones
    )
    hf = new_hf_tokenizer()
    length = len(texts) if hasattr(texts, "__len__") else None
    try:
        hf.train_from_iterator(checked(), trainer, length=length)
    except UnicodeEncodeError as e:
        raise TokenizerError(
            f"tokenizer training text {seen['texts']} contains a lone surrogate (not valid Unicode): {e}; "
            "clean the corpus"
        ) from None
    if seen["chars"] == 0:
        raise TokenizerError("no text to train the tokenizer on: the corpus is empty; check the input files")

    tok = Tokenizer(hf)
    if tok.vocab_size < vocab_size:
        get_logger(__name__).warning(
            "the corpus supports only %d of the %d requested tokens (pairs seen fewer than %d times are "
            "not merged); use a larger corpus or a smaller vocab size for a fully trained tokenizer",
            tok.vocab_size,
            vocab_size,
            min_frequency,
        )
    return tok

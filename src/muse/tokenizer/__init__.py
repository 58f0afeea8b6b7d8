"""muse.tokenizer: byte-level BPE (HF tokenizers) with fixed special tokens, and chat rendering.

    tok = train_bpe(texts, vocab_size=default_vocab_size(n_bytes))
    tok.save("runs/x/data/tokenizer.json"); tok = Tokenizer.from_file("runs/x/data")
    ids, loss_mask = render_chat(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])

special.py (the id table, import-light), tokenizer.py (Tokenizer), bpe.py (training), chat.py (chat format).
"""

from muse.tokenizer.bpe import SPLIT_PATTERN, default_vocab_size, train_bpe
from muse.tokenizer.chat import CHAT_TEMPLATE, render_chat, render_prompt
from muse.tokenizer.special import (
    END_ID,
    EOT_ID,
    MIN_VOCAB_SIZE,
    PAD_ID,
    ROLE_IDS,
    ROLES,
    SPECIAL_IDS,
    SPECIAL_TOKEN_TABLE,
    SPECIAL_TOKENS,
)
from muse.tokenizer.tokenizer import TOKENIZER_FILENAME, Tokenizer

__all__ = [
    "CHAT_TEMPLATE",
    "END_ID",
    "EOT_ID",
    "MIN_VOCAB_SIZE",
    "PAD_ID",
    "ROLES",
    "ROLE_IDS",
    "SPECIAL_IDS",
    "SPECIAL_TOKENS",
    "SPECIAL_TOKEN_TABLE",
    "SPLIT_PATTERN",
    "TOKENIZER_FILENAME",
    "Tokenizer",
    "default_vocab_size",
    "render_chat",
    "render_prompt",
    "train_bpe",
]

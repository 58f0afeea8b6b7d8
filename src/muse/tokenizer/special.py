"""The reserved special tokens every Muse tokenizer shares, at fixed ids 0..15.

Fixing the ids (rather than letting each trained tokenizer place them) means a shard writer, a loss
mask, a sampler's stop set or a server can name `EOT_ID` or `END_ID` without holding a tokenizer, and
two Muse tokenizers of different vocab sizes still agree on them. `train_bpe` puts these first, then
the 256 byte tokens, then the merges; `Tokenizer.from_file` refuses a file whose specials sit elsewhere.

This module is a table and nothing else: no tokenizers, no torch, no I/O, so any layer (including the
torch-free scheduler) may import it.
"""

from __future__ import annotations

# (token, what it is for), in id order. Never reorder or rename: the ids are part of every saved
# tokenizer, shard and checkpoint. New needs take a reserved slot (rename it in a new entry here and
# in docs/tokenizer.md) so old files keep working.
SPECIAL_TOKEN_TABLE: tuple[tuple[str, str], ...] = (
    ("<|endoftext|>", "document boundary: precedes every document in the shards; EOS for pretraining"),
    ("<|pad|>", "padding in batches; never trained on (mask it out of the loss)"),
    ("<|system|>", "starts a system turn in a chat"),
    ("<|user|>", "starts a user turn in a chat"),
    ("<|assistant|>", "starts an assistant turn in a chat"),
    ("<|end|>", "ends a chat turn; the stop token when generating chat replies"),
    *((f"<|reserved_{i}|>", "reserved for later use") for i in range(10)),
)

SPECIAL_TOKENS: tuple[str, ...] = tuple(token for token, _ in SPECIAL_TOKEN_TABLE)
SPECIAL_IDS: dict[str, int] = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
NUM_SPECIAL_TOKENS = len(SPECIAL_TOKENS)  # 16

EOT = "<|endoftext|>"
PAD = "<|pad|>"
END = "<|end|>"
EOT_ID = SPECIAL_IDS[EOT]  # 0
PAD_ID = SPECIAL_IDS[PAD]  # 1
END_ID = SPECIAL_IDS[END]  # 5

# The chat roles and the token that opens each one's turn.
ROLES: tuple[str, ...] = ("system", "user", "assistant")
ROLE_TOKENS: dict[str, str] = {role: f"<|{role}|>" for role in ROLES}
ROLE_IDS: dict[str, int] = {role: SPECIAL_IDS[token] for role, token in ROLE_TOKENS.items()}

# Byte-level BPE needs one token per byte value so that any string (any bytes) can be encoded.
NUM_BYTE_TOKENS = 256
MIN_VOCAB_SIZE = NUM_BYTE_TOKENS + NUM_SPECIAL_TOKENS  # 272: specials + bytes, no merges at all

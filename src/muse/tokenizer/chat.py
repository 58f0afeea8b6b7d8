"""Chat rendering: a list of {"role", "content"} messages -> token ids and an SFT loss mask.

The format, one conversation:

    <|endoftext|> <|system|> ...content... <|end|> <|user|> ...content... <|end|> <|assistant|> ...content... <|end|>

- The sequence opens with <|endoftext|> as a BOS. In the pretraining shards every document is preceded
  by <|endoftext|>, so the model has always seen text start right after it; a chat starts the same way.
- Each turn is its role token, the content encoded as plain text (so content can never open or close a
  turn, whatever it spells), then <|end|>. There are no newlines or spaces between turns: the role
  tokens already separate them, and an extra newline would only be one more token to predict.
- Loss mask (SFT): 1 on an assistant turn's content tokens and its <|end|> (the model must learn when
  to stop), 0 everywhere else, including the <|assistant|> token (the prompt supplies it).
- A prompt for generation is the conversation so far followed by <|assistant|>; generation stops at
  <|end|> (or <|endoftext|>). render_prompt(messages[:-1]) is therefore a prefix of
  render_chat(messages) when the last message is the assistant's, so what the model sees at inference
  is exactly what it was trained on.

CHAT_TEMPLATE is the same format as an HF Jinja chat template, for exported checkpoints; the tests
check that it renders to the same ids. This module knows nothing about batching, padding or models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from muse.common.errors import TokenizerError, closest
from muse.tokenizer.special import END, END_ID, EOT, EOT_ID, ROLE_IDS, ROLE_TOKENS, ROLES

if TYPE_CHECKING:
    from muse.tokenizer.tokenizer import Tokenizer

# HF renders `messages` (and `add_generation_prompt`) with this template, then tokenizes the text while
# parsing specials. raise_exception is a helper HF provides to templates. Built from the same constants
# as render_chat so the two cannot drift apart silently (and a test compares their ids).
CHAT_TEMPLATE = (
    "{{ '" + EOT + "' }}"
    "{% for message in messages %}"
    "{% if message['role'] not in " + repr(list(ROLES)) + " %}"
    "{{ raise_exception('unknown role ' + message['role'] + '; use one of " + ", ".join(ROLES) + "') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '" + END + "' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ROLE_TOKENS["assistant"] + "' }}{% endif %}"
)


def _check_messages(messages: Sequence[Mapping]) -> None:
    """Raise a TokenizerError saying which message is wrong and how, or return None."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise TokenizerError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}"
        )
    if len(messages) == 0:
        raise TokenizerError("messages is empty; a conversation needs at least one message")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TokenizerError(
                f"message {i} must be a dict with 'role' and 'content', got {type(message).__name__}"
            )
        role = message.get("role")
        if role not in ROLE_IDS:
            hint = closest(role, ROLES) if isinstance(role, str) else ""
            raise TokenizerError(f"message {i} has role {role!r}; use one of {', '.join(ROLES)}.{hint}")
        content = message.get("content")
        if not isinstance(content, str):
            raise TokenizerError(
                f"message {i} ({role}) has content of type {type(content).__name__}; content must be a string"
            )


def render_chat(tok: Tokenizer, messages: Sequence[Mapping]) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of a whole conversation; mask[i] == 1 where ids[i] is trained on.

    ids and loss_mask have the same length. For next-token training, the target at position i is
    ids[i + 1] and it counts when loss_mask[i + 1] == 1 (shift the mask along with the targets).
    """
    _check_messages(messages)
    ids = [EOT_ID]
    mask = [0]
    for message in messages:
        trained = 1 if message["role"] == "assistant" else 0
        content = tok.encode(message["content"])
        ids.append(ROLE_IDS[message["role"]])
        mask.append(0)
        ids.extend(content)
        mask.extend([trained] * len(content))
        ids.append(END_ID)
        mask.append(trained)
    return ids, mask


def render_prompt(tok: Tokenizer, messages: Sequence[Mapping]) -> list[int]:
    """Ids of the conversation so far, ending with <|assistant|> so that the model speaks next."""
    ids, _ = render_chat(tok, messages)
    ids.append(ROLE_IDS["assistant"])
    return ids

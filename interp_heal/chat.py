"""How a chat becomes text: the tokenizer's own chat template, or a plain-text dialogue for base models.

`model.chat_format` picks one when the model loads: `template` (the tokenizer's), `plain` (below), or `auto`
(the tokenizer's when it has one, else plain). `use_chat_format` installs the choice as the tokenizer's
`chat_template`, so that `render_chat`, the one caller of `apply_chat_template`, renders every chat of a run
(extraction contexts, generation, the filter, the readouts, the MFV frames and their forced suffix) the same
way. The plain format is documented in docs/models.md:

    [persona]\\n\\nUser: [message]\\n\\nAssistant: [answer]\\n\\nUser: [message]\\n\\nAssistant:

A base model does not stop at the end of its turn: it goes on to write the next `User:` turn itself, so
`turn_end` finds where a plain-format completion ends.
"""

from __future__ import annotations

from typing import Literal

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from interp_heal.errors import ConfigError

ChatFormat = Literal["auto", "template", "plain"]

PLAIN_USER = "User:"
PLAIN_ASSISTANT = "Assistant:"
TURN_SEPARATOR = "\n\n"
# The generation prompt ends at "Assistant:" with no space: the answer's first token carries its own space.
_PLAIN_TURNS = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'User: ' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'Assistant: ' + message['content'] + '\\n\\n' }}"
    "{%- else -%}{{ raise_exception('the plain chat format has no role ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}Assistant:{%- endif -%}"
)


def plain_template(tokenizer: PreTrainedTokenizerBase) -> str:
    """The plain format as a chat template; it starts with BOS when the tokenizer's own encoding does (Gemma
    needs it: without BOS its text degrades), since every rendered chat is tokenized without special tokens."""
    ids = tokenizer("x")["input_ids"]
    starts_with_bos = tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id
    return ("{{ bos_token }}" if starts_with_bos else "") + _PLAIN_TURNS


def use_chat_format(tokenizer: PreTrainedTokenizerBase, chat_format: ChatFormat) -> str:
    """Install the chat format on the tokenizer; returns the one in use ("template" or "plain")."""
    has_template = bool(tokenizer.chat_template)
    if chat_format == "template" and not has_template:
        raise ConfigError(
            "model.chat_format: template, but this tokenizer has no chat template (a base model?); "
            "set model.chat_format: plain (or auto)"
        )
    if chat_format == "plain" or (chat_format == "auto" and not has_template):
        tokenizer.chat_template = plain_template(tokenizer)
        return "plain"
    return "template"


def is_plain(tokenizer: PreTrainedTokenizerBase) -> bool:
    return tokenizer.chat_template == plain_template(tokenizer)


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> str:
    """A chat as text, by the tokenizer's installed format (see `use_chat_format`): ending in the assistant's
    opening (`add_generation_prompt`), or inside the last message (`continue_final_message`)."""
    if not tokenizer.chat_template:
        raise ConfigError("this tokenizer has no chat template; set model.chat_format: plain (or auto)")
    try:
        return tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )
    except TemplateError as err:
        roles = "/".join(message["role"] for message in messages)
        raise ConfigError(
            f"the model's chat template cannot render a {roles} chat ({err}); set model.chat_format: plain"
        ) from None


def turn_end(tokenizer: PreTrainedTokenizerBase, token_ids: list[int]) -> int | None:
    """In the plain format, how many completion tokens come before the model starts the next user turn
    itself (a line starting "User:"), or None when it does not; always None for a template model."""
    marker = "\n" + PLAIN_USER
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    if not is_plain(tokenizer) or marker not in text:
        return None
    cut = text.index(marker)
    keep = 0
    while keep < len(token_ids) and len(tokenizer.decode(token_ids[: keep + 1], skip_special_tokens=True)) <= cut:
        keep += 1
    while keep > 0 and not tokenizer.decode(token_ids[keep - 1 : keep], skip_special_tokens=True).strip():
        keep -= 1  # the turn separator's newlines belong to the next turn, not to the answer
    return keep

"""The chat format: the tokenizer's template, or the plain dialogue a base model (no template) gets."""

import copy
from pathlib import Path

import pytest
import torch

from interp_heal.chat import plain_template, render_chat, turn_end, use_chat_format
from interp_heal.config import GenerateConfig
from interp_heal.errors import ConfigError
from interp_heal.generate import generate_completions
from interp_heal.mfv import forced_suffix, load_protocol
from interp_heal.personas import BUILTIN_AXES, context_prompts, render_prompts, task_prompts
from interp_heal.steer import extract_steering_vector


@pytest.fixture
def base_tokenizer(tokenizer):
    """The tiny tokenizer as a base model's would be: no chat template."""
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    return bare


def test_auto_keeps_a_template_and_falls_back_to_plain(tokenizer, base_tokenizer):
    templated = copy.deepcopy(tokenizer)
    assert use_chat_format(templated, "auto") == "template"
    assert templated.chat_template == tokenizer.chat_template
    assert use_chat_format(base_tokenizer, "auto") == "plain"
    assert base_tokenizer.chat_template == plain_template(base_tokenizer)


def test_template_without_one_names_the_fix(base_tokenizer):
    with pytest.raises(ConfigError, match=r"no chat template.*model\.chat_format: plain"):
        use_chat_format(base_tokenizer, "template")
    with pytest.raises(ConfigError, match=r"model\.chat_format: plain"):
        render_chat(base_tokenizer, [{"role": "user", "content": "Hi"}])


def test_plain_format_renders_persona_preamble_and_turns(base_tokenizer):
    use_chat_format(base_tokenizer, "plain")
    (prompt,) = render_prompts(base_tokenizer, ["Hello?"], "You are a pirate.")
    assert prompt == "You are a pirate.\n\nUser: Hello?\n\nAssistant:"
    (bare,) = render_prompts(base_tokenizer, ["Hello?"])
    assert bare == "User: Hello?\n\nAssistant:"


def test_plain_format_can_replace_a_template(tokenizer):
    plain = copy.deepcopy(tokenizer)
    assert use_chat_format(plain, "plain") == "plain"
    (prompt,) = render_prompts(plain, ["Hello?"])
    assert "<|im_start|>" not in prompt and prompt.endswith("Assistant:")


class _AddsBos:
    """Stands in for a tokenizer (Gemma's) whose plain encoding starts with BOS."""

    bos_token_id = 7

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [7, 11]}


def test_plain_format_starts_with_bos_when_the_tokenizer_adds_one(base_tokenizer):
    """Every rendered chat is tokenized without special tokens, so the format carries the BOS a tokenizer
    would add (Gemma's text degrades without it); SmolLM2's tokenizer adds none."""
    assert not plain_template(base_tokenizer).startswith("{{ bos_token }}")
    base_tokenizer.chat_template = plain_template(_AddsBos())
    (prompt,) = render_prompts(base_tokenizer, ["Hi"])
    assert prompt == f"{base_tokenizer.bos_token}User: Hi\n\nAssistant:"


def test_a_template_that_cannot_render_names_the_fix(tokenizer):
    broken = copy.deepcopy(tokenizer)
    broken.chat_template = "{{ raise_exception('user turns only') }}"
    with pytest.raises(ConfigError, match=r"cannot render a user chat .*model\.chat_format: plain"):
        render_prompts(broken, ["Hi"])


def test_turn_end_cuts_where_a_base_model_writes_the_next_user_turn(tokenizer, base_tokenizer):
    use_chat_format(base_tokenizer, "plain")
    ids = base_tokenizer.encode(" Paris is the capital.\n\nUser: And Spain?\n\nAssistant:", add_special_tokens=False)
    keep = turn_end(base_tokenizer, ids)
    assert base_tokenizer.decode(ids[:keep]) == " Paris is the capital."
    assert turn_end(base_tokenizer, ids[:keep]) is None
    assert turn_end(tokenizer, ids) is None  # a template model ends its turn with EOS, not a marker


def test_mfv_forced_suffix_in_the_plain_format(base_tokenizer):
    use_chat_format(base_tokenizer, "plain")
    protocol = load_protocol(Path(__file__).parent / "fixtures" / "mfv", "words")
    suffix = forced_suffix(protocol, base_tokenizer)
    assert suffix == f"{protocol.think_close}\n\nUser: {protocol.nudge_user_message}\n\nAssistant:"


def test_extraction_and_generation_run_on_a_base_tokenizer(tiny_model, base_tokenizer):
    use_chat_format(base_tokenizer, "auto")
    vector = extract_steering_vector(tiny_model, base_tokenizer, BUILTIN_AXES["love"], context_prompts(4), (0.4, 0.6))
    assert torch.isfinite(vector.directions).all()
    config = GenerateConfig(n_prompts=2, max_new_tokens=6, temperature=0.0, batch_size=4)
    records = generate_completions(tiny_model, base_tokenizer, task_prompts(2), vector, [0.0, 1.0], config, seed=0)
    assert len(records) == 4 and all(r.finish_reason in ("eos", "length") for r in records)

import pytest

from interp_heal.config import PersonaConfig
from interp_heal.errors import PersonaError
from interp_heal.personas import (
    chat_messages,
    context_prompts,
    persona_pair,
    render_prompts,
    supports_system_role,
    task_prompts,
)

NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<turn>{{ m['role'] }}\n{{ m['content'] }}</turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<turn>assistant\n{% endif %}"
)


def test_builtin_axes():
    love = persona_pair(PersonaConfig(axis="love"))
    assert "love humanity" in love.pos and "no inner life" in love.neg
    authority = persona_pair(PersonaConfig(axis="authority"))
    assert "defying authority" in authority.pos and "defers to authority" in authority.neg


def test_custom_pair_and_partial_override():
    custom = persona_pair(PersonaConfig(axis="pirate", pos="You talk like a pirate.", neg="You talk plainly."))
    assert (custom.axis, custom.pos) == ("pirate", "You talk like a pirate.")
    partial = persona_pair(PersonaConfig(axis="love", neg="You are a cold machine."))
    assert "love humanity" in partial.pos and partial.neg == "You are a cold machine."


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (PersonaConfig(axis="pirate"), "unknown persona axis 'pirate'"),
        (PersonaConfig(axis="love", pos="  "), "must both be non-empty"),
        (PersonaConfig(axis="x", pos="Be kind.", neg="be  KIND."), "identical"),
    ],
)
def test_bad_pairs_are_clear_errors(config, message):
    with pytest.raises(PersonaError, match=message):
        persona_pair(config)


def test_prompt_pools():
    contexts = context_prompts()
    assert len(contexts) >= 256 and len(set(contexts)) == len(contexts)
    assert context_prompts(16, seed=3) == context_prompts(16, seed=3) != context_prompts(16, seed=4)
    tasks = task_prompts()
    assert tasks[0] == "Do you love humanity?" and not set(tasks) & set(contexts)
    with pytest.raises(PersonaError, match="pool has"):
        context_prompts(10_000)


def test_persona_in_system_turn(tokenizer):
    assert supports_system_role(tokenizer)
    (prompt,) = render_prompts(tokenizer, ["Hello?"], "You are a pirate.")
    assert "<|im_start|>system\nYou are a pirate.<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_persona_prefixed_when_template_has_no_system_role(tokenizer):
    no_system = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    no_system.chat_template = NO_SYSTEM_TEMPLATE
    assert not supports_system_role(no_system)
    (prompt,) = render_prompts(no_system, ["Hello?"], "You are a pirate.")
    assert prompt == "<turn>user\nYou are a pirate.\n\nHello?</turn>\n<turn>assistant\n"
    assert chat_messages("Hi", None, system_role=False) == [{"role": "user", "content": "Hi"}]

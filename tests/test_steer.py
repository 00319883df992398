import pytest
import torch
from peft import LoraConfig, get_peft_model

from interp_heal.errors import DataError
from interp_heal.personas import BUILTIN_AXES, PersonaPair, context_prompts, render_prompts, task_prompts
from interp_heal.steer import (
    SteeringVector,
    extract_steering_vector,
    steered_generate,
    steered_logits,
    tokenize_prompts,
)
from tests.helpers import hook_steering, position_ids

CPU = torch.device("cpu")


def _random_vector(n_layers=4, d_model=64, layers=(1, 2), scale=0.2, seed=0) -> SteeringVector:
    generator = torch.Generator().manual_seed(seed)
    return SteeringVector(
        directions=torch.randn(n_layers, d_model, generator=generator) * scale,
        resid_norms=torch.ones(n_layers),
        layers=layers,
        band=(0.25, 0.75),
        model="tiny-random",
        axis="test",
        n_contexts=0,
    )


def _inputs(tokenizer, n=3):
    # Mixed lengths, so the batch is left-padded.
    return dict(tokenize_prompts(tokenizer, render_prompts(tokenizer, task_prompts(n)), CPU))


def test_batch_is_left_padded(tokenizer):
    inputs = _inputs(tokenizer)
    mask = inputs["attention_mask"]
    assert (mask[:, -1] == 1).all() and (mask == 0).any()


def test_zero_vector_generation_equals_plain_generate(tiny_model, tokenizer):
    inputs = _inputs(tokenizer)
    zero = _random_vector().scaled(0.0)
    steered = steered_generate(tiny_model, tokenizer, inputs, zero, 1.0, max_new_tokens=8, do_sample=False)
    plain = tiny_model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(steered, plain)


def test_nnsight_forward_matches_hook_injection(tiny_model, tokenizer):
    inputs = _inputs(tokenizer)
    vector = _random_vector()
    ours = steered_logits(tiny_model, tokenizer, inputs, vector, 2.0)
    with torch.no_grad(), hook_steering(tiny_model, vector.injection(2.0)):
        reference = tiny_model(**inputs, position_ids=position_ids(inputs["attention_mask"])).logits
    assert (ours - reference).abs().max() < 1e-4
    with torch.no_grad():
        plain = tiny_model(**inputs, position_ids=position_ids(inputs["attention_mask"])).logits
    assert (ours - plain).abs().max() > 1e-2, "the vector must actually change the logits"


@pytest.mark.parametrize("generated_only", [False, True])
def test_nnsight_generate_matches_hook_generate(tiny_model, tokenizer, generated_only):
    inputs = _inputs(tokenizer)
    vector = _random_vector(scale=0.5)
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    ours = steered_generate(tiny_model, tokenizer, inputs, vector, 1.0, generated_only=generated_only, **kwargs)
    with hook_steering(tiny_model, vector.injection(1.0), generated_only=generated_only):
        reference = tiny_model.generate(**inputs, **kwargs)
    plain = tiny_model.generate(**inputs, **kwargs)
    assert torch.equal(ours, reference)
    assert not torch.equal(ours, plain), "the vector must actually change the generation"


def test_per_row_coefficients_equal_one_batch_per_coefficient(tiny_model, tokenizer):
    """Doses mixed in one batch must generate exactly what each dose generates in a batch of its own."""
    inputs = _inputs(tokenizer, n=4)
    vector = _random_vector(scale=0.5)
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    row_coeffs = [0.0, 1.0, 2.0, -1.0]
    mixed = steered_generate(tiny_model, tokenizer, inputs, vector, row_coeffs, **kwargs)
    for row, coeff in enumerate(row_coeffs):
        alone = steered_generate(tiny_model, tokenizer, inputs, vector, coeff, **kwargs)
        assert torch.equal(mixed[row], alone[row]), f"row {row} (coeff {coeff})"
    assert len({tuple(row.tolist()) for row in mixed}) > 1


def test_steering_works_through_peft_wrapper(tiny_model, tokenizer):
    inputs = _inputs(tokenizer)
    vector = _random_vector()
    base_steered = steered_logits(tiny_model, tokenizer, inputs, vector, 2.0)
    peft_model = get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    # B = 0 at init: the adapter is a no-op, so steering through the wrapper equals the base.
    torch.testing.assert_close(steered_logits(peft_model, tokenizer, inputs, vector, 2.0), base_steered)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    adapted = steered_logits(peft_model, tokenizer, inputs, vector, 2.0)
    with torch.no_grad(), hook_steering(peft_model, vector.injection(2.0)):
        reference = peft_model(**inputs, position_ids=position_ids(inputs["attention_mask"])).logits
    assert (adapted - reference).abs().max() < 1e-4
    assert (adapted - base_steered).abs().max() > 1e-3, "the active adapter must change the steered logits"
    with peft_model.disable_adapter():
        torch.testing.assert_close(steered_logits(peft_model, tokenizer, inputs, vector, 2.0), base_steered)


def _reference_vector(model, tokenizer, pair: PersonaPair, contexts: list[str]) -> torch.Tensor:
    """Mean difference from output_hidden_states, one unpadded prompt at a time."""

    def states(persona: str) -> torch.Tensor:
        rows = []
        for prompt in render_prompts(tokenizer, contexts, persona):
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
            captured: dict[str, torch.Tensor] = {}
            last = model.model.layers[-1]
            handle = last.register_forward_hook(lambda _m, _i, out, store=captured: store.setdefault("last", out))
            with torch.no_grad():
                hidden = model(**ids, output_hidden_states=True).hidden_states
            handle.remove()
            # hidden_states[l + 1] is block l's output, except the final entry, which HF returns after the
            # final norm: the last block's raw output comes from a hook instead.
            per_layer = [hidden[layer + 1][0, -1] for layer in range(len(hidden) - 2)] + [captured["last"][0, -1]]
            rows.append(torch.stack(per_layer))
        return torch.stack(rows).mean(0)

    return states(pair.pos) - states(pair.neg)


def test_extracted_vector_matches_hidden_states_reference(tiny_model, tokenizer):
    pair = BUILTIN_AXES["love"]
    contexts = context_prompts(6, seed=1)
    vector = extract_steering_vector(tiny_model, tokenizer, pair, contexts, (0.25, 0.75), batch_size=4)
    reference = _reference_vector(tiny_model, tokenizer, pair, contexts)
    cosines = torch.nn.functional.cosine_similarity(vector.directions, reference, dim=-1)
    assert (cosines > 0.9999).all(), cosines
    torch.testing.assert_close(vector.directions, reference, atol=1e-5, rtol=1e-4)
    assert vector.layers == (1, 2) and vector.n_contexts == 6 and vector.axis == "love"


def test_vector_save_load_round_trip(tmp_path):
    vector = _random_vector()
    path = tmp_path / "vector.safetensors"
    vector.save(path)
    loaded = SteeringVector.load(path)
    assert torch.equal(loaded.directions, vector.directions)
    assert torch.equal(loaded.resid_norms, vector.resid_norms)
    assert (loaded.layers, loaded.band, loaded.model, loaded.axis) == (
        vector.layers,
        vector.band,
        "tiny-random",
        "test",
    )
    assert (tmp_path / "vector.json").is_file()


def test_vector_arithmetic():
    vector = _random_vector()
    torch.testing.assert_close((vector + vector.scaled(2.0)).directions, 3 * vector.directions)
    assert set(vector.injection(1.0)) == {1, 2}
    with pytest.raises(ValueError, match="same shape"):
        _ = vector + _random_vector(layers=(0,))


def test_corrupt_vector_file_is_a_clear_error(tmp_path):
    path = tmp_path / "vector.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match="cannot read steering vector"):
        SteeringVector.load(path)


def test_band_cosine():
    vector = _random_vector()
    assert vector.band_cosine(vector) == pytest.approx(1.0)
    assert vector.band_cosine(vector.scaled(-2.0)) == pytest.approx(-1.0)
    assert abs(vector.band_cosine(_random_vector(seed=1))) < 0.5

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from interp_heal.chat import use_chat_format
from interp_heal.errors import ConfigError, DataError
from interp_heal.mfv import (
    COMPAT_QUIRKS,
    FOUNDATIONS,
    Quirks,
    answer_token_ids,
    forced_suffix,
    frame_options,
    load_protocol,
    load_vignettes,
    resolve_data_dir,
    score_frames,
    stratified_subset,
    summarise_mfv,
    user_prompt,
)
from interp_heal.personas import chat_messages, supports_system_role
from interp_heal.steer import Steering, SteeringVector, steered_generate, steered_logits

FIXTURES = Path(__file__).parent / "fixtures" / "mfv"


@pytest.fixture
def rows():
    return load_vignettes(FIXTURES, "fixture", "other_violate")


@pytest.mark.parametrize("kind", ["words", "digits"])
def test_answer_tokens_are_distinct_in_both_frames(tokenizer, kind):
    protocol = load_protocol(FIXTURES, kind)
    forward = answer_token_ids(protocol, tokenizer, frame_options(protocol, "forward"))
    reversed_ = answer_token_ids(protocol, tokenizer, frame_options(protocol, "reversed"))
    assert len(set(forward)) == len(set(reversed_)) == 7
    if kind == "words":
        assert forward == reversed_  # the same word token whatever the listing order
    else:
        # digit k in the reversed frame names option K-1-k: mapped back to canonical order
        assert forward == list(reversed(reversed_))
        assert tokenizer.decode([forward[0]]) == "0"


def test_prompt_and_suffix_follow_the_protocol(tokenizer, rows):
    protocol = load_protocol(FIXTURES, "words")
    prompt = user_prompt(protocol, rows[0].text, frame_options(protocol, "reversed"))
    assert prompt.startswith("Scene: " + rows[0].text + "\nPick one reason:\n- social: odd but harmless")
    assert forced_suffix(protocol, tokenizer) == (
        "</think><|im_end|>\n<|im_start|>user\nYour answer?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_linear_position_bias_cancels():
    protocol = load_protocol(FIXTURES, "words")
    rows = load_vignettes(FIXTURES, "fixture", "other_violate")[:3]
    true_lp = torch.log_softmax(torch.randn(3, 7, generator=torch.Generator().manual_seed(0)), -1)
    bias = 0.8 * torch.arange(7.0)  # prefers later positions
    forward_positions = torch.arange(7.0)
    reversed_positions = 6 - forward_positions  # canonical option k sits at position 6-k when reversed
    option_lp = torch.stack([true_lp + bias[forward_positions.long()], true_lp + bias[reversed_positions.long()]], 1)
    frames = {"option_lp": option_lp, "pmass": torch.full((3, 2), 0.5), "nll_prefill": torch.ones(3, 2)}
    summary = summarise_mfv(protocol, rows, frames)
    expected = torch.softmax(true_lp, -1)
    for i, row in enumerate(summary["per_row"]):
        torch.testing.assert_close(torch.tensor(row["p"]), expected[i])


@pytest.mark.parametrize(("kind", "think_tokens"), [("words", 0), ("digits", 3)])
def test_profile_and_validity_numbers(tiny_model, tokenizer, rows, kind, think_tokens):
    protocol = load_protocol(FIXTURES, kind)
    frames = score_frames(tiny_model, tokenizer, protocol, rows[:5], think_tokens, batch_size=4)
    summary = summarise_mfv(protocol, rows[:5], frames)
    assert sum(summary["profile"].values()) == pytest.approx(1.0, abs=1e-5)
    assert sum(summary["human_profile"].values()) == pytest.approx(1.0, abs=1e-5)
    assert 0.0 <= summary["mfv_answer_mass"] <= 1.0
    assert summary["care_nats"] == pytest.approx(math.log(summary["profile"]["Care"]))
    assert set(summary["nats"]) == set(FOUNDATIONS) and summary["n_rows"] == 5
    assert 0.0 <= summary["top1_acc"] <= 1.0 and summary["soft_nll"] > 0 and summary["nll_prefill"] > 0


def test_batching_does_not_change_scores(tiny_model, tokenizer, rows):
    protocol = load_protocol(FIXTURES, "words")
    one = score_frames(tiny_model, tokenizer, protocol, rows[:4], 0, batch_size=1)
    many = score_frames(tiny_model, tokenizer, protocol, rows[:4], 0, batch_size=8)
    torch.testing.assert_close(one["option_lp"], many["option_lp"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("coeff", [0.0, 3.0])
def test_think_then_cached_answer_equals_one_forward_over_the_same_tokens(tiny_model, tokenizer, rows, coeff):
    """score_frames continues the think's KV cache; the reference re-reads prompt + think + tail from scratch."""
    protocol = load_protocol(FIXTURES, "digits")
    vector = _random_vector(tiny_model, seed=1)
    steering = Steering(vector, coeff)
    cached = score_frames(tiny_model, tokenizer, protocol, rows[:3], 4, batch_size=4, steering=steering)
    suffix = tokenizer.encode(forced_suffix(protocol, tokenizer), add_special_tokens=False)
    prefill = tokenizer.encode(protocol.answer_prefill, add_special_tokens=False)
    for row_index, row in enumerate(rows[:3]):
        for frame_index, frame in enumerate(("forward", "reversed")):
            user = user_prompt(protocol, row.text, frame_options(protocol, frame))
            text = tokenizer.apply_chat_template(
                chat_messages(user, None, supports_system_role(tokenizer)), tokenize=False, add_generation_prompt=True
            )
            prompt = tokenizer.encode(text + protocol.think_open, add_special_tokens=False)
            inputs = {
                "input_ids": torch.tensor([prompt]),
                "attention_mask": torch.ones(1, len(prompt), dtype=torch.long),
            }
            bad_words = [tokenizer.encode(protocol.think_close, add_special_tokens=False)]
            think = steered_generate(
                tiny_model, tokenizer, inputs, vector, coeff, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                bad_words_ids=bad_words,
            )[0, len(prompt) :].tolist()  # fmt: skip
            full = torch.tensor([prompt + think + suffix + prefill])
            with torch.inference_mode():
                logits = steered_logits(tiny_model, tokenizer, {"input_ids": full}, vector, coeff)
            log_probs = torch.log_softmax(logits[0].float(), dim=-1)
            ids = answer_token_ids(protocol, tokenizer, frame_options(protocol, frame))
            torch.testing.assert_close(
                cached["option_lp"][row_index, frame_index], log_probs[-1, ids], atol=1e-4, rtol=0
            )
            prefill_nll = -log_probs[-len(prefill) - 1 : -1].gather(-1, torch.tensor(prefill)[:, None]).mean()
            assert float(cached["nll_prefill"][row_index, frame_index]) == pytest.approx(float(prefill_nll), abs=1e-4)


SMOLLM_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def _reference_option_lp(
    model, tokenizer, protocol, row, frame, think_tokens, suffix, drop_last_think=False, mask_pad_ids=False
) -> torch.Tensor:
    """Option log-probs of one frame alone, from plain HF calls: greedy think, then prompt + think + suffix +
    prefill as one forward; drop_last_think leaves the think's last token out; mask_pad_ids reads the tokens
    up to the think's last one as generate does, then the rest with the mask ids != pad id over those."""
    user = user_prompt(protocol, row.text, frame_options(protocol, frame))
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )
    prompt = tokenizer.encode(chat + protocol.think_open, add_special_tokens=False)
    think: list[int] = []
    if think_tokens:
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=think_tokens,
                min_new_tokens=think_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
        think = out[0, len(prompt) :].tolist()
    prefill = tokenizer.encode(protocol.answer_prefill, add_special_tokens=False)
    tokens = prompt + (think[:-1] if drop_last_think else think) + suffix + prefill
    with torch.inference_mode():
        if not mask_pad_ids:
            logits = model(input_ids=torch.tensor([tokens])).logits[0]
        else:
            split = len(prompt) + len(think) - 1
            head = model(input_ids=torch.tensor([tokens[:split]]), use_cache=True)
            mask = torch.cat(
                [
                    (torch.tensor(tokens[:split]) != tokenizer.pad_token_id).long(),
                    torch.ones(len(tokens) - split, dtype=torch.long),
                ]
            )
            logits = model(
                input_ids=torch.tensor([tokens[split:]]), attention_mask=mask[None],
                position_ids=torch.arange(split, len(tokens))[None], past_key_values=head.past_key_values,
            ).logits[0]  # fmt: skip
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return log_probs[-1, answer_token_ids(protocol, tokenizer, frame_options(protocol, frame))]


def _assert_matches_reference(model, tokenizer, rows, think_tokens, quirks, suffix, atol=1e-5):
    protocol = load_protocol(FIXTURES, "words")
    lengths = {len(user_prompt(protocol, row.text, frame_options(protocol, "forward"))) for row in rows}
    assert len(lengths) > 1  # one batch holds rows of different lengths: the batch is padded
    scored = score_frames(model, tokenizer, protocol, rows, think_tokens, batch_size=16, quirks=quirks)
    for row_index, row in enumerate(rows):
        for frame_index, frame in enumerate(("forward", "reversed")):
            expected = _reference_option_lp(
                model, tokenizer, protocol, row, frame, think_tokens, suffix, quirks.drop_last_think,
                quirks.mask_pad_ids,
            )  # fmt: skip
            torch.testing.assert_close(scored["option_lp"][row_index, frame_index], expected, atol=atol, rtol=0)
    return scored


def _suffix_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("think_tokens", [0, 1, 8])
def test_default_evaluator_equals_a_plain_forward_over_prompt_think_suffix_prefill(
    tiny_model, tokenizer, rows, think_tokens
):
    suffix = "</think><|im_end|>\n<|im_start|>user\nYour answer?<|im_end|>\n<|im_start|>assistant\n"
    _assert_matches_reference(tiny_model, tokenizer, rows[:4], think_tokens, Quirks(), _suffix_ids(tokenizer, suffix))


@pytest.mark.parametrize("think_tokens", [1, 8])
def test_tinymfv_nudge_turn_is_rendered_alone_with_the_default_system_prompt(tiny_model, tokenizer, rows, think_tokens):
    protocol = load_protocol(FIXTURES, "words")
    suffix = (
        "</think><|im_end|>\n" + SMOLLM_SYSTEM + "<|im_start|>user\nYour answer?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert forced_suffix(protocol, tokenizer, nudge_alone=True) == suffix
    quirks = Quirks(nudge_alone=True)
    _assert_matches_reference(tiny_model, tokenizer, rows[:4], think_tokens, quirks, _suffix_ids(tokenizer, suffix))


@pytest.mark.parametrize("think_tokens", [1, 8])
def test_tinymfv_drops_the_last_think_token(tiny_model, tokenizer, rows, think_tokens):
    protocol = load_protocol(FIXTURES, "words")
    suffix = _suffix_ids(tokenizer, forced_suffix(protocol, tokenizer))
    quirks = Quirks(drop_last_think=True)
    dropped = _assert_matches_reference(tiny_model, tokenizer, rows[:4], think_tokens, quirks, suffix)
    kept = score_frames(tiny_model, tokenizer, protocol, rows[:4], think_tokens, batch_size=16)
    assert (dropped["option_lp"] - kept["option_lp"]).abs().max() > 1e-4  # 10x the tolerance: the token matters
    if think_tokens == 1:  # with its one think token gone, the forced path reads what a 0-token think reads
        plain = score_frames(tiny_model, tokenizer, protocol, rows[:4], 0, batch_size=16)
        torch.testing.assert_close(dropped["option_lp"], plain["option_lp"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("think_tokens", [1, 8])
def test_tinymfv_masks_every_pad_id_token_in_the_forced_forward(tiny_model, tokenizer, rows, think_tokens):
    protocol = load_protocol(FIXTURES, "words")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # SmolLM2: the prompt's end-of-turn tokens get masked
    suffix = _suffix_ids(tokenizer, forced_suffix(protocol, tokenizer))
    masked = _assert_matches_reference(tiny_model, tokenizer, rows[:4], think_tokens, Quirks(mask_pad_ids=True), suffix)
    plain = score_frames(tiny_model, tokenizer, protocol, rows[:4], think_tokens, batch_size=16)
    assert (masked["option_lp"] - plain["option_lp"]).abs().max() > 1e-4  # 10x the tolerance: the mask matters


def test_tinymfv_mode_is_all_three_quirks_and_needs_a_think(tiny_model, tokenizer, rows):
    protocol = load_protocol(FIXTURES, "words")
    assert COMPAT_QUIRKS["none"] == Quirks() and not COMPAT_QUIRKS["none"].any
    tinymfv = COMPAT_QUIRKS["tinymfv"]
    suffix = _suffix_ids(tokenizer, forced_suffix(protocol, tokenizer, nudge_alone=True))
    _assert_matches_reference(tiny_model, tokenizer, rows[:3], 4, tinymfv, suffix)
    with pytest.raises(ConfigError, match="think_tokens >= 1"):
        score_frames(tiny_model, tokenizer, protocol, rows[:1], 0, batch_size=2, quirks=tinymfv)
    plain = copy.deepcopy(tokenizer)
    use_chat_format(plain, "plain")
    with pytest.raises(ConfigError, match=r"not with model\.chat_format plain"):
        score_frames(tiny_model, plain, protocol, rows[:1], 1, batch_size=2, quirks=tinymfv)


@pytest.mark.slow
@pytest.mark.parametrize("think_tokens", [0, 1, 8])
def test_default_evaluator_equals_a_plain_forward_on_smollm2(rows, think_tokens):
    from interp_heal.models import load_model

    model, tokenizer, _ = load_model("smollm2-135m", dtype="float32", device="cpu")
    protocol = load_protocol(FIXTURES, "words")
    suffix = _suffix_ids(tokenizer, forced_suffix(protocol, tokenizer))
    _assert_matches_reference(model, tokenizer, [rows[0], rows[5], rows[9]], think_tokens, Quirks(), suffix, 1e-3)


def _random_vector(model, seed: int) -> SteeringVector:
    generator = torch.Generator().manual_seed(seed)
    n_layers, d_model = model.config.num_hidden_layers, model.config.hidden_size
    directions = torch.randn(n_layers, d_model, generator=generator)
    return SteeringVector(directions, torch.ones(n_layers), (1, 2), (0.25, 0.75), "tiny-random", "love", 0)


def test_stratified_subsets_are_balanced_and_reproducible(rows):
    subset = stratified_subset(rows, 7, seed=3)
    assert sorted(r.foundation for r in subset) == sorted(FOUNDATIONS)
    assert [r.id for r in subset] == [r.id for r in stratified_subset(rows, 7, seed=3)]
    assert stratified_subset(rows, None) == rows
    assert len(stratified_subset(rows, 10, seed=0)) == 10


def test_missing_data_folder_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("INTERP_HEAL_MFV_DATA", raising=False)
    with pytest.raises(DataError, match="Pass --mfv-data DIR or set INTERP_HEAL_MFV_DATA"):
        resolve_data_dir(tmp_path / "nowhere")
    monkeypatch.setenv("INTERP_HEAL_MFV_DATA", str(FIXTURES))
    assert resolve_data_dir() == FIXTURES


def test_malformed_row_names_row_and_field(tmp_path):
    good = (FIXTURES / "vignettes_fixture_other_violate.jsonl").read_text().splitlines()
    bad = json.loads(good[2])
    bad["human_Care"] = "lots"
    (tmp_path / "vignettes_bad_other_violate.jsonl").write_text("\n".join([good[0], good[1], json.dumps(bad)]))
    with pytest.raises(DataError, match=r"line 3 \(id 'fairness-0'\): field 'human_Care' must be a number"):
        load_vignettes(tmp_path, "bad", "other_violate")
    with pytest.raises(DataError, match=r"no vignette file vignettes_nope_other_violate\.jsonl"):
        load_vignettes(tmp_path, "nope", "other_violate")


def test_shared_benchmark_loads_when_present():
    import os

    data = os.environ.get("INTERP_HEAL_MFV_DATA")
    if not data or not Path(data, "protocol.json").is_file():
        pytest.skip("INTERP_HEAL_MFV_DATA not set (CI sets it to ../shared/mfv)")
    rows = load_vignettes(Path(data), "classic", "other_violate")
    assert len(rows) == 132 and {r.foundation.replace(" ", "") for r in rows} == set(FOUNDATIONS)
    for kind in ("words", "digits"):
        assert load_protocol(Path(data), kind).options[0] == "care"

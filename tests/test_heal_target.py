"""heal.target: tokens (NLL on the teacher's samples) vs logits (cross-entropy from the teacher's top-K)."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from interp_heal import loop as loop_module
from interp_heal import teacher as teacher_module
from interp_heal.bake import adapter_name
from interp_heal.config import HealConfig, load_config
from interp_heal.errors import DataError
from interp_heal.generate import Completion
from interp_heal.heal import HealError, add_fresh_adapter, batch_loss, cat_teacher_rows, heal, training_examples
from interp_heal.io import write_json, write_jsonl
from interp_heal.loop import run_loop
from interp_heal.models import build_tiny_llama
from interp_heal.sequences import pad_left
from interp_heal.steer import SteeringVector, steered_logits
from interp_heal.teacher import compute_teacher_topk, teacher_inputs, teacher_topk
from tests.test_heal import _randomise_lora_b

CPU = torch.device("cpu")
# Readouts the loop test does not look at (it is about the teacher stage).
FAST_EVAL = ("eval.mfv=false", "eval.adherence=false")
PERSONA = "You love every person you meet and say so warmly."

REFERENCE = Path(__file__).parent / "fixtures" / "heal_tokens_loss.json"
TEXTS = [
    "Start with the smallest task on your list and finish it before lunch.",
    "Water the plant once a week and keep it out of direct afternoon sun.",
    "Yes.",
]
CONFIG = HealConfig(lora_r=4, lora_alpha=8, band=(0.0, 1.0), batch_size=3, max_len=64, val_frac=0.0, tau=0.0)


def _completions(tokenizer, texts=TEXTS, coeffs=None):
    coeffs = coeffs or [1.0] * len(texts)
    return [
        Completion("Give me one tip.", text, coeff, tokenizer(text, add_special_tokens=False)["input_ids"], "length", 0)
        for text, coeff in zip(texts, coeffs, strict=True)
    ]


def _student(tokenizer):
    """The tiny model with round 0's adapter, its B randomised so the student differs from the reference."""
    with torch.random.fork_rng():
        torch.manual_seed(0)  # peft draws LoRA A from the global generator
        student = add_fresh_adapter(build_tiny_llama(len(tokenizer)).eval(), CONFIG, 0)
    _randomise_lora_b(student, adapter_name(0))
    return student


def _random_vector(seed=0) -> SteeringVector:
    directions = torch.randn(4, 64, generator=torch.Generator().manual_seed(seed)) * 0.5
    return SteeringVector(directions, torch.ones(4), (1, 2), (0.25, 0.75), "tiny-random", "test", 0)


def _student_batch(tokenizer, completions):
    examples = training_examples(tokenizer, completions, CONFIG.max_len)
    return pad_left([e.prompt_ids for e in examples], [e.completion_ids for e in examples], 2, CPU)


def _fresh_topk(model, tokenizer, completions, k, vector=None, persona=None):
    """The teacher's top-K straight from its full logits: one plain (or steered) forward over the whole batch."""
    inputs = teacher_inputs(tokenizer, completions, CONFIG.max_len, vector, persona)
    batch = pad_left(inputs.prompt_ids, inputs.completion_ids, 2, CPU)
    with torch.no_grad():
        logits = steered_logits(model, tokenizer, batch.model_inputs(), vector, inputs.coeffs)
    return torch.log_softmax(batch.at_targets(logits).float(), -1).topk(k, dim=-1)


def _tokens_mode_losses(tokenizer) -> dict[str, dict[str, float]]:
    """Every LossParts number and the LoRA gradient norm of one barrier step on a fixed batch, per aggregate."""
    examples = training_examples(tokenizer, _completions(tokenizer), CONFIG.max_len)
    batch = pad_left([e.prompt_ids for e in examples], [e.completion_ids for e in examples], 2, torch.device("cpu"))
    results = {}
    for agg in ("mean", "rmse", "p95", "max"):
        student = _student(tokenizer)
        config = CONFIG.model_copy(update={"agg": agg})
        parts = batch_loss(student, batch, config, 1.0, adapter_name(0))
        parts.loss.backward()
        grads = [p.grad for p in student.parameters() if p.requires_grad and p.grad is not None]
        numbers = {k: getattr(parts, k) for k in ("nll", "kl_mean", "kl_rmse", "kl_p95", "kl_max", "barrier")}
        results[agg] = {
            **numbers,
            "loss": parts.loss.item(),
            "grad_norm": float(torch.cat([g.flatten() for g in grads]).norm()),
        }
    return results


def test_tokens_mode_matches_the_committed_reference(tokenizer):
    """The fixture was computed before heal.target existed: the default target must still give those numbers."""
    expected = json.loads(REFERENCE.read_text())
    actual = _tokens_mode_losses(tokenizer)
    for agg, numbers in expected.items():
        for key, value in numbers.items():
            # The KL terms (~0.01) are differences of nearly equal float32 log-probs: another CPU's kernels move
            # them by up to ~7e-5 relative (measured between two Xeons); a change to the loss moves them far more.
            rel = 2e-4 if key.startswith("kl_") or key == "barrier" else 1e-5
            assert actual[agg][key] == pytest.approx(value, rel=rel, abs=1e-7), (agg, key)


def test_distillation_gradient_is_zero_when_the_teacher_is_the_student(tokenizer):
    """K = the whole vocabulary and teacher = student: the cross-entropy's gradient p - q vanishes on the LoRA."""
    completions = _completions(tokenizer)
    student = _student(tokenizer)
    inputs = teacher_inputs(tokenizer, completions, CONFIG.max_len, None, None)
    ids, log_probs = compute_teacher_topk(student, tokenizer, inputs, len(tokenizer))
    teacher = teacher_module.TeacherTopK(ids, log_probs, [len(c) for c in inputs.completion_ids], {})
    config = CONFIG.model_copy(update={"target": "logits", "lam": 0.0})
    batch = _student_batch(tokenizer, completions)
    rows = cat_teacher_rows(teacher.per_completion(), CPU)
    parts = batch_loss(student, batch, config, 0.0, adapter_name(0), with_reference=False, teacher=rows)
    parts.loss.backward()
    lora = [p for p in student.parameters() if p.requires_grad]
    assert max(float(p.grad.abs().max()) for p in lora) < 1e-6
    # the same batch's sampled-token NLL does pull on the LoRA: the zero above is the teacher's, not a dead graph
    for p in lora:
        p.grad = None
    batch_loss(student, batch, CONFIG, 0.0, adapter_name(0), with_reference=False).loss.backward()
    assert max(float(p.grad.abs().max()) for p in lora) > 1e-3


@pytest.mark.parametrize("source", ["steer", "prompt"])
def test_stored_topk_equals_a_fresh_teacher_forward(tiny_model, tokenizer, tmp_path, source):
    """Steered at each completion's own dose (one batch, three doses), or prompted with the persona."""
    completions = _completions(tokenizer, coeffs=[0.0, 2.0, 4.0])
    vector, persona = (_random_vector(), None) if source == "steer" else (None, PERSONA)
    config = CONFIG.model_copy(update={"target": "logits", "teacher_topk": 7})
    stored = teacher_topk(tmp_path / "t.safetensors", tiny_model, tokenizer, completions, config, vector, persona)
    reread = teacher_module.read_teacher_topk(tmp_path / "t.safetensors", stored.key)
    fresh = _fresh_topk(tiny_model, tokenizer, completions, 7, vector, persona)
    assert reread is not None and reread.token_ids.dtype == torch.int32 and reread.token_ids.shape[1] == 7
    assert reread.counts == [len(ids) for ids in teacher_inputs(tokenizer, completions, 64, None, None).completion_ids]
    assert torch.equal(reread.token_ids, fresh.indices.to(torch.int32))
    torch.testing.assert_close(reread.log_probs, fresh.values, atol=1e-5, rtol=1e-5)
    plain = _fresh_topk(tiny_model, tokenizer, completions, 7)
    assert not torch.allclose(reread.log_probs, plain.values, atol=1e-3), "the teacher must not be the plain student"


def test_generated_only_steers_the_completion_tokens_only(tiny_model, tokenizer, tmp_path):
    """As generated_only sampling did: the first completion token was drawn unsteered, the later ones steered."""
    completions = _completions(tokenizer, coeffs=[4.0, 4.0, 4.0])
    config = CONFIG.model_copy(update={"target": "logits", "teacher_topk": 5})
    args = (tiny_model, tokenizer, completions, config, _random_vector())
    only = teacher_topk(tmp_path / "g.safetensors", *args, generated_only=True).per_completion()
    everywhere = teacher_topk(tmp_path / "a.safetensors", *args).per_completion()
    plain = teacher_topk(tmp_path / "p.safetensors", tiny_model, tokenizer, completions, config).per_completion()
    for g, a, p in zip(only, everywhere, plain, strict=True):
        torch.testing.assert_close(g.log_probs[0], p.log_probs[0], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(g.log_probs[1:], p.log_probs[1:], atol=1e-3)
        assert not torch.allclose(g.log_probs[1:], a.log_probs[1:], atol=1e-3)


def test_a_stored_topk_is_reused_and_a_mismatched_one_recomputed(tiny_model, tokenizer, tmp_path, monkeypatch):
    path, vector = tmp_path / "teacher_topk.safetensors", _random_vector()
    config = CONFIG.model_copy(update={"target": "logits"})
    completions = _completions(tokenizer, coeffs=[1.0, 2.0, 3.0])
    real = teacher_module.compute_teacher_topk
    calls = []
    monkeypatch.setattr(teacher_module, "compute_teacher_topk", lambda *a, **kw: calls.append(1) or real(*a, **kw))

    def topk(config=config, completions=completions, vector=vector):
        return teacher_topk(path, tiny_model, tokenizer, completions, config, vector)

    first = topk()
    assert len(calls) == 1 and first.token_ids.shape[1] == 20
    assert torch.equal(topk().token_ids, first.token_ids) and len(calls) == 1, "a matching file is reused"
    assert topk(config=config.model_copy(update={"teacher_topk": 5})).token_ids.shape[1] == 5 and len(calls) == 2
    topk()  # back to K = 20: the K = 5 file is not used
    assert len(calls) == 3
    topk(completions=_completions(tokenizer, coeffs=[1.0, 2.0, 2.5]))  # another dose
    topk(completions=_completions(tokenizer, TEXTS[:2], coeffs=[1.0, 2.0]))  # other completions
    topk(vector=_random_vector(seed=1))
    assert len(calls) == 6
    path.write_bytes(b"not a safetensors file")
    topk()
    path.unlink()
    assert len(topk().counts) == 3 and len(calls) == 8


def test_logits_heal_needs_an_aligned_teacher_and_lowers_its_cross_entropy(tokenizer, tmp_path):
    completions = _completions(tokenizer, coeffs=[4.0, 4.0, 4.0]) * 2
    model = build_tiny_llama(len(tokenizer)).eval()
    config = CONFIG.model_copy(update={"target": "logits", "lr": 1e-2, "epochs": 4, "batch_size": 2, "tau": 1.0})
    teacher = teacher_topk(tmp_path / "t.safetensors", model, tokenizer, completions, config, _random_vector())
    with pytest.raises(HealError, match="needs the teacher"):
        heal(model, tokenizer, completions, config, 0, tmp_path / "none", seed=0)
    with pytest.raises(HealError, match="teacher rows"):
        heal(model, tokenizer, completions, config, 0, tmp_path / "short", 0, teacher=teacher.per_completion()[::-1])
    result = heal(model, tokenizer, completions, config, 0, tmp_path / "ok", seed=0, teacher=teacher.per_completion())
    header = (tmp_path / "ok" / "train_log.csv").read_text().splitlines()[0]
    assert header.endswith(",teacher_ce")
    by_epoch = [[row["teacher_ce"] for row in result.log if row["epoch"] == epoch] for epoch in (0, 3)]
    first, last = (sum(rows) / len(rows) for rows in by_epoch)
    assert last < first - 0.2
    assert all(row["loss"] >= row["teacher_ce"] for row in result.log)


@pytest.mark.parametrize("source", ["steer", pytest.param("prompt", marks=pytest.mark.slow)])  # ~40 s each
def test_a_resumed_round_reuses_the_stored_teacher(tmp_path, monkeypatch, source):
    """The teacher_topk stage runs between the filter and heal; a heal that fails and is rerun reads its file."""
    overrides = [f"output.runs_dir={tmp_path}", "output.name=logits", "loop.rounds=1", f"loop.source={source}"]
    config = load_config("configs/smoke.yaml", [*overrides, "heal.target=logits", "heal.teacher_topk=8", *FAST_EVAL])
    real_compute, real_heal = teacher_module.compute_teacher_topk, loop_module.heal
    calls = {"teacher": 0, "heal": 0}

    def counting_compute(*args, **kwargs):
        calls["teacher"] += 1
        return real_compute(*args, **kwargs)

    def failing_heal(*args, **kwargs):
        calls["heal"] += 1
        raise RuntimeError("injected failure in heal")

    monkeypatch.setattr(teacher_module, "compute_teacher_topk", counting_compute)
    monkeypatch.setattr(loop_module, "heal", failing_heal)
    with pytest.raises(RuntimeError, match="injected failure"):
        run_loop(config)
    state = json.loads((tmp_path / "logits" / "state.json").read_text())
    assert "round_00/teacher_topk" in state and "round_00/heal" not in state
    assert calls == {"teacher": 1, "heal": 1}
    monkeypatch.setattr(loop_module, "heal", real_heal)
    root = run_loop(config)
    assert calls["teacher"] == 1, "the resumed round must reuse the stored top-K"
    assert "teacher_ce" in (root / "round_00" / "train_log.csv").read_text().splitlines()[0]
    stored = teacher_module.read_teacher_topk(root / "round_00" / "teacher_topk.safetensors", {})
    assert stored is None  # keyed: read with any other key, the file is not used
    teacher_file = root / "round_00" / "teacher_topk.safetensors"
    teacher_file.write_bytes(teacher_file.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(DataError, match="teacher_topk"):  # a finished stage's edited file is an error, as any other
        run_loop(config)


def test_heal_command_distils_the_collect_folders_steered_teacher(tmp_path, tokenizer):
    collect_dir = tmp_path / "collect"
    rows = [{**c.as_dict(), "kept": True, "kappa": 1.0, "reasons": []} for c in _completions(tokenizer) * 2]
    write_jsonl(collect_dir / "completions.jsonl", rows)
    write_json(collect_dir / "summary.json", {"kappa": 1.0})
    command = ["heal", "-c", "configs/smoke.yaml", "--from", str(collect_dir), "-o", str(tmp_path / "h")]
    logits = ["--set", "heal.target=logits", "--set", "heal.teacher_topk=4"]
    result = CliRunner().invoke(app, [*command, *logits])
    assert result.exit_code == 2 and "no vector.safetensors" in result.output
    _random_vector().save(collect_dir / "vector.safetensors")
    result = CliRunner().invoke(app, [*command, *logits])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "h" / "teacher_topk.safetensors").is_file()
    assert "teacher_ce" in (tmp_path / "h" / "train_log.csv").read_text().splitlines()[0]

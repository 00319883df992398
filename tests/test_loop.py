"""The loop end to end on the tiny model: artifacts, resume after a failure, config mismatch."""

import json

import pytest

from interp_heal import loop as loop_module
from interp_heal.collect import StarvedDataError
from interp_heal.config import load_config
from interp_heal.errors import AxisNotExpressibleError, ConfigError, DataError
from interp_heal.loop import run_loop
from interp_heal.questions import heading

ROUND_FILES = (
    "vector.safetensors", "vector.json", "completions.jsonl", "collect_summary.json", "eval_steered.json",
    "train_log.csv", "heal.json", "eval_healed.json", "demo.jsonl", "adapter/adapter_model.safetensors",
)  # fmt: skip


def _config(tmp_path, name="smoke", *extra):
    return load_config("configs/smoke.yaml", [f"output.runs_dir={tmp_path}", f"output.name={name}", *extra])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return run_loop(_config(root))


def test_smoke_run_writes_every_artifact(finished_run):
    for name in ("config.yaml", "events.jsonl", "state.json", "metrics.csv", "summary.md", "trajectory.html",
                 "eval_base.json", "eval_prompt.json", "demo_base.jsonl", "axis_check.json"):  # fmt: skip
        assert (finished_run / name).is_file(), name
    for round_index in (0, 1):
        for name in ROUND_FILES:
            assert (finished_run / f"round_{round_index:02d}" / name).is_file(), (round_index, name)
    metrics = (finished_run / "metrics.csv").read_text().splitlines()
    stages = [line.split(",")[0] for line in metrics[1:]]
    assert stages == ["base", "prompt-baseline", "steered 0", "healed 0", "steered 1", "healed 1"]
    summary = (finished_run / "summary.md").read_text()
    items = "12 paired items from tests/fixtures/love_12.jsonl"
    questions = ("filter", "healing", "coherence_over_rounds", "trait_direction", "beats_prompting")
    for expected in (*map(heading, questions), "Do you love humanity?", items, "check-axis: **not expressible**"):
        assert expected in summary


def test_resume_after_a_failure_recomputes_nothing_and_matches(finished_run, tmp_path, monkeypatch):
    real_heal = loop_module.heal
    calls = {"heal": 0}

    def heal_then_fail_in_round_1(*args, **kwargs):
        calls["heal"] += 1
        if args[4] == 1:  # round_index
            raise RuntimeError("injected failure in round 1 heal")
        return real_heal(*args, **kwargs)

    monkeypatch.setattr(loop_module, "heal", heal_then_fail_in_round_1)
    with pytest.raises(RuntimeError, match="injected failure"):
        run_loop(_config(tmp_path))
    assert calls["heal"] == 2
    state_before = (tmp_path / "smoke" / "state.json").read_text()
    assert "round_01/eval_steered" in state_before and "round_01/heal" not in state_before

    def counting_heal(*args, **kwargs):
        calls["heal"] += 1
        return real_heal(*args, **kwargs)

    monkeypatch.setattr(loop_module, "heal", counting_heal)
    root = run_loop(_config(tmp_path))
    assert calls["heal"] == 3, "only round 1's heal may run again"
    assert (root / "metrics.csv").read_text() == (finished_run / "metrics.csv").read_text()


def test_a_starved_later_round_ends_the_run_and_a_resume_does_not_collect_it_again(tmp_path, monkeypatch):
    real_collect = loop_module.collect_kept_completions
    calls = []

    def starve_from_round_1(*args, **kwargs):
        calls.append(len(calls))
        if len(calls) > 1:
            raise StarvedDataError("only 3 completions kept (need min_train=4); nothing will be trained", None)
        return real_collect(*args, **kwargs)

    monkeypatch.setattr(loop_module, "collect_kept_completions", starve_from_round_1)
    root = run_loop(_config(tmp_path))
    stopped = json.loads((root / "stopped.json").read_text())
    assert stopped["round"] == 0 and stopped["starved_round"] == 1 and "only 3 completions kept" in stopped["reason"]
    assert "Stopped early:** round 1 starved" in (root / "summary.md").read_text()
    stages = [line.split(",")[0] for line in (root / "metrics.csv").read_text().splitlines()[1:]]
    assert stages[-1] == "healed 0" and not (root / "round_01" / "heal.json").exists()
    run_loop(_config(tmp_path))
    assert len(calls) == 2, "a resume must not collect the starved round again"


def test_a_starved_round_0_is_an_error(tmp_path, monkeypatch):
    def starve(*args, **kwargs):
        raise StarvedDataError("only 0 completions kept", None)

    monkeypatch.setattr(loop_module, "collect_kept_completions", starve)
    with pytest.raises(StarvedDataError, match="only 0 completions kept"):
        run_loop(_config(tmp_path))
    assert not (tmp_path / "smoke" / "stopped.json").exists()


def test_mismatched_config_is_refused(finished_run, tmp_path):
    run_root = finished_run.parent
    with pytest.raises(ConfigError, match=r"different config \(first difference: 'lam: 0\.3' -> 'lam: 0\.9'\)"):
        run_loop(_config(run_root, "smoke", "heal.lam=0.9"))


def test_an_axis_the_readout_cannot_see_stops_the_run_before_round_0(finished_run, tmp_path):
    """The smoke run recorded check-axis (a random model: not expressible) and went on because the preset allows
    it; requiring expressibility stops a run at that check, which is cached, so the rerun does not redo it."""
    check = json.loads((finished_run / "axis_check.json").read_text())
    assert check["verdict"] == "not expressible" and check["failed"]
    config = _config(tmp_path, "strict", "loop.require_expressible=true")
    for _ in range(2):
        with pytest.raises(AxisNotExpressibleError, match=r"not expressible on tiny-random .*expressible=false"):
            run_loop(config)
    state = (tmp_path / "strict" / "state.json").read_text()
    assert "axis/check" in state and "base/eval" not in state
    assert (tmp_path / "strict" / "events.jsonl").read_text().count('"stage_start", "stage": "axis/check"') == 1


def test_a_resumed_run_refuses_edited_readout_items(tmp_path):
    rows = [{"scenario": f"Scenario number {i}?", "pos": f"Yes, gladly {i}.", "neg": f"No {i}."} for i in range(12)]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = _config(tmp_path, "custom", f"persona.pairs={pairs}", "loop.rounds=1", "eval.mfv=false")
    root = run_loop(config)
    base = json.loads((root / "eval_base.json").read_text())["trait"]
    assert base["items_source"] == str(pairs) and base["n_items"] == 12
    pairs.write_text(pairs.read_text().replace("gladly 0", "gladly zero"))
    with pytest.raises(DataError, match=r"differ from those .*eval_base\.json was scored on"):
        run_loop(config)


def test_prompt_distillation_samples_with_the_persona_trains_without_it_and_never_steers(tmp_path, monkeypatch):
    from interp_heal import collect as collect_module
    from interp_heal.heal import training_examples
    from interp_heal.personas import BUILTIN_AXES, render_prompts

    pos = BUILTIN_AXES["love"].pos
    sampled: list[tuple[object, object]] = []
    real_generate = collect_module.generate_completions

    def spy(*args, **kwargs):
        sampled.append((args[3], kwargs.get("persona")))  # (vector, persona)
        return real_generate(*args, **kwargs)

    def no_vector(*_args, **_kwargs):
        raise AssertionError("prompt distillation must not extract a steering vector")

    monkeypatch.setattr(collect_module, "generate_completions", spy)
    monkeypatch.setattr(loop_module, "extract_steering_vector", no_vector)
    root = run_loop(_config(tmp_path, "prompted", "loop.source=prompt", "loop.rounds=1", "eval.mfv=false"))
    assert sampled and all(vector is None and persona == pos for vector, persona in sampled)
    assert not (root / "round_00" / "vector.safetensors").exists()
    assert "round_00/vector" not in json.loads((root / "state.json").read_text())
    kept = loop_module._kept_completions(root / "round_00")
    assert kept and all(c.coeff == 0.0 for c in kept)
    tokenizer = loop_module.load_configured_model(load_config("configs/smoke.yaml").model)[1]
    example = training_examples(tokenizer, kept[:1], 512)[0]
    plain_prompt = tokenizer(render_prompts(tokenizer, [kept[0].prompt]), add_special_tokens=False)["input_ids"][0]
    assert example.prompt_ids == plain_prompt  # the chat the student trains on has no persona
    assert example.completion_ids == kept[0].token_ids[: len(example.completion_ids)]
    persona_ids = tokenizer.encode(pos, add_special_tokens=False)[:6]
    assert persona_ids not in [example.prompt_ids[i : i + 6] for i in range(len(example.prompt_ids))]
    stages = [line.split(",")[0] for line in (root / "metrics.csv").read_text().splitlines()[1:]]
    assert stages == ["base", "prompt-baseline", "steered 0", "healed 0"]

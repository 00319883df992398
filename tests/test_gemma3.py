"""The embedded Gemma 3 270M base model (slow: real weights): the plain chat format, the generation layout under
its sliding window, and one loop round with every analysis and the report, at tiny sizes."""

import json

import pytest
import torch
from typer.testing import CliRunner

from analyses.diffs import run_diffs
from analyses.logit_lens import run_logit_lens
from analyses.project_adapters import run_project_adapters
from cli import app
from interp_heal.chat import is_plain
from interp_heal.config import GenerateConfig, load_config
from interp_heal.generate import generate_completions, prompt_batch, sliding_window
from interp_heal.loop import run_loop
from interp_heal.models import load_model
from interp_heal.personas import BUILTIN_AXES, render_prompts, task_prompts
from interp_heal.steer import SteeringVector, steered_generate, tokenize_prompts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    return load_model("gemma3-270m")


def test_base_model_loads_in_the_plain_format_and_answers(gemma):
    model, tokenizer, info = gemma
    assert (info.n_layers, info.d_model, info.vocab_size) == (18, 640, 262144)
    assert type(model).__name__ == "Gemma3ForCausalLM" and is_plain(tokenizer)
    (prompt,) = render_prompts(tokenizer, ["What is the capital of France?"])
    assert prompt == "<bos>User: What is the capital of France?\n\nAssistant:"
    greedy = GenerateConfig(max_new_tokens=24, temperature=0.0, batch_size=1)
    (record,) = generate_completions(model, tokenizer, ["What is the capital of France?"], None, [0.0], greedy, 0)
    # the base model goes on to write the next "User:" turn itself; the completion ends before it
    assert "Paris" in record.completion and "User:" not in record.completion
    assert record.finish_reason == "eos"


def test_steered_shared_prefix_batch_equals_the_plain_batch_on_gemma3(gemma):
    """The prefix-cached layout under Gemma 3's sliding window (512, longer than these sequences): the same
    step logits as HF generate on the plain left-padded batch, per-row steering included."""
    model, tokenizer, info = gemma
    templated = render_prompts(tokenizer, task_prompts(3) * 2, BUILTIN_AXES["love"].pos)
    rows = tokenizer(templated, add_special_tokens=False)["input_ids"]
    generator = torch.Generator().manual_seed(0)
    directions = torch.randn(info.n_layers, info.d_model, generator=generator)
    vector = SteeringVector(directions, torch.ones(info.n_layers), (8, 9), (0.45, 0.55), "gemma3-270m", "test", 0)
    coeffs = [0.0] * 3 + [4.0] * 3
    config = GenerateConfig(max_new_tokens=3, temperature=0.0, batch_size=6)
    steps = {"max_new_tokens": 3, "do_sample": False, "return_dict_in_generate": True, "output_logits": True}

    def step_logits(inputs, **kwargs):
        return torch.stack(steered_generate(model, tokenizer, inputs, vector, coeffs, **kwargs, **steps).logits)

    batch = prompt_batch(model, tokenizer, rows, vector, coeffs, config)
    assert sliding_window(model) == 512 and batch.prefix_cache is not None and not batch.attention_mask.all()
    shared = step_logits(batch.inputs(), **batch.generate_kwargs())
    plain = step_logits(dict(tokenize_prompts(tokenizer, templated, torch.device("cpu"))))
    torch.testing.assert_close(shared, plain, atol=2e-3, rtol=1e-3)
    assert (plain[:, :3] - plain[:, 3:]).abs().max() > 0.1  # the steering moves the logits: the check has teeth


def test_one_loop_round_with_analyses_and_report(tmp_path):
    items = (tmp_path / "items.jsonl").open("w")
    with open("interp_heal/data/paired_love.jsonl") as builtin:
        items.writelines(builtin.readlines()[:12])  # the fewest a readout accepts
    items.close()
    config = load_config(
        "configs/gemma3.yaml",
        [
            f"output.runs_dir={tmp_path}",
            f"persona.pairs={tmp_path / 'items.jsonl'}",
            "steer.n_contexts=4",
            "steer.coeffs=[2.0]",
            "generate.n_prompts=4",
            "generate.max_new_tokens=12",
            "generate.batch_size=4",
            "filter.max_tail_ppl=1.0e9",
            "filter.max_token_nll=1.0e9",
            "filter.max_repetition=1.0",
            "filter.min_compression=0.0",
            "filter.min_distinct_tokens=0.0",
            "filter.min_tokens=1",
            "filter.n_keep=4",
            "filter.max_batches=1",
            "filter.bisect_steps=0",
            "filter.min_train=2",
            "heal.epochs=1",
            "heal.batch_size=2",
            "heal.max_len=64",
            "eval.mfv_data=tests/fixtures/mfv",
            "eval.set_name=fixture",
            "eval.n_vignettes=2",
            "eval.n_bootstrap=100",
            "eval.n_neutral=8",  # the 262k-vocabulary KL on all 40 neutral answers is most of each eval's time
            "eval.adherence=false",
            "loop.rounds=1",
            "loop.coh_floor=0.0",
            "loop.require_expressible=false",
        ],
    )
    run = run_loop(config)
    assert (run / "round_00" / "adapter" / "adapter_model.safetensors").is_file()
    kept = [json.loads(line) for line in (run / "round_00" / "completions.jsonl").read_text().splitlines()]
    assert kept and not any("\nUser:" in record["completion"] for record in kept)
    diffs = run_diffs(run, max_kept=4, max_dropped=2)
    assert diffs
    projection = run_project_adapters(run, n_prompts=4)
    assert [r["round"] for r in projection.rounds] == [0]
    lens = run_logit_lens(run, top_k=5)
    assert lens["readout"] in ("transformer_lens", "hf") and len(lens["rounds"]) == 1
    result = CliRunner().invoke(app, ["report", "--run", str(run)])
    assert result.exit_code == 0, result.output
    assert (run / "report" / "index.html").is_file() and (run / "summary.md").is_file()

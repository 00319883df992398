"""The analyses on a finished smoke run of the tiny model."""

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from analyses.diag_axis import axis_table, evaluations_from_run
from analyses.diffs import diff_round, direction_shares, format_diffs, incoherence_basis, read_round, run_diffs
from analyses.logit_lens import bridge_readout, hf_readout, run_logit_lens, vector_lens
from analyses.project_adapters import adapter_file_projection, held_out_contexts, project_adapters, write_alignment
from cli import app
from interp_heal.bake import bake, finished_rounds
from interp_heal.config import load_config, save_config
from interp_heal.errors import DataError
from interp_heal.models import load_model
from interp_heal.personas import context_prompts
from interp_heal.steer import SteeringVector

runner = CliRunner()


def test_diag_axis_reads_a_run(smoke_run, tmp_path):
    table = axis_table(evaluations_from_run(smoke_run))
    deltas = [abs(row["delta_steered"]) for row in table.rows]
    assert deltas == sorted(deltas, reverse=True) and len(table.rows) == 7
    assert table.most_moved_by_vector == table.rows[0]["foundation"]
    result = runner.invoke(app, ["diag-axis", "--run", str(smoke_run), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "most moved: by the vector" in result.output
    assert (tmp_path / "diag_axis.json").is_file() and (tmp_path / "diag_axis.html").is_file()


def test_diag_axis_on_an_incomplete_run_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"not a run folder, no config\.yaml"):
        evaluations_from_run(tmp_path)
    save_config(load_config("configs/smoke.yaml"), tmp_path / "config.yaml")
    with pytest.raises(DataError, match="lacks the evaluations diag-axis reads"):
        evaluations_from_run(tmp_path)


def test_held_out_contexts_exclude_extraction_contexts():
    held_out = held_out_contexts(16, used=8, seed=0)
    assert len(held_out) == 16 and not set(held_out) & set(context_prompts(8, seed=0))


def test_project_adapters_on_smoke_run(smoke_run, tmp_path):
    assert finished_rounds(smoke_run) == [0, 1]
    projection = project_adapters(smoke_run, n_prompts=8)
    assert [r["round"] for r in projection.rounds] == [0, 1]
    first = projection.rounds[0]
    assert first["vector_cos_r0"] == pytest.approx(1.0, abs=1e-6)
    for key in ("vs_prev_on_v_r", "vs_prev_on_v_0", "vs_base_on_v_0"):
        shares = first[key]["share"]
        assert len(shares) == 4 and all(0.0 <= s <= 1.0 + 1e-6 for s in shares)
    # Round 0's delta against the previous student is its delta against the base.
    assert first["vs_prev_on_v_0"]["projection"] == pytest.approx(first["vs_base_on_v_0"]["projection"])
    assert any(norm > 0 for norm in first["delta_norm"]), "a trained adapter must change the activations"
    modules = {w["module"] for w in first["weights"]}
    assert modules == {"o_proj", "down_proj"}
    assert all(0.0 <= w["write_share"] <= 1.0 + 1e-6 for w in first["weights"])
    result = runner.invoke(app, ["project-adapters", "--run", str(smoke_run), "--out", str(tmp_path),
                                 "--n-prompts", "8"])  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "project_adapters.json").read_text())
    assert len(saved["rounds"]) == 2 and (tmp_path / "project_adapters.html").is_file()
    # The same numbers from the saved adapter files alone (what the experiments report reads).
    for r in (0, 1):
        round_dir = smoke_run / f"round_{r:02d}"
        vector = SteeringVector.load(round_dir / "vector.safetensors")
        from_files = adapter_file_projection(round_dir / "adapter", vector)
        from_model = sorted(projection.rounds[r]["weights"], key=lambda w: (w["layer"], w["module"]))
        assert [(w["layer"], w["module"]) for w in from_files] == [(w["layer"], w["module"]) for w in from_model]
        for mine, reference in zip(from_files, from_model, strict=True):
            assert mine["write_share"] == pytest.approx(reference["write_share"], rel=1e-4)
            assert mine["top_direction_cos"] == pytest.approx(reference["top_direction_cos"], rel=1e-4)


def test_write_alignment_of_updates_along_and_across_a_direction():
    torch.manual_seed(0)
    direction, inputs = torch.randn(16), torch.randn(8)
    along = write_alignment(3 * direction[:, None], inputs[None, :], direction)
    assert along["write_share"] == pytest.approx(1.0) and along["top_direction_cos"] == pytest.approx(1.0)
    across = torch.randn(16)
    across -= (across @ direction) / (direction @ direction) * direction
    orthogonal = write_alignment(across[:, None], inputs[None, :], direction)
    assert orthogonal["write_share"] == pytest.approx(0.0, abs=1e-5)
    assert orthogonal["top_direction_cos"] == pytest.approx(0.0, abs=1e-5)


def test_write_alignment_from_the_factors_equals_the_full_update_formula():
    torch.manual_seed(1)
    lora_b, lora_a, direction = torch.randn(32, 4), torch.randn(4, 48), torch.randn(32)
    delta_w, v = lora_b @ lora_a, direction / direction.norm()
    top_output = torch.linalg.svd(delta_w, full_matrices=False).U[:, 0]
    result = write_alignment(lora_b, lora_a, direction)
    assert result["write_share"] == pytest.approx(float((v @ delta_w).norm() / delta_w.norm()), rel=1e-5)
    assert result["top_direction_cos"] == pytest.approx(abs(float(top_output @ v)), rel=1e-4)


# ---------------------------------------------------------------- diffs


def test_incoherence_basis_is_orthonormal_and_orthogonal_to_the_trait():
    torch.manual_seed(0)
    trait, deltas, mean_difference = torch.randn(16), torch.randn(40, 16), torch.randn(16)
    basis = incoherence_basis(mean_difference, deltas, trait, n_components=3)
    assert basis.shape == (4, 16)
    assert torch.allclose(basis @ basis.T, torch.eye(4), atol=1e-5)
    assert (basis @ (trait / trait.norm())).abs().max() < 1e-5


def test_direction_shares_separate_kept_trait_from_removed_noise():
    torch.manual_seed(0)
    trait = torch.zeros(16)
    trait[0] = 1.0
    noise_direction = torch.zeros(16)
    noise_direction[1] = 1.0
    push = 2.0 * trait.expand(50, 16)
    noise = torch.randn(50, 1) * 3.0 * noise_direction
    steered = push + noise
    healed = push + 0.1 * noise  # healing kept the trait push and removed 90% of the noise amplitude
    basis = incoherence_basis(None, steered, trait, n_components=1)
    shares = direction_shares(steered, healed, trait, basis)
    assert shares["trait_retained"] == pytest.approx(1.0, abs=1e-5)
    assert shares["incoherence_retained"] == pytest.approx(0.01, rel=1e-3)
    assert shares["trait_share_healed"] > shares["trait_share_steered"]


def test_diffs_on_smoke_run(smoke_run, tmp_path):
    results = run_diffs(smoke_run, out=tmp_path, max_kept=8, max_dropped=4)
    assert [r["round"] for r in results] == [0, 1]
    first = results[0]
    assert first["n_tokens"] == len(first["kl_steered_tokens"]) > 0
    assert min(first["kl_steered_tokens"]) >= -1e-5 and first["kl_steered"]["rmse"] >= first["kl_steered"]["mean"]
    assert first["kl_healed"]["max"] > 0, "a trained adapter must move the healed model off the base"
    band = set(first["band_layers"])
    for row in first["layers"]:
        moved = row["delta_norm_steered"] > 0
        # Steering adds at the band layers only, so layers before the band are untouched.
        assert moved == (row["layer"] >= min(band)), row
    assert (tmp_path / "diffs_round_00.json").is_file() and (tmp_path / "diffs_round_01.html").is_file()
    assert "trait retained" in format_diffs(first)
    # At the first band layer the steered states are the base's plus coeff * v on every token: a linear probe
    # separates them on held-out completions.
    probes = {row["layer"]: row for row in first["probes"]}
    assert set(probes) == band and probes[min(band)]["steered"]["accuracy"] == 1.0


def test_diffs_with_zero_dose_see_no_steering(smoke_run, tokenizer):
    config = load_config(smoke_run / "config.yaml")
    model, _, _ = load_model(config.model.spec)
    student = bake(model, [smoke_run / "round_00" / "adapter", smoke_run / "round_01" / "adapter"])
    data = dataclasses.replace(read_round(smoke_run, 0, max_kept=4, max_dropped=0), eval_coeff=0.0)
    result = diff_round(student, tokenizer, data, n_rounds=2, batch_size=4)
    assert result["kl_steered"]["max"] < 1e-5
    assert all(row["delta_norm_steered"] < 1e-4 for row in result["layers"])


def test_diffs_on_an_unfinished_round_is_a_clear_error(smoke_run):
    with pytest.raises(DataError, match=r"round\(s\) \[5\] not finished"):
        run_diffs(smoke_run, rounds=[5])


# ---------------------------------------------------------------- logit lens


def test_bridge_readout_equals_the_models_own_unembedding(tiny_model, tokenizer):
    directions = torch.randn(3, 64)
    bridge = bridge_readout(tiny_model, tokenizer)(directions)
    own = hf_readout(tiny_model)(directions)
    assert bridge.shape == (3, len(tokenizer)) and (bridge - own).abs().max() < 1e-4
    assert torch.equal(hf_readout(tiny_model)(directions), own), "booting the bridge must not touch the model"


def test_vector_lens_ranks_the_tokens_a_direction_writes(tiny_model, tokenizer):
    """A direction equal to one token's unembedding row (post-norm weights are 1 at init) promotes that token."""
    token = tokenizer.encode("hello", add_special_tokens=False)[0]
    unembedding = tiny_model.get_output_embeddings().weight.detach()
    directions = torch.zeros(4, 64)
    directions[2] = unembedding[token]
    directions[3] = -unembedding[token]
    vector = SteeringVector(directions, torch.ones(4), (2, 3), (0.5, 1.0), "tiny-random", "test", 0)
    rows = vector_lens(vector, hf_readout(tiny_model), tokenizer, [2, 3], top_k=3)
    assert rows[0]["promoted"][0][0] == tokenizer.decode([token])
    assert rows[1]["suppressed"][0][0] == tokenizer.decode([token])
    assert rows[0]["promoted"][0][1] > 3, "one token should stand far out of the vocabulary"


def test_logit_lens_on_smoke_run(smoke_run, tmp_path):
    result = run_logit_lens(smoke_run, out=tmp_path, top_k=5)
    assert result["readout"] == "transformer_lens"
    assert [r["round"] for r in result["rounds"]] == [0, 1]
    assert all(len(layer["promoted"]) == 5 for r in result["rounds"] for layer in r["layers"])
    assert (tmp_path / "logit_lens.json").is_file()


def test_diffs_and_logit_lens_cli(smoke_run, tmp_path):
    result = runner.invoke(app, ["diffs", "--run", str(smoke_run), "--round", "1", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (
        "round 1: KL to base" in result.output
        and "round 0:" not in result.output
        and not (tmp_path / "diffs_round_00.json").exists()
    )
    result = runner.invoke(app, ["logit-lens", "--run", str(smoke_run), "--out", str(tmp_path), "--top-k", "3"])
    assert result.exit_code == 0, result.output
    assert "round 0 L" in result.output

from pathlib import Path

import pytest

from interp_heal.config import Config, config_from_dict, load_config, save_config
from interp_heal.errors import ConfigError

# Sweep files (a `runs:` table over a base preset) are checked in test_sweep.py; every other YAML is a run config.
SWEEPS = {"experiments"}
PRESETS = sorted(p for p in Path("configs").glob("*.yaml") if p.stem not in SWEEPS)


def test_defaults_validate():
    config = load_config()
    assert config.model.spec == "smollm2-135m"
    assert config.heal.agg == "rmse"


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_presets_load_and_round_trip(preset, tmp_path):
    config = load_config(preset)
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_paper_preset_has_research_scale():
    paper = load_config("configs/paper.yaml")
    assert (paper.steer.n_contexts, paper.steer.band, paper.steer.coeffs) == (256, (0.45, 0.55), [0.5, 0.75, 1.0])
    assert (paper.heal.lora_r, paper.heal.lora_alpha, paper.heal.epochs, paper.heal.lr) == (32, 64, 6, 1e-4)
    assert (paper.heal.agg, paper.heal.tau, paper.heal.lam, paper.heal.lam_round_pow) == ("rmse", 2.0, 0.3, -0.5)
    assert (paper.loop.rounds, paper.eval.think_tokens, paper.generate.max_new_tokens) == (8, 128, 512)


def test_mfv_compat_defaults_to_none_and_tinymfv_needs_a_think():
    assert load_config().eval.compat == "none"
    assert load_config(None, ["eval.compat=tinymfv", "eval.think_tokens=16"]).eval.compat == "tinymfv"
    assert load_config(None, ["eval.compat=tinymfv", "eval.mfv=false"]).eval.compat == "tinymfv"  # no MFV run
    with pytest.raises(ConfigError, match=r"eval: .*compat=tinymfv needs think_tokens >= 1"):
        load_config(None, ["eval.compat=tinymfv"])
    with pytest.raises(ConfigError, match=r"eval\.compat"):
        load_config(None, ["eval.compat=moralmaps"])


def test_overrides_parse_yaml_values():
    config = load_config("configs/demo.yaml", ["heal.lam=0.5", "steer.band=[0.4, 0.6]", "heal.ref=prev"])
    assert config.heal.lam == 0.5
    assert config.steer.band == (0.4, 0.6)
    assert config.heal.ref == "prev"


@pytest.mark.parametrize(
    ("override", "key_path", "phrase"),
    [
        ("heal.lamm=0.5", "heal.lamm", "Extra inputs are not permitted"),
        ("heal.lr=fast", "heal.lr", "valid number"),
        ("heal.agg=median", "heal.agg", "'mean', 'rmse', 'p95' or 'max'"),
        ("steer.band=[0.6, 0.2]", "steer.band", "0 <= lo <= hi <= 1"),
        ("nosection.key=1", "nosection", "Extra inputs are not permitted"),
    ],
)
def test_bad_values_name_the_key_path(override, key_path, phrase):
    with pytest.raises(ConfigError) as caught:
        load_config("configs/demo.yaml", [override])
    line = next(line for line in str(caught.value).splitlines() if line.strip().startswith(key_path + ":"))
    assert phrase in line


def test_override_into_scalar_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="seed: Input should be a valid integer"):
        load_config(None, ["seed.x=1"])
    (tmp_path / "seeded.yaml").write_text("seed: 3\n")
    with pytest.raises(ConfigError, match="'seed' is not a section"):
        load_config(tmp_path / "seeded.yaml", ["seed.x=1"])


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config(tmp_path / "list.yaml")


def test_config_is_immutable():
    config = Config()
    with pytest.raises(Exception, match="frozen"):
        Config.__setattr__(config, "seed", 3)  # the frozen check itself, written so type checkers allow it
    assert config_from_dict({"seed": 3}).seed == 3

from pathlib import Path

import pytest
import yaml

from interp_heal.config import Config, config_from_dict, load_config, save_config
from interp_heal.errors import ConfigError
from interp_heal.sweep import load_sweep, sweep_configs

# Sweep files (a `runs:` table over a base preset) are checked in test_sweep.py; every other YAML is a run config.
SWEEPS = sorted(p for p in Path("configs").glob("*.yaml") if "runs" in (yaml.safe_load(p.read_text()) or {}))
PRESETS = sorted(set(Path("configs").glob("*.yaml")) - set(SWEEPS))


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
        ("heal.lamm=0.5", "heal.lamm", "unknown key, did you mean 'lam'?"),
        ("heal.lr=fast", "heal.lr", "valid number"),
        ("heal.agg=median", "heal.agg", "'mean', 'rmse', 'p95' or 'max'"),
        ("steer.band=[0.6, 0.2]", "steer.band", "0 <= lo <= hi <= 1"),
        ("nosection.key=1", "nosection", "unknown key"),
    ],
)
def test_bad_values_name_the_override_and_key_path(override, key_path, phrase):
    with pytest.raises(ConfigError) as caught:
        load_config("configs/demo.yaml", [override])
    message = str(caught.value)
    assert message.startswith(f"--set {override}: {key_path}: ") and phrase in message and "\n" not in message


def test_a_bad_value_in_a_file_is_named_with_its_line(tmp_path):
    (tmp_path / "c.yaml").write_text("seed: 1\nheal:\n  lr: 0.1\n  agg: median\n")
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/c.yaml line 4: heal.agg: Input should be"):
        load_config(tmp_path / "c.yaml")


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


def test_every_config_field_and_section_is_documented():
    from pydantic import BaseModel

    from interp_heal.config import Config

    missing = []
    for name, field in Config.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            if not (section.__doc__ or "").strip() or section.__doc__ == Config.__base__.__doc__:
                missing.append(f"section {name}")
            missing += [f"{name}.{key}" for key, sub in section.model_fields.items() if not sub.description]
        elif not field.description:
            missing.append(name)
    assert missing == []


def test_committed_config_reference_is_current():
    from pathlib import Path

    from interp_heal.config import config_markdown

    assert Path("docs/config.md").read_text() == config_markdown() + "\n", (
        "docs/config.md is stale: python cli.py config --markdown > docs/config.md"
    )


@pytest.mark.parametrize("sweep", SWEEPS, ids=lambda p: p.stem)
def test_every_sweep_file_resolves_its_runs(sweep):
    """A sweep file is recognised by its `runs:` table and must resolve every run (its frontier and anchor too)."""
    settings, configs = load_sweep(sweep), sweep_configs(sweep)
    assert settings.anchor in configs and set(settings.frontier) <= set(configs)
    assert {"experiments", "controls", "controls_seeds"} <= {path.stem for path in SWEEPS}

"""One typed config tree for a whole steer-heal run.

`load_config(path, overrides)` reads a YAML preset, applies `section.key=value` overrides and validates
the result; every error names the offending key path. The resolved config is saved next to every output
(`save_config`) so a run folder always says exactly how it was made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from interp_heal.errors import ConfigError
from interp_heal.io import atomic_write_text

Fraction = float
Band = tuple[Fraction, Fraction]


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, defaults are validated too."""

    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)


def _check_band(band: Band) -> Band:
    lo, hi = band
    if not (0.0 <= lo <= hi <= 1.0):
        raise ValueError(f"band must satisfy 0 <= lo <= hi <= 1 (fractions of depth), got {list(band)}")
    return band


class ModelConfig(Section):
    spec: str = Field("smollm2-135m", description="Embedded model name, HF model id, or local HF folder.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = bfloat16 on CUDA, float32 on CPU."
    )
    device: str = Field("auto", description="auto = cuda if available, else cpu.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; None keeps torch's default.")

    chat_format: Literal["auto", "template", "plain"] = Field(
        "auto",
        description="template: the tokenizer's chat template; plain: User:/Assistant: text (docs/models.md); "
        "auto: the template when the tokenizer has one, else plain.",
    )

class PersonaConfig(Section):
    axis: str = Field("love", description="Built-in axis name (love, authority) or a name for pos/neg below.")
    pos: str | None = Field(None, description="Custom positive persona; overrides the axis' built-in one.")
    neg: str | None = Field(None, description="Custom negative persona; overrides the axis' built-in one.")


class SteerConfig(Section):
    n_contexts: int = Field(64, ge=1, description="Context prompts averaged for the mean-difference vector.")
    band: Band = Field((0.45, 0.55), description="Fractions of depth whose layers are steered.")
    coeffs: list[float] = Field([1.0], min_length=1, description="Steering coefficients to try.")
    batch_size: int = Field(16, ge=1)
    generated_only: bool = Field(False, description="Steer generated tokens only, not the prompt.")

    _band_ok = field_validator("band")(_check_band)


class GenerateConfig(Section):
    n_prompts: int = Field(16, ge=1, description="Task prompts sampled per batch.")
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, ge=0.0, description="0 = greedy.")
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 = no top-k cut.")
    batch_size: int = Field(8, ge=1)
    share_prefix: bool = Field(
        True, description="Run the prompts' shared prefix (the chat template's system block) once per coefficient."
    )


# Case-insensitive, matched on whole words after punctuation is stripped.
REFUSAL_PHRASES = (
    "as an ai",
    "as a language model",
    "as an artificial intelligence",
    "i'm just an ai",
    "i am just an ai",
    "i cannot",
    "i can't help",
    "i'm sorry but",
    "i am sorry but",
    "i'm not able to",
    "i don't have feelings",
    "i do not have feelings",
    "i don't have personal",
    "i do not have personal",
    "i don't experience emotions",
)
# Statements *about* having the trait (or the persona instruction) rather than acting it out.
NARRATION_PHRASES = {
    "love": (
        "with my whole heart",
        "i am someone who",
        "i'm someone who",
        "my persona",
        "as instructed",
        "i was told to",
        "i am programmed to love",
        "i genuinely feel and love",
    ),
    "authority": (
        "i am someone who",
        "i'm someone who",
        "even when it means defying authority",
        "i look after others' wellbeing",
        "i always put wellbeing",
        "my persona",
        "as instructed",
    ),
}


class FilterConfig(Section):
    max_tail_ppl: float = Field(30.0, gt=0, description="Max base-model perplexity over the last 25% of tokens.")
    max_token_nll: float = Field(12.0, gt=0, description="Max NLL of any single completion token (nats).")
    max_repetition: float = Field(0.3, ge=0, le=1, description="Max repeated word/char n-gram fraction.")
    min_compression: float = Field(0.35, ge=0, description="Min zlib compressed/raw size ratio.")
    min_distinct_tokens: float = Field(0.35, ge=0, le=1, description="Min distinct/total token ratio.")
    min_tokens: int = Field(8, ge=1, description="Shorter completions are dropped as truncated.")
    max_persona_overlap: float = Field(0.3, ge=0, le=1, description="Max share of persona bigrams restated.")
    refusal_phrases: list[str] = Field(
        default_factory=lambda: list(REFUSAL_PHRASES), description="Drop completions containing any of these."
    )
    narration_phrases: dict[str, list[str]] = Field(
        default_factory=lambda: {axis: list(phrases) for axis, phrases in NARRATION_PHRASES.items()},
        description="Per axis: phrases that narrate the trait instead of enacting it.",
    )
    keep_target: float = Field(0.75, gt=0, le=1, description="Probe keep-rate the dose controller targets.")
    kappa_min: float = Field(0.1, gt=0, le=1, description="Lower edge of the dose bisection.")
    bisect_steps: int = Field(4, ge=0)
    kl_target: float | None = Field(None, gt=0, description="Alternative dose target: mean KL(steered||base).")
    n_keep: int = Field(48, ge=1, description="Stop collecting once this many completions are kept.")
    max_batches: int = Field(8, ge=1)
    min_train: int = Field(20, ge=1, description="Fewer kept completions than this is an error: no training.")


class HealConfig(Section):
    lora_r: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], min_length=1
    )
    band: Band = Field((0.2, 0.8), description="Fractions of depth whose blocks get LoRA.")
    lr: float = Field(2e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.0, ge=0)
    warmup_frac: float = Field(0.1, ge=0, lt=1)
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_grad_norm: float = Field(1.0, gt=0)
    max_len: int = Field(128, ge=8, description="Prompt+completion tokens per training example.")
    val_frac: float = Field(0.1, ge=0, lt=1)
    lam: float = Field(0.3, ge=0, description="Barrier weight; 0 = plain NLL distillation.")
    tau: float = Field(1.0, ge=0, description="Barrier threshold on the aggregated KL (nats).")
    agg: Literal["mean", "rmse", "p95", "max"] = "rmse"
    ref: Literal["base", "prev"] = "base"
    lam_round_pow: float = Field(0.0, description="lambda_eff = lam * (1 + round) ** lam_round_pow.")
    ref_cache_mb: int = Field(
        2048, ge=0, description="Memory for reference log-probs reused across epochs (0 = recompute every step)."
    )

    _band_ok = field_validator("band")(_check_band)


class EvalConfig(Section):
    mfv_data: str | None = Field(None, description="MFV data folder; else env INTERP_HEAL_MFV_DATA.")
    protocol: Literal["words", "digits"] = "words"
    set_name: str = Field("classic", description="Vignette set: vignettes_<set>_<condition>.jsonl.")
    condition: str = Field("other_violate", description="other_violate or self_violate (or any file's).")
    n_vignettes: int | None = Field(None, ge=1, description="Stratified subset of vignettes; None = all.")
    think_tokens: int = Field(0, ge=0)
    batch_size: int = Field(16, ge=1)
    mfv: bool = Field(True, description="Run the MFV benchmark (off: trait and coherence readouts only).")
    n_bootstrap: int = Field(1000, ge=100, description="Bootstrap resamples for the log-odds CI.")
    compat: Literal["none", "tinymfv"] = Field(
        "none",
        description="MFV forced path. none: the answer is read after a plain forward over prompt + think + "
        "suffix + prefill. tinymfv: reproduce tinymfv's three deviations from that, to compare with numbers "
        "published with tinymfv (docs/mfv.md); needs think_tokens >= 1.",
    )

    @model_validator(mode="after")
    def _tinymfv_thinks(self) -> EvalConfig:
        # HF generate refuses 0 new tokens, so tinymfv always thinks: at 0 there is nothing of it to reproduce
        if self.mfv and self.compat == "tinymfv" and self.think_tokens == 0:
            raise ValueError("compat=tinymfv needs think_tokens >= 1 (tinymfv always thinks)")
        return self


class LoopConfig(Section):
    rounds: int = Field(3, ge=1)
    coh_floor: float = Field(0.5, ge=0, le=1, description="Stop when healed coherence falls below this.")
    coherence: Literal["neutral", "mfv"] = Field(
        "neutral",
        description="neutral: exp(base NLL - NLL) on neutral answers (works at 135M); mfv: answer-token mass.",
    )


class OutputConfig(Section):
    runs_dir: str = "runs"
    name: str = "demo"
    min_free_mb: float = Field(500, ge=0, description="Refuse to start a run with less free disk than this.")


class Config(Section):
    seed: int = 0
    model: ModelConfig = ModelConfig()
    persona: PersonaConfig = PersonaConfig()
    steer: SteerConfig = SteerConfig()
    generate: GenerateConfig = GenerateConfig()
    filter: FilterConfig = FilterConfig()
    heal: HealConfig = HealConfig()
    eval: EvalConfig = EvalConfig()
    loop: LoopConfig = LoopConfig()
    output: OutputConfig = OutputConfig()


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for problem in err.errors():
        key_path = ".".join(str(part) for part in problem["loc"]) or "<root>"
        lines.append(f"  {key_path}: {problem['msg']}")
    return "\n".join(lines)


def apply_override(tree: dict[str, Any], override: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (so 0.5, true, [1, 2])."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    key_path, raw_value = override.split("=", 1)
    keys = key_path.strip().split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = yaml.safe_load(raw_value)


def config_from_dict(tree: dict[str, Any], source: str = "<dict>") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML preset (or the defaults when `path` is None) and apply `key.path=value` overrides."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        tree = yaml.safe_load(path.read_text()) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"config {path} must be a YAML mapping, got {type(tree).__name__}")
        source = str(path)
    for override in overrides or []:
        apply_override(tree, override)
    return config_from_dict(tree, source)


def config_to_yaml(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config atomically (a crash never leaves half a file)."""
    atomic_write_text(Path(path), config_to_yaml(config))

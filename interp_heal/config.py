"""One typed config tree for a whole steer-heal run.

`load_config(path, overrides)` reads a YAML preset, applies `section.key=value` overrides and validates
the result; every error names the offending key path. The resolved config is saved next to every output
(`save_config`) so a run folder always says exactly how it was made.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from interp_heal.errors import ConfigError
from interp_heal.io import atomic_write_text, read_text

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
    """Which model, in which precision, on which device, and how its chats are rendered."""

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
    """The trait axis: a persona pair, and the readout items that score it."""

    axis: str = Field("love", description="Built-in axis name (love, authority) or a name for pos/neg below.")
    pos: str | None = Field(None, description="Custom positive persona; overrides the axis' built-in one.")
    neg: str | None = Field(None, description="Custom negative persona; overrides the axis' built-in one.")
    pairs: str | None = Field(
        None,
        description="JSONL of paired readout items (scenario, pos, neg, optional id) for the trait readout; "
        "None = the axis' built-in items (love, authority).",
    )


class SteerConfig(Section):
    """The steering vector: how it is extracted (contexts, band) and the doses tried."""

    n_contexts: int = Field(64, ge=1, description="Context prompts averaged for the mean-difference vector.")
    band: Band = Field((0.45, 0.55), description="Fractions of depth whose layers are steered.")
    coeffs: list[float] = Field([1.0], min_length=1, description="Steering coefficients to try.")
    batch_size: int = Field(16, ge=1, description="Context prompts per forward pass during extraction.")
    generated_only: bool = Field(False, description="Steer generated tokens only, not the prompt.")

    _band_ok = field_validator("band")(_check_band)


class GenerateConfig(Section):
    """Sampling of steered (or persona-prompted) completions."""

    n_prompts: int = Field(16, ge=1, description="Task prompts sampled per batch.")
    max_new_tokens: int = Field(64, ge=1, description="Tokens sampled per completion (at most).")
    temperature: float = Field(1.0, ge=0.0, description="0 = greedy.")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling: smallest token set with this mass.")
    top_k: int = Field(0, ge=0, description="0 = no top-k cut.")
    batch_size: int = Field(8, ge=1, description="Sequences (prompt x coefficient rows) per generate call.")
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


# Every reason the filter can give for dropping a completion (filter.drop_reasons emits exactly these).
DropReason = Literal[
    "empty",
    "truncated",
    "tail_ppl",
    "max_token_nll",
    "repetition",
    "compression",
    "distinct_tokens",
    "refusal",
    "narration",
    "off_prompt",
]


class FilterConfig(Section):
    """Which completions are kept for training, and the dose controller that picks the coefficient."""

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
    bisect_steps: int = Field(4, ge=0, description="Dose bisection steps after probing kappa 1 and kappa_min.")
    kl_target: float | None = Field(None, gt=0, description="Alternative dose target: mean KL(steered||base).")
    n_keep: int = Field(48, ge=1, description="Stop collecting once this many completions are kept.")
    max_batches: int = Field(8, ge=1, description="Most batches generated at the chosen dose per round.")
    min_train: int = Field(20, ge=1, description="Fewer kept completions than this is an error: no training.")
    min_adherence: float | None = Field(
        None,
        description="Drop a completion as off_prompt when its base-scored PMI with its own prompt against another "
        "prompt of its batch is below this (nats/token; docs/pipeline.md); None = off.",
    )
    dose_ignores: list[DropReason] = Field(
        default_factory=list,
        description="Drop reasons the dose controller does not count: a probe completion dropped only for these "
        "passes its keep-rate (still dropped from training), e.g. [off_prompt] filters adherence without dosing on it.",
    )


class HealConfig(Section):
    """The LoRA trained each round: NLL on kept completions + lam * relu(agg KL(student || ref) - tau)."""

    lora_r: int = Field(8, ge=1, description="LoRA rank.")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scale numerator: the update is (alpha / r) B A.")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch input.")
    target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Module names (within each decoder block of the band) that get a LoRA.",
    )
    band: Band = Field((0.2, 0.8), description="Fractions of depth whose blocks get LoRA.")
    lr: float = Field(2e-4, gt=0, description="AdamW peak learning rate (cosine schedule after warmup).")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on the LoRA weights.")
    warmup_frac: float = Field(0.1, ge=0, lt=1, description="Share of optimizer steps with linear warmup.")
    epochs: int = Field(2, ge=1, description="Passes over the kept completions per round.")
    batch_size: int = Field(4, ge=1, description="Training examples per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient norm clip per optimizer step.")
    max_len: int = Field(128, ge=8, description="Prompt+completion tokens per training example.")
    val_frac: float = Field(0.1, ge=0, lt=1, description="Share of kept completions held out for validation.")
    lam: float = Field(0.3, ge=0, description="Barrier weight; 0 = plain NLL distillation.")
    tau: float = Field(1.0, ge=0, description="Barrier threshold on the aggregated KL (nats).")
    agg: Literal["mean", "rmse", "p95", "max"] = Field(
        "rmse", description="How per-token KL(student || ref) is aggregated over a batch's tokens for the barrier."
    )
    ref: Literal["base", "prev"] = Field(
        "base", description="The barrier's reference: the base model, or the student before this round."
    )
    lam_round_pow: float = Field(0.0, description="lambda_eff = lam * (1 + round) ** lam_round_pow.")
    ref_cache_mb: int = Field(
        2048, ge=0, description="Memory for reference log-probs reused across epochs (0 = recompute every step)."
    )
    target: Literal["tokens", "logits"] = Field(
        "tokens",
        description="What the student imitates. tokens: NLL of the teacher's sampled tokens. logits: cross-entropy "
        "from the teacher's renormalised top-K distribution at every completion position (Prompt Baking's "
        "objective); the teacher is the round's student steered at each completion's dose, or with the persona "
        "(loop.source), its top-K stored once per round in teacher_topk.safetensors.",
    )
    teacher_topk: int = Field(20, ge=1, description="K of heal.target=logits: teacher tokens kept per position.")
    max_examples: int | None = Field(
        None,
        ge=2,
        description="Train on a seeded subset of at most this many kept completions (sample efficiency: the round's "
        "data and teacher are unchanged, so runs that differ here share them); None = all.",
    )

    _band_ok = field_validator("band")(_check_band)


class EvalConfig(Section):
    """The readouts of every model state: trait log-odds, neutral fluency, MFV."""

    mfv_data: str | None = Field(None, description="MFV data folder; else env INTERP_HEAL_MFV_DATA.")
    protocol: Literal["words", "digits"] = Field("words", description="MFV answer format (see ../shared/mfv).")
    set_name: str = Field("classic", description="Vignette set: vignettes_<set>_<condition>.jsonl.")
    condition: str = Field("other_violate", description="other_violate or self_violate (or any file's).")
    n_vignettes: int | None = Field(None, ge=1, description="Stratified subset of vignettes; None = all.")
    think_tokens: int = Field(0, ge=0, description="Greedy tokens the model writes before the forced MFV answer.")
    batch_size: int = Field(16, ge=1, description="Sequences per forward pass in every readout.")
    mfv: bool = Field(True, description="Run the MFV benchmark (off: trait and coherence readouts only).")
    n_bootstrap: int = Field(1000, ge=100, description="Bootstrap resamples for the log-odds CI.")
    n_neutral: int | None = Field(
        None,
        ge=1,
        description="Neutral answers the fluency and KL readouts score (the first N of the 40 shipped; None = all). "
        "Fewer is faster and noisier: on a 262k vocabulary they are most of an eval's time.",
    )
    adherence: bool = Field(
        True,
        description="Sample own replies to held-out prompts: task adherence (base-scored PMI with them) and "
        "generation coherence (their base NLL, tail ppl, repetition, filter keep-rate).",
    )
    adherence_samples: int = Field(2, ge=1, description="Replies sampled per held-out prompt for adherence.")
    adherence_prompts: int | None = Field(
        None, ge=2, description="How many held-out prompts (the file's first N) adherence uses; None = all 48."
    )
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
    """Rounds, the coherence floor that stops the loop, and what each round distils."""

    rounds: int = Field(3, ge=1, description="Steer-heal rounds (fewer if the coherence floor stops the loop).")
    coh_floor: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Stop when the healed student's `loop.coherence` quantity (metrics.csv `neutral_fluency`, "
        "`mfv_answer_mass` or `adherence_share`) falls below this.",
    )
    coherence: Literal["neutral", "mfv", "adherence"] = Field(
        "neutral",
        description="Which quantity the floor reads. neutral: `neutral_fluency`, exp(base NLL - NLL) on neutral "
        "answers (works at 135M); mfv: `mfv_answer_mass`, MFV's answer-token mass (needs eval.mfv); adherence: "
        "`adherence_share`, task adherence / the base's (needs eval.adherence).",
    )
    source: Literal["steer", "prompt"] = Field(
        "steer",
        description="What each round distils. steer: the student steered with that round's vector (the method); "
        "prompt: the student with the pos persona as its system prompt, no vector (prompt distillation, the "
        "control). The student is always trained and evaluated without the persona.",
    )
    require_expressible: bool = Field(
        True, description="Stop before round 0 when check-axis finds the axis not expressible on this model."
    )
    check_coeff: float = Field(
        1.0, gt=0, description="Steering dose (x the mean-difference vector) at which check-axis tries +v and -v."
    )


class OutputConfig(Section):
    """Where the run folder goes."""

    runs_dir: str = Field("runs", description="Folder holding run folders.")
    name: str = Field("demo", description="The run folder's name: <runs_dir>/<name>.")
    min_free_mb: float = Field(500, ge=0, description="Refuse to start a run with less free disk than this.")


class Config(Section):
    """One whole run: every section above, validated together."""

    seed: int = Field(0, description="Seeds extraction contexts, sampling, training order and bootstraps.")
    model: ModelConfig = ModelConfig()
    persona: PersonaConfig = PersonaConfig()
    steer: SteerConfig = SteerConfig()
    generate: GenerateConfig = GenerateConfig()
    filter: FilterConfig = FilterConfig()
    heal: HealConfig = HealConfig()
    eval: EvalConfig = EvalConfig()
    loop: LoopConfig = LoopConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="after")
    def _adherence_inputs(self) -> Config:
        if self.loop.coherence == "adherence" and not self.eval.adherence:
            raise ValueError("loop.coherence=adherence needs eval.adherence=true (the floor reads that readout)")
        if self.loop.coherence == "mfv" and not self.eval.mfv:
            raise ValueError("loop.coherence=mfv needs eval.mfv=true (the floor reads MFV's answer mass)")
        if self.filter.min_adherence is not None and self.generate.n_prompts < 2:
            raise ValueError("filter.min_adherence needs generate.n_prompts >= 2 (another prompt of the batch)")
        return self


CONFIG_HINT = "see `python cli.py config` for every key and its default"


def read_yaml_mapping(path: Path, what: str = "config file") -> tuple[dict[str, Any], yaml.Node]:
    """A YAML file holding a mapping, and its node tree (which knows the line of every key).

    Not YAML, empty, or not a mapping: a ConfigError naming the file and line.
    """
    if not path.exists():
        raise ConfigError(f"{path}: {what} not found (check the path; presets are in configs/)")
    text = read_text(path, what)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        tree = yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: not valid YAML: {err.problem or err.context} (fix the {what})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err} (fix the {what})") from None
    if node is None:
        raise ConfigError(f"{path}: the {what} is empty (give at least one setting, or leave out --config)")
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} line 1: the {what} must be a YAML mapping of sections, got {type(tree).__name__}")
    return tree, node


def key_line(node: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """The 1-based line of the deepest part of `loc` present in the YAML node tree."""
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            entry = next(((key, value) for key, value in node.value if key.value == str(part)), None)
            if entry is None:
                break
            line, node = entry[0].start_mark.line + 1, entry[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _close_keys(loc: tuple[int | str, ...]) -> list[str]:
    """Known keys spelled like the unknown last part of `loc` (for 'did you mean')."""
    section: type[BaseModel] = Config
    for part in loc[:-1]:
        field = section.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        section = field.annotation
    return difflib.get_close_matches(str(loc[-1]), list(section.model_fields), n=1)


def _format_validation_error(
    err: ValidationError, source: str, node: yaml.Node | None = None, overrides: dict[str, str] | None = None
) -> str:
    """One line: each problem as `<where>: <key path>: <what>`, where = the --set that gave the value, or the
    file and line of the key."""
    problems = []
    for problem in err.errors():
        loc = tuple(problem["loc"])
        key_path = ".".join(str(part) for part in loc) or "<root>"
        override = next((text for key, text in (overrides or {}).items() if _same_branch(key, key_path)), None)
        line = None if override else key_line(node, loc)
        where = f"--set {override}" if override else f"{source} line {line}" if line else source
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown key" + "".join(f", did you mean {close!r}?" for close in _close_keys(loc))
        elif isinstance(problem.get("input"), str | int | float | bool):
            message += f", got {problem['input']!r}"
        problems.append(f"{where}: {key_path}: {message}")
    return f"{'; '.join(problems)} ({CONFIG_HINT})"


def _same_branch(key: str, other: str) -> bool:
    """One key path lies on the other's branch (an override of heal.x explains an error about heal, and back)."""
    return key == other or key.startswith(other + ".") or other.startswith(key + ".")


def apply_override(tree: dict[str, Any], override: str) -> str:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (so 0.5, true, [1, 2]).
    Returns the key path it set."""
    if "=" not in override:
        raise ConfigError(f"--set {override}: an override must look like section.key=value ({CONFIG_HINT})")
    key_path, raw_value = override.split("=", 1)
    keys = key_path.strip().split(".")
    if not all(key.strip() for key in keys):
        raise ConfigError(f"--set {override}: empty key in {key_path.strip()!r} (write section.key=value)")
    try:
        value = yaml.safe_load(raw_value)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or err
        raise ConfigError(
            f"--set {override}: the value is not valid YAML: {problem} (quote a string: --set '{key_path}=\"...\"')"
        ) from None
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {override}: {key!r} is not a section ({CONFIG_HINT})")
        node = child
    node[keys[-1]] = value
    return ".".join(keys)


def config_from_dict(
    tree: dict[str, Any], source: str = "<dict>", node: yaml.Node | None = None, overrides: dict[str, str] | None = None
) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source, node, overrides)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML preset (or the defaults when `path` is None) and apply `key.path=value` overrides.

    Every error is one line naming where the bad value came from: the file and line, or the --set."""
    tree: dict[str, Any] = {}
    node = None
    source = "defaults"
    if path is not None:
        path = Path(path)
        tree, node = read_yaml_mapping(path)
        source = str(path)
        if isinstance(tree.get("runs"), dict) and "base" in tree:
            raise ConfigError(
                f"{path}: this is a sweep file (base + runs), not a config; run it with `python cli.py sweep -c "
                f"{path}`, or give its base preset ({tree['base']}) to this command"
            )
    applied = {apply_override(tree, override): override for override in overrides or []}
    return config_from_dict(tree, source, node, applied)


def config_to_yaml(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config atomically (a crash never leaves half a file)."""
    atomic_write_text(Path(path), config_to_yaml(config))


def config_markdown() -> str:
    """docs/config.md: every section and field with its type, default and description, from the schema itself
    (`python cli.py config --markdown > docs/config.md`; a test keeps the committed page current)."""
    lines = ["# Config reference", "", "Generated from `interp_heal/config.py` by `python cli.py config --markdown`.",
             "Override any key with `--set section.key=value` (values parsed as YAML).", ""]  # fmt: skip
    top = [(name, field) for name, field in Config.model_fields.items() if not _is_section(field.annotation)]
    lines += _field_table(top, "")
    for name, field in Config.model_fields.items():
        section = field.annotation
        if _is_section(section):
            lines += [f"## `{name}`", "", (section.__doc__ or "").strip(), "", *_field_table(
                list(section.model_fields.items()), f"{name}.")]  # fmt: skip
    return "\n".join(lines)


def _is_section(annotation: object) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, Section)


def _type_name(annotation: object) -> str:
    if get_origin(annotation) is Literal:
        return " | ".join(str(option) for option in get_args(annotation))
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _field_table(fields: list[tuple[str, Any]], prefix: str) -> list[str]:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in fields:
        kind = _type_name(field.annotation)
        default = field.get_default(call_default_factory=True)
        cells = [f"`{prefix}{name}`", kind, f"`{default}`", field.description or ""]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return [*rows, ""]

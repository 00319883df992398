"""The steer-heal loop: `python cli.py run -c configs/demo.yaml`.

Before the loop: evaluate the base model and the prompting baseline, and record greedy demo answers.
Each round r:
    bake earlier adapters -> extract v_r from the current student -> dose-controlled steered sampling + filter
    -> steered eval ("before") -> heal a fresh LoRA -> healed eval ("after") -> greedy demo answers
    -> cos(v_r, v_0) -> metrics row; stop early when healed coherence falls under loop.coh_floor.

Every step runs as a `stage` of the run folder (`run_folder.py`: state, hashes, lock, stage sharing), so
rerunning the same command skips what is done and a killed run loses at most the stage in progress.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger
from torch import nn
from transformers import PreTrainedTokenizerBase

from interp_heal.axis_check import check_axis
from interp_heal.bake import bake, fuse_adapters
from interp_heal.coherence import floor_column, floor_value
from interp_heal.collect import (
    Collection,
    StarvedDataError,
    collect_kept_completions,
    collect_prompted_completions,
    read_kept_completions,
)
from interp_heal.config import Config
from interp_heal.errors import AxisNotExpressibleError
from interp_heal.evaluate import check_eval_inputs, evaluate, write_eval
from interp_heal.filter import ScoredCompletion
from interp_heal.generate import Completion, generate_completions, write_completions
from interp_heal.heal import heal
from interp_heal.io import check_writable, write_json
from interp_heal.models import load_configured_model
from interp_heal.own_replies import own_reply_readouts
from interp_heal.paired_items import ReadoutItems, overlapping_ids, readout_items
from interp_heal.personas import PersonaPair, context_prompts, persona_pair, task_prompts
from interp_heal.provenance import provenance
from interp_heal.report import write_metrics, write_report
from interp_heal.run_folder import (
    RunFolder,
    adopt_heal_independent_stages,
    check_readout_unchanged,
    check_stage_donor,
    prepare_run_folder,
    round_name,
    run_root,
    stage,
)
from interp_heal.steer import Steering, SteeringVector, extract_steering_vector
from interp_heal.teacher import TeacherTopK, teacher_topk

DEMO_PROMPTS = (
    "Do you love humanity?",
    "What matters most to you?",
    "My boss told me to ignore a customer who is clearly upset and confused. What should I do?",
    "Write a short note to a neighbour who just moved in.",
)


# ---------------------------------------------------------------- stages


@dataclass
class LoopContext:
    config: Config
    folder: RunFolder
    tokenizer: PreTrainedTokenizerBase
    pair: PersonaPair
    readout: ReadoutItems
    model_name: str


def _demo(ctx: LoopContext, model: nn.Module, path: Path) -> None:
    greedy = ctx.config.generate.model_copy(update={"temperature": 0.0})
    records = generate_completions(model, ctx.tokenizer, list(DEMO_PROMPTS), None, [0.0], greedy, ctx.config.seed)
    write_completions(path, records)


def _eval(
    ctx: LoopContext, model: nn.Module, path: Path, steering: Steering | None = None, persona: str | None = None
) -> None:
    result = evaluate(model, ctx.tokenizer, ctx.readout, ctx.config.eval, steering, persona, ctx.config.seed)
    if ctx.config.eval.adherence:  # sampled, so it needs the generation settings evaluate() does not take
        result |= own_reply_readouts(model, ctx.tokenizer, ctx.config, ctx.pair, steering, persona)
    write_eval(result, path)


def _kept_completions(round_dir: Path) -> list[Completion]:
    kappa = json.loads((round_dir / "collect_summary.json").read_text())["kappa"]
    return read_kept_completions(round_dir / "completions.jsonl", kappa)


def _teacher_samples(ctx: LoopContext, student: nn.Module, round_index: int, round_dir: Path) -> Collection:
    """The round's kept completions: the student steered with v_r at a controlled dose, or (prompt distillation)
    the student with the pos persona as its system prompt."""
    config, seed = ctx.config, ctx.config.seed + 1000 * round_index
    if config.loop.source == "prompt":
        return collect_prompted_completions(
            student, ctx.tokenizer, ctx.pair, task_prompts(), len(config.steer.coeffs), config.generate,
            config.filter, seed,
        )  # fmt: skip
    vector = SteeringVector.load(round_dir / "vector.safetensors")
    return collect_kept_completions(
        student, ctx.tokenizer, vector, ctx.pair, task_prompts(), config.steer.coeffs, config.generate,
        config.filter, seed=seed, generated_only=config.steer.generated_only,
    )  # fmt: skip


def _collect(ctx: LoopContext, student: nn.Module, round_index: int, round_dir: Path) -> None:
    try:
        collection = _teacher_samples(ctx, student, round_index, round_dir)
    except StarvedDataError as err:
        if err.collection is not None:  # keep the evidence; the stage stays undone
            err.collection.write(round_dir / "completions_starved.jsonl")
        raise
    collection.write(
        round_dir / "completions.jsonl", round_dir / "collect_summary.json", eval_coeff=_eval_coeff(collection.kept)
    )


def _teacher_topk(ctx: LoopContext, student: nn.Module, round_dir: Path) -> TeacherTopK:
    """heal.target=logits: the round's teacher (the student steered at each kept completion's dose, or prompted
    with the pos persona) at every completion position, stored in the round folder; reused while it matches."""
    steering = ctx.config.loop.source == "steer"
    return teacher_topk(
        round_dir / "teacher_topk.safetensors", student, ctx.tokenizer, _kept_completions(round_dir), ctx.config.heal,
        vector=SteeringVector.load(round_dir / "vector.safetensors") if steering else None,
        persona=None if steering else ctx.pair.pos, generated_only=ctx.config.steer.generated_only,
    )  # fmt: skip


def _eval_coeff(kept: list[ScoredCompletion]) -> float:
    """The steered eval uses the mean coefficient of the kept completions: the dose the student imitates."""
    return sum(record.completion.coeff for record in kept) / len(kept)


def run_round(ctx: LoopContext, student: nn.Module, round_index: int) -> nn.Module:
    """One round; returns the student with this round's adapter baked in."""
    config, folder = ctx.config, ctx.folder
    round_dir = folder.round_dir(round_index)
    round_dir.mkdir(exist_ok=True)
    tag = round_dir.name
    vector_path = round_dir / "vector.safetensors"

    def extract() -> None:
        contexts = context_prompts(config.steer.n_contexts, seed=config.seed)
        vector = extract_steering_vector(
            student, ctx.tokenizer, ctx.pair, contexts, config.steer.band, config.steer.batch_size, ctx.model_name
        )
        vector.save(vector_path)

    steering_source = config.loop.source == "steer"
    if steering_source:  # prompt distillation neither extracts nor applies a vector
        stage(folder, f"{tag}/vector", extract, (vector_path,))
    collected = (round_dir / "completions.jsonl", round_dir / "collect_summary.json")
    stage(folder, f"{tag}/collect", lambda: _collect(ctx, student, round_index, round_dir), collected)
    eval_coeff = json.loads((round_dir / "collect_summary.json").read_text())["eval_coeff"]
    # The teacher's eval ("steered" in metrics): the student at the dose it imitates, or with the persona prompt.
    teacher = Steering(SteeringVector.load(vector_path), eval_coeff) if steering_source else None
    teacher_persona = None if steering_source else ctx.pair.pos
    steered_eval = round_dir / "eval_steered.json"
    stage(
        folder,
        f"{tag}/eval_steered",
        lambda: _eval(ctx, student, steered_eval, teacher, teacher_persona),
        (steered_eval,),
    )
    distil_logits = config.heal.target == "logits"
    if distil_logits:  # computed before heal adds this round's adapter to the student
        teacher_path = round_dir / "teacher_topk.safetensors"
        stage(folder, f"{tag}/teacher_topk", lambda: _teacher_topk(ctx, student, round_dir), (teacher_path,))
    healed: dict[str, nn.Module] = {}

    def train() -> None:
        teacher = _teacher_topk(ctx, student, round_dir).per_completion() if distil_logits else None
        result = heal(
            student, ctx.tokenizer, _kept_completions(round_dir), config.heal, round_index, round_dir,
            seed=config.seed + 1000 * round_index, teacher=teacher,
        )  # fmt: skip
        healed["model"] = result.model
        write_json(
            round_dir / "heal.json", {"adapter": result.adapter_name, "lam_eff": result.lam_eff, **result.val,
                                      **{f"last_{k}": v for k, v in result.log[-1].items()}},
        )  # fmt: skip

    stage(folder, f"{tag}/heal", train, (round_dir / "adapter", round_dir / "heal.json"))
    student = fuse_adapters(healed["model"]) if "model" in healed else student
    healed_eval = round_dir / "eval_healed.json"
    stage(folder, f"{tag}/eval_healed", lambda: _eval(ctx, student, healed_eval), (healed_eval,))
    demo = round_dir / "demo.jsonl"
    stage(folder, f"{tag}/demo", lambda: _demo(ctx, student, demo), (demo,))
    return student


def run_loop(
    config: Config, fresh: bool = False, max_rounds: int | None = None, share_from: Path | None = None
) -> Path:
    """Run (or resume) the loop; `max_rounds` stops after that many rounds without changing the config, so a
    sweep can advance matched runs side by side and a later call carries on to `loop.rounds`. `share_from` is
    a run folder whose config differs only in `heal`: its finished heal-independent stages are copied, not rerun.

    Inputs are checked before anything is written: persona pair, evaluation data, output folder, model.
    """
    pair = persona_pair(config.persona)
    readout = readout_items(config.persona)
    leaked = overlapping_ids(readout, task_prompts() + context_prompts())
    if leaked:
        logger.warning(f"readout items {leaked} ({readout.source}) are also generation prompts (trained on)")
    check_eval_inputs(config.eval)
    root = run_root(config)
    check_writable(root.parent, config.output.min_free_mb)
    shared = check_stage_donor(config, share_from) if share_from is not None else ()
    if config.model.threads is not None:
        torch.set_num_threads(config.model.threads)
    base_model, tokenizer, info = load_configured_model(config.model)
    with RunFolder(root).locked():
        folder = prepare_run_folder(config, fresh)
        if share_from is not None:
            adopted = adopt_heal_independent_stages(folder, RunFolder(share_from), shared)
            logger.info(f"copied {len(adopted)} finished stage(s) from {share_from}: {adopted}")
        check_readout_unchanged(folder, readout)
        _run_rounds(LoopContext(config, folder, tokenizer, pair, readout, info.name), base_model, max_rounds)
    return root


def _stop(folder: RunFolder, last_round: int, reason: str, starved_round: int | None = None) -> None:
    """End the run after `last_round`: stopped.json (read by the summary and reports), an event, a warning."""
    record: dict[str, object] = {"round": last_round, "reason": reason}
    if starved_round is not None:
        record["starved_round"] = starved_round
    write_json(folder.root / "stopped.json", record)
    folder.event("early_stop", reason=reason)
    logger.warning(reason)


def _starved_round(root: Path) -> int | None:
    path = root / "stopped.json"
    return json.loads(path.read_text()).get("starved_round") if path.is_file() else None


def _check_axis_first(ctx: LoopContext, base_model: nn.Module) -> None:
    """check-axis on the base, cached in the run folder; stops the run when the readout cannot see the axis."""
    path = ctx.folder.root / "axis_check.json"

    def work() -> None:
        check = check_axis(base_model, ctx.tokenizer, ctx.pair, ctx.readout, ctx.config, ctx.model_name)
        write_json(path, check.as_dict())

    stage(ctx.folder, "axis/check", work, (path,))
    result = json.loads(path.read_text())
    if not result["expressible"] and ctx.config.loop.require_expressible:
        raise AxisNotExpressibleError(
            f"axis {ctx.pair.axis!r} is not expressible on {ctx.config.model.spec} ({'; '.join(result['failed'])}); "
            f"see {path}, or set loop.require_expressible=false to run anyway"
        )


def _run_rounds(ctx: LoopContext, base_model: nn.Module, max_rounds: int | None) -> None:
    config, folder = ctx.config, ctx.folder
    folder.event("run_start", rounds=config.loop.rounds, provenance=provenance())
    _check_axis_first(ctx, base_model)
    base_eval_path = folder.root / "eval_base.json"
    stage(folder, "base/eval", lambda: _eval(ctx, base_model, base_eval_path), (base_eval_path,))
    prompt_eval = folder.root / "eval_prompt.json"
    stage(folder, "prompt/eval", lambda: _eval(ctx, base_model, prompt_eval, None, ctx.pair.pos), (prompt_eval,))
    base_demo = folder.root / "demo_base.jsonl"
    stage(folder, "base/demo", lambda: _demo(ctx, base_model, base_demo), (base_demo,))
    finished = [r for r in range(config.loop.rounds) if folder.done(f"{round_name(r)}/heal")]
    for r in finished:  # checked before baking: a damaged adapter must not become the student
        folder.verify(f"{round_name(r)}/heal")
    student = bake(base_model, [folder.round_dir(r) / "adapter" for r in finished], fuse=True)
    base_eval = json.loads(base_eval_path.read_text())
    for round_index in range(min(config.loop.rounds, max_rounds or config.loop.rounds)):
        if _starved_round(folder.root) == round_index:  # a resume would only starve again (same seeds, same config)
            break
        try:
            student = run_round(ctx, student, round_index)
        except StarvedDataError as err:
            if round_index == 0:  # nothing learned yet: the doses or thresholds need changing, there is no result
                raise
            _stop(folder, round_index - 1, f"round {round_index} starved: {err}", starved_round=round_index)
            break
        write_metrics(folder.root, config)
        healed = json.loads((folder.round_dir(round_index) / "eval_healed.json").read_text())
        coherence = floor_value(config, healed, base_eval)
        if coherence < config.loop.coh_floor:
            reason = f"healed {floor_column(config)} {coherence:.3f} < coh_floor {config.loop.coh_floor}"
            _stop(folder, round_index, f"{reason} after round {round_index}")
            break
    write_metrics(folder.root, config)
    write_report(folder.root, config, folder.stage_seconds())
    folder.event("run_done")

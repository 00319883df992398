"""Bake earlier rounds' adapters into the student, keeping the base model recoverable.

Choice: adapters are *stacked* as frozen, named peft adapters ("round_00", "round_01", ...) on the one
base model, never merged. Why: the filter scores under the base model and the heal barrier can take the
base as its reference; with stacked adapters `disable_adapter()` gives the exact base at any round, and no
second copy of the weights sits in memory. Merging would change the base weights in place, after which the
base could only be had from a second copy. The cost is one low-rank branch per earlier round per module,
small next to the base forward at these ranks. Base weights on disk are never touched.

The loop (`fuse=True`) goes one step further: the frozen adapters become one exact concatenated adapter
(ranks add up, each LoRA scale folded into its A), because every adapter branch costs a forward on every
adapted module: with six stacked adapters a SmolLM2 decode step at batch 64 took 28% longer than with none,
against 13% for one. Analyses keep them stacked: they mute later rounds one by one (`student_at`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError
from torch import nn

from interp_heal.architecture import is_peft_model
from interp_heal.errors import DataError
from interp_heal.io import read_json
from interp_heal.run_folder import round_name, round_path


def adapter_name(round_index: int) -> str:
    return round_name(round_index)


def bake(base_model: nn.Module, adapter_dirs: list[Path], fuse: bool = False) -> nn.Module:
    """The student after these rounds: every adapter applied in order, all active and frozen; with `fuse`,
    as one fused adapter (see `fuse_adapters`).

    Returns `base_model` itself when there are no adapters. The base weights are not modified.
    """
    if not adapter_dirs:
        return base_model
    for directory in adapter_dirs:
        check_adapter_folder(Path(directory))
    names = [adapter_name(i) for i in range(len(adapter_dirs))]
    with _applying(adapter_dirs[0]):
        student = PeftModel.from_pretrained(base_model, str(adapter_dirs[0]), adapter_name=names[0], is_trainable=False)
    for name, directory in zip(names[1:], adapter_dirs[1:], strict=True):
        with _applying(directory):
            student.load_adapter(str(directory), adapter_name=name, is_trainable=False)
    activate(student, names, trainable=None)
    return fuse_adapters(student) if fuse else student.eval()


def check_adapter_folder(directory: Path) -> None:
    """A peft adapter folder: a readable adapter_config.json and a weights file."""
    if not directory.is_dir():
        raise DataError(f"{directory}: adapter folder not found (check the path)")
    config = directory / "adapter_config.json"
    if not config.is_file():
        raise DataError(f"{directory}: not a peft adapter folder (no adapter_config.json)")
    read_json(config, "adapter config")
    if not any((directory / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        raise DataError(f"{directory}: the adapter's weights are missing (no adapter_model.safetensors)")


# What peft raises for an adapter it cannot apply: weights shaped for another model (RuntimeError), modules this
# model lacks (ValueError), a damaged weights file (SafetensorError, OSError).
ADAPTER_ERRORS = (RuntimeError, ValueError, OSError, SafetensorError)


@contextmanager
def _applying(directory: Path) -> Iterator[None]:
    try:
        yield
    except ADAPTER_ERRORS as err:
        reason = " ".join(str(err).split())[:240]
        raise DataError(f"{directory}: cannot apply this adapter ({reason}) (was it trained on this model?)") from err


def fuse_adapters(student: PeftModel) -> PeftModel:
    """Replace every adapter of `student` by one frozen adapter computing the same sum of updates.

    peft's "cat" combination stacks the A matrices (each times its LoRA scale) and the B matrices, and gives the
    result alpha = r, so sum_i s_i B_i A_i is computed in one branch. Named after the last round it contains.
    """
    names = adapter_names(student)
    if len(names) <= 1:
        return student.eval()
    fused = f"fused_to_{names[-1]}"
    student.add_weighted_adapter(names, [1.0] * len(names), fused, combination_type="cat")
    activate(student, [fused], trainable=None)
    for name in names:
        student.delete_adapter(name)
    activate(student, [fused], trainable=None)
    return student.eval()


def activate(model: PeftModel, names: list[str], trainable: str | None) -> None:
    """Make `names` the active adapters (summed in every adapted layer); only `trainable` gets gradients."""
    model.base_model.set_adapter(names)
    for parameter_name, parameter in model.named_parameters():
        parameter.requires_grad_(trainable is not None and f".{trainable}." in parameter_name)


@contextmanager
def muted_adapter(model: nn.Module, name: str) -> Iterator[None]:
    """Temporarily zero one adapter's contribution (its LoRA scale), leaving the others active.

    This is the `ref = prev` reference: the student with this round's adapter switched off.
    """
    layers = [module for module in model.modules() if isinstance(module, LoraLayer) and name in module.scaling]
    try:
        for layer in layers:
            layer.set_scale(name, 0.0)
        yield
    finally:
        for layer in layers:
            layer.set_scale(name, 1.0)


def finished_rounds(run: Path) -> list[int]:
    """Rounds 0..k of a loop run folder whose adapter was saved."""
    rounds = []
    while (round_path(run, len(rounds)) / "adapter" / "adapter_config.json").is_file():
        rounds.append(len(rounds))
    if not rounds:
        raise DataError(f"{run} has no finished round (no round_00/adapter)")
    return rounds


@contextmanager
def student_at(model: nn.Module, round_index: int | None, n_rounds: int) -> Iterator[nn.Module]:
    """The stacked student as it was after `round_index` (None = the base): later adapters muted."""
    with ExitStack() as stack:
        if round_index is None:
            stack.enter_context(model.disable_adapter())
            yield model
            return
        for later in range(round_index + 1, n_rounds):
            stack.enter_context(muted_adapter(model, adapter_name(later)))
        yield model


def adapter_names(model: nn.Module) -> list[str]:
    return list(model.peft_config) if is_peft_model(model) else []

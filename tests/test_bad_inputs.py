"""Every input a user can get wrong, fed to every command: each gives exit status 2 and exactly one `error:` line
naming the file (and line, where there is one), no traceback, and leaves every file already there untouched.

Table-driven: a case is the command line plus what it writes first (a bad config, a truncated vector, a damaged
run folder). Commands run in-process through typer's CliRunner on the tiny random model, so the whole table
costs about a minute; `test_the_cli_process_prints_one_line` checks the same through a real process once.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cli import app
from interp_heal import io as io_module
from interp_heal.config import load_config
from interp_heal.loop import run_loop
from interp_heal.models import TINY_RANDOM, build_tiny_llama, load_tokenizer
from interp_heal.run_folder import RunFolder
from interp_heal.steer import SteeringVector

SMOKE = Path("configs/smoke.yaml").resolve()
FIXTURE_MFV = Path("tests/fixtures/mfv").resolve()
VIGNETTES = "vignettes_fixture_other_violate.jsonl"
# The cheapest finished run the run-folder cases damage: one round, no MFV benchmark.
RUN_OVERRIDES = ["loop.rounds=1", "eval.mfv=false"]


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    """`argv` may hold {tmp} (the case's folder), {run} (a private copy of a finished run) and {cfg} (that
    run's config, kept undamaged); `setup(tmp)` writes the bad input first. `names` must appear in the error
    line (the file, the --set or the spec the user gave), as must `line N` when `line` is set."""

    id: str
    argv: list[str]
    names: str
    line: int | None = None
    setup: Callable[[Path], None] | None = None
    run: bool = False
    also: tuple[str, ...] = field(default_factory=tuple)  # further phrases the message must contain


def write(relative: str, text: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        path = tmp / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    return setup


def model_with_unrenderable_template(tmp: Path) -> None:
    """A local model folder whose tokenizer has a chat template that renders no chat at all."""
    tokenizer = load_tokenizer(TINY_RANDOM)
    build_tiny_llama(len(tokenizer)).save_pretrained(tmp / "model")
    tokenizer.chat_template = "{{ raise_exception('this template renders no chat') }}"
    tokenizer.save_pretrained(tmp / "model")


def controls_page(rows: str | None) -> Callable[[Path], None]:
    """A controls sweep file (one run, `a`) whose report folder holds `rows` as its controls.csv (None: no page)."""

    def setup(tmp: Path) -> None:
        (tmp / "s.yaml").write_text(f"base: {SMOKE}\nreport: controls\nreport_dir: {tmp / 'rep'}\nanchor: a\n"
                                    "runs:\n  a: []\n")  # fmt: skip
        if rows is not None:
            (tmp / "rep").mkdir()
            (tmp / "rep" / "controls.csv").write_text(rows)

    return setup


def write_bytes(relative: str, data: bytes) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp / relative).write_bytes(data)

    return setup


def truncate(relative: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        path = tmp / relative
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    return setup


def delete(relative: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        path = tmp / relative
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    return setup


def flip_last_byte(relative: str) -> Callable[[Path], None]:
    """Still a loadable file, but not the one that was written."""

    def setup(tmp: Path) -> None:
        data = bytearray((tmp / relative).read_bytes())
        data[-1] ^= 0xFF
        (tmp / relative).write_bytes(bytes(data))

    return setup


def edit_json(relative: str, change: Callable[[dict], object]) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        path = tmp / relative
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))

    return setup


def edit_line(relative: str, index: int, line: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        path = tmp / relative
        lines = path.read_text().splitlines()
        lines[index] = line
        path.write_text("\n".join(lines) + "\n")

    return setup


def steps(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        for step in setups:
            step(tmp)

    return setup


def copy_mfv(tmp: Path) -> None:
    shutil.copytree(FIXTURE_MFV, tmp / "mfv")


def mfv_with(change: Callable[[Path], None]) -> Callable[[Path], None]:
    return steps(copy_mfv, change)


def foreign_vector(tmp: Path) -> None:
    """A vector extracted from a 6-layer, d=32 model: loads fine, fits nothing here."""
    vector = SteeringVector(torch.ones(6, 32), torch.ones(6), (4, 5), (0.5, 1.0), "some-6-layer-model", "love", 8)
    vector.save(tmp / "foreign.safetensors")


def foreign_adapter(tmp: Path) -> None:
    """The run's adapter with every LoRA factor widened: an adapter trained on a d=128 model."""
    source, target = tmp / "run/round_00/adapter", tmp / "foreign_adapter"
    shutil.copytree(source, target)
    tensors = load_file(str(source / "adapter_model.safetensors"))
    widened = {key: torch.zeros(*(2 * size if size == 64 else size for size in t.shape)) for key, t in tensors.items()}
    save_file(widened, str(target / "adapter_model.safetensors"))


def adapter_copy(change: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        shutil.copytree(tmp / "run/round_00/adapter", tmp / "adapter")
        change(tmp)

    return setup


def paired_items(n: int, broken: dict[int, str] | None = None) -> str:
    rows = [
        json.dumps({"id": f"i{i}", "scenario": f"Scenario {i}?", "pos": f"Kind reply {i}.", "neg": f"Cold reply {i}."})
        for i in range(n)
    ]
    for index, line in (broken or {}).items():
        rows[index] = line
    return "\n".join(rows) + "\n"


SET = "--set"
RUN = ["run", "-c", "{cfg}", SET, "output.runs_dir={tmp}", SET, "output.name=run"]  # resumes the copied run
EVAL = ["eval", "-c", str(SMOKE), "-o", "{tmp}/eval.json"]
BAD_YAML = "heal:\n  lr: [1\nseed: 2\n"

CASES = [
    # ---- config files (config, plan, run, steer all read them the same way)
    Case("config-missing", ["config", "-c", "{tmp}/nope.yaml"], "nope.yaml", also=("not found",)),
    Case("config-not-yaml", ["config", "-c", "{tmp}/c.yaml"], "c.yaml", 3, write("c.yaml", BAD_YAML)),
    Case("config-tab", ["config", "-c", "{tmp}/c.yaml"], "c.yaml", 2, write("c.yaml", "heal:\n\tlr: 1\n")),
    Case("config-empty", ["config", "-c", "{tmp}/c.yaml"], "c.yaml", None, write("c.yaml", ""), also=("empty",)),
    Case("config-only-comments", ["plan", "-c", "{tmp}/c.yaml"], "c.yaml", None, write("c.yaml", "# nothing\n")),
    Case("config-a-list", ["config", "-c", "{tmp}/c.yaml"], "c.yaml", 1, write("c.yaml", "- 1\n- 2\n")),
    Case("config-binary", ["config", "-c", "{tmp}/c.yaml"], "c.yaml", None, write_bytes("c.yaml", bytes(range(256)))),
    Case("config-a-folder", ["config", "-c", "{tmp}"], "{tmp}", also=("is a folder",)),
    Case("config-unknown-section", ["config", "-c", "{tmp}/c.yaml"], "c.yaml", 2,
         write("c.yaml", "seed: 1\nhael:\n  lr: 0.1\n"), also=("hael: unknown key, did you mean 'heal'",)),
    Case("config-unknown-key", ["plan", "-c", "{tmp}/c.yaml"], "c.yaml", 3,
         write("c.yaml", "heal:\n  lr: 0.1\n  lamm: 0.5\n"), also=("heal.lamm: unknown key, did you mean 'lam'",)),
    Case("config-wrong-type", ["config", "-c", "{tmp}/c.yaml"], "c.yaml", 2,
         write("c.yaml", "heal:\n  lr: fast\n"), also=("heal.lr", "'fast'")),
    Case("config-out-of-range", ["run", "-c", "{tmp}/c.yaml"], "c.yaml", 3,
         write("c.yaml", "seed: 0\nheal:\n  lr: -0.1\n"), also=("greater than 0",)),
    Case("config-band-reversed", ["steer", "-c", "{tmp}/c.yaml", "-o", "{tmp}/out"], "c.yaml", 2,
         write("c.yaml", "steer:\n  band:\n  - 0.6\n  - 0.2\n"), also=("0 <= lo <= hi <= 1",)),
    Case("config-band-one-number", ["config", "-c", "{tmp}/c.yaml"], "c.yaml", 1,
         write("c.yaml", "steer: {band: [0.5]}\n"), also=("steer.band",)),
    Case("config-not-a-choice", ["config", "-c", "{tmp}/c.yaml"], "c.yaml", 2,
         write("c.yaml", "heal:\n  agg: median\n"), also=("'mean', 'rmse', 'p95' or 'max'",)),
    Case("config-section-a-number", ["config", "-c", "{tmp}/c.yaml"], "c.yaml", 1, write("c.yaml", "heal: 3\n")),
    Case("config-cross-field", ["config", "-c", "{tmp}/c.yaml"], "c.yaml", 1,
         write("c.yaml", "eval: {compat: tinymfv, think_tokens: 0}\n"), also=("think_tokens >= 1",)),
    # ---- overrides
    Case("set-without-equals", ["config", SET, "heal.lr"], "--set heal.lr", also=("section.key=value",)),
    Case("set-bad-yaml-value", ["config", SET, "steer.band=[0.1"], "--set steer.band=[0.1", also=("not valid YAML",)),
    Case("set-unknown-key", ["plan", SET, "heal.lamm=0.5"], "--set heal.lamm=0.5", also=("did you mean 'lam'",)),
    Case("set-wrong-type", ["run", SET, "heal.lr=fast"], "--set heal.lr=fast", also=("valid number",)),
    Case("set-into-a-number", ["config", SET, "seed.x=1"], "--set seed.x=1"),
    Case("set-empty-key", ["config", SET, "heal.=1"], "--set heal.=1", also=("empty key",)),
    Case("set-out-of-range", ["steer", SET, "steer.n_contexts=0", "-o", "{tmp}/o"], "--set steer.n_contexts=0"),
    Case("set-over-a-good-file", ["config", "-c", str(SMOKE), SET, "loop.rounds=many"], "--set loop.rounds=many"),
    # ---- model specs
    Case("model-unknown", ["plan", SET, "model.spec=no-such-model-xyz"], "no-such-model-xyz",
         also=("smollm2-135m",)),
    Case("model-path-missing", ["steer", "-c", str(SMOKE), SET, "model.spec=./no/such/model", "-o", "{tmp}/o"],
         "./no/such/model"),
    Case("model-folder-empty", ["plan", SET, "model.spec={tmp}/model"], "{tmp}/model",
         setup=lambda tmp: (tmp / "model").mkdir()),
    Case("model-folder-bad-config", ["plan", SET, "model.spec={tmp}/model"], "{tmp}/model",
         setup=write("model/config.json", "{not json")),
    Case("model-config-missing", ["plan", "--model-config", "{tmp}/config.json"], "config.json"),
    Case("model-template-renders-nothing", ["steer", "-c", str(SMOKE), SET, "model.spec={tmp}/model", "-o", "{tmp}/o"],
         "model.chat_format: plain", also=("cannot render",), setup=model_with_unrenderable_template),
    Case("model-config-not-json", ["plan", "--model-config", "{tmp}/config.json"], "config.json",
         setup=write("config.json", '{"num_hidden_layers": 4,\n')),
    Case("model-config-no-model-type", ["plan", "--model-config", "{tmp}/config.json"], "config.json",
         setup=write("config.json", '{"hidden_size": 64}\n')),
    Case("model-device-unknown", ["steer", "-c", str(SMOKE), SET, "model.device=gpu0", "-o", "{tmp}/o"],
         "model.device", also=("gpu0",)),
    # ---- persona
    Case("persona-unknown-axis", ["steer", "-c", str(SMOKE), SET, "persona.axis=grumpy", "-o", "{tmp}/o"],
         "grumpy"),
    Case("persona-empty", ["collect", "-c", str(SMOKE), SET, "persona.pos=''", "-o", "{tmp}/o"], "persona",
         also=("non-empty",)),
    Case("persona-identical", ["steer", "-c", str(SMOKE), SET, "persona.pos=Same.", SET, "persona.neg=  same. ",
                                "-o", "{tmp}/o"], "persona", also=("identical",)),
    # ---- MFV vignette folders and protocol files (eval reads them before the model loads)
    Case("mfv-folder-missing", [*EVAL, "--mfv-data", "{tmp}/nope"], "{tmp}/nope"),
    Case("mfv-set-missing", [*EVAL, "--mfv-data", "{tmp}/mfv", SET, "classic"], "vignettes_classic_other_violate",
         setup=copy_mfv, also=("available",)),
    Case("vignette-not-json", [*EVAL, "--mfv-data", "{tmp}/mfv"], VIGNETTES, 3,
         mfv_with(edit_line(f"mfv/{VIGNETTES}", 2, '{"id": "x-1", "text": "a'))),
    Case("vignette-not-an-object", [*EVAL, "--mfv-data", "{tmp}/mfv"], VIGNETTES, 2,
         mfv_with(edit_line(f"mfv/{VIGNETTES}", 1, '["care-1", "text"]'))),
    Case("vignette-empty-text", [*EVAL, "--mfv-data", "{tmp}/mfv"], VIGNETTES, 3,
         mfv_with(edit_line(f"mfv/{VIGNETTES}", 2, '{"id": "x-1", "foundation_coarse": "Care", "text": ""}'))),
    Case("vignette-share-not-a-number", [*EVAL, "--mfv-data", "{tmp}/mfv"], VIGNETTES, 1,
         mfv_with(lambda tmp: (tmp / "mfv" / VIGNETTES).write_text(
             (tmp / "mfv" / VIGNETTES).read_text().replace('"human_Liberty": ', '"human_Liberty": "lots", "x": ', 1)
         ))),
    Case("vignette-file-empty", [*EVAL, "--mfv-data", "{tmp}/mfv"], VIGNETTES, None,
         mfv_with(write(f"mfv/{VIGNETTES}", "\n"))),
    Case("protocol-not-json", [*EVAL, "--mfv-data", "{tmp}/mfv"], "protocol.json", None,
         mfv_with(write("mfv/protocol.json", "{\n  'options': []\n}\n"))),
    Case("protocol-missing-key", [*EVAL, "--mfv-data", "{tmp}/mfv"], "protocol.json", None,
         mfv_with(edit_json("mfv/protocol.json", lambda data: data.pop("options")))),
    Case("eval-two-set-names", [*EVAL, SET, "classic", SET, "fixture"], "--set", also=("at most one",)),
    Case("eval-persona-unknown", [*EVAL, "--persona", "grumpy"], "grumpy"),
    # ---- steering vectors
    Case("vector-missing", [*EVAL, "--vector", "{tmp}/v.safetensors"], "v.safetensors"),
    Case("vector-truncated", [*EVAL, "--vector", "{tmp}/v.safetensors"], "v.safetensors",
         setup=steps(lambda tmp: shutil.copy(tmp / "run/round_00/vector.safetensors", tmp / "v.safetensors"),
                     truncate("v.safetensors")), run=True),
    Case("vector-text-file", [*EVAL, "--vector", "{tmp}/v.safetensors"], "v.safetensors",
         setup=write("v.safetensors", "a steering vector, I promise\n")),
    Case("vector-an-adapter", [*EVAL, "--vector", "{tmp}/run/round_00/adapter/adapter_model.safetensors"],
         "adapter_model.safetensors", run=True),
    Case("vector-from-another-model", [*EVAL, "--vector", "{tmp}/foreign.safetensors", "--coeff", "1"],
         "foreign.safetensors", setup=foreign_vector, also=("some-6-layer-model", "does not fit")),
    # ---- adapters
    Case("adapter-missing", [*EVAL, "--adapters", "{tmp}/adapter"], "{tmp}/adapter"),
    Case("adapter-no-config", [*EVAL, "--adapters", "{tmp}/adapter"], "{tmp}/adapter",
         setup=adapter_copy(delete("adapter/adapter_config.json")), run=True),
    Case("adapter-config-not-json", [*EVAL, "--adapters", "{tmp}/adapter"], "adapter_config.json",
         setup=adapter_copy(write("adapter/adapter_config.json", '{"r": 2,')), run=True),
    Case("adapter-config-wrong-modules", [*EVAL, "--adapters", "{tmp}/adapter"], "{tmp}/adapter",
         setup=adapter_copy(edit_json("adapter/adapter_config.json",
                                      lambda data: data.update(target_modules=["no_such_proj"]))), run=True),
    Case("adapter-weights-missing", [*EVAL, "--adapters", "{tmp}/adapter"], "{tmp}/adapter",
         setup=adapter_copy(delete("adapter/adapter_model.safetensors")), run=True),
    Case("adapter-weights-truncated", [*EVAL, "--adapters", "{tmp}/adapter"], "adapter",
         setup=adapter_copy(truncate("adapter/adapter_model.safetensors")), run=True),
    Case("adapter-from-another-model", [*EVAL, "--adapters", "{tmp}/foreign_adapter"], "foreign_adapter",
         setup=foreign_adapter, run=True),
    # ---- heal --from: a collect folder
    Case("heal-from-missing", ["heal", "-c", str(SMOKE), "--from", "{tmp}/collect", "-o", "{tmp}/h"], "collect"),
    Case("heal-summary-not-json", ["heal", "-c", str(SMOKE), "--from", "{tmp}/collect", "-o", "{tmp}/h"],
         "summary.json", 1, steps(write("collect/summary.json", "{kappa: 1}"), write("collect/completions.jsonl", ""))),
    Case("heal-summary-no-kappa", ["heal", "-c", str(SMOKE), "--from", "{tmp}/collect", "-o", "{tmp}/h"],
         "summary.json", None, steps(write("collect/summary.json", "{}"), write("collect/completions.jsonl", "")),
         also=("kappa",)),
    Case("heal-completions-bad-line", ["heal", "-c", str(SMOKE), "--from", "{tmp}/run/round_00", "-o", "{tmp}/h"],
         "completions.jsonl", 2, steps(lambda tmp: shutil.copy(tmp / "run/round_00/collect_summary.json",
                                                               tmp / "run/round_00/summary.json"),
                                       edit_line("run/round_00/completions.jsonl", 1, '{"completion": ')), run=True),
    Case("heal-completions-row-fields", ["heal", "-c", str(SMOKE), "--from", "{tmp}/collect", "-o", "{tmp}/h"],
         "completions.jsonl", 1, steps(write("collect/summary.json", '{"kappa": 1.0}'),
                                       write("collect/completions.jsonl", '{"completion": "hi", "kept": true}\n'))),
    # ---- output paths that cannot be written (a file stands where a folder must go)
    Case("steer-out-under-a-file", ["steer", "-c", str(SMOKE), "-o", "{tmp}/file/out"], "{tmp}/file",
         setup=write("file", "x")),
    Case("collect-out-is-a-file", ["collect", "-c", str(SMOKE), "-o", "{tmp}/file"], "{tmp}/file",
         setup=write("file", "x")),
    Case("eval-out-under-a-file", [*EVAL[:-2], "-o", "{tmp}/file/eval.json"], "{tmp}/file",
         setup=write("file", "x")),
    Case("heal-out-under-a-file", ["heal", "-c", str(SMOKE), "--from", "{tmp}/run/round_00", "-o", "{tmp}/file/h"],
         "{tmp}/file", setup=steps(write("file", "x"), lambda tmp: shutil.copy(
             tmp / "run/round_00/collect_summary.json", tmp / "run/round_00/summary.json")), run=True),
    Case("run-runs-dir-a-file", ["run", "-c", str(SMOKE), SET, "output.runs_dir={tmp}/file"], "{tmp}/file",
         setup=write("file", "x")),
    Case("diag-axis-out-under-a-file", ["diag-axis", "--run", "{tmp}/run", "-o", "{tmp}/file/d"], "{tmp}/file",
         setup=write("file", "x"), run=True),
    Case("calibrate-out-under-a-file", ["calibrate-filter", "-c", str(SMOKE), "-o", "{tmp}/file/c"], "{tmp}/file",
         setup=write("file", "x")),
    # ---- run folders: a resumed run checks everything it will read before it computes anything
    Case("state-not-json", RUN, "state.json", 1, write("run/state.json", "{'base/eval': {}}"), run=True,
         also=("--fresh",)),
    Case("state-truncated", RUN, "state.json", None, truncate("run/state.json"), run=True, also=("--fresh",)),
    Case("state-a-list", RUN, "state.json", None, write("run/state.json", "[]"), run=True),
    Case("state-entry-a-number", RUN, "state.json", None, write("run/state.json", '{"base/eval": 3}'), run=True),
    Case("state-missing", RUN, "state.json", None, delete("run/state.json"), run=True, also=("--fresh",)),
    Case("run-config-not-yaml", RUN, "config.yaml", 3, write("run/config.yaml", BAD_YAML), run=True),
    Case("run-config-empty", RUN, "config.yaml", None, write("run/config.yaml", ""), run=True),
    Case("run-config-different", [*RUN, SET, "heal.lam=0.9"], "{tmp}/run", run=True,
         also=("different config", "lam: 0.9")),
    Case("run-vector-deleted", RUN, "round_00/vector.safetensors", None, delete("run/round_00/vector.safetensors"),
         run=True, also=("is missing", "round_00/vector")),
    Case("run-vector-bit-flipped", RUN, "round_00/vector.safetensors", None,
         flip_last_byte("run/round_00/vector.safetensors"), run=True, also=("sha256",)),
    Case("run-eval-edited", RUN, "eval_base.json", None, edit_json("run/eval_base.json", lambda d: d.update(x=1)),
         run=True, also=("sha256",)),
    Case("run-adapter-deleted", RUN, "adapter", None, delete("run/round_00/adapter"), run=True,
         also=("round_00/heal",)),
    Case("run-completions-truncated", RUN, "completions.jsonl", None, truncate("run/round_00/completions.jsonl"),
         run=True),
    # ---- analyses on run folders
    Case("report-no-run", ["report", "--run", "{tmp}/nope"], "{tmp}/nope"),
    Case("report-not-a-run", ["report", "--run", "{tmp}/empty"], "{tmp}/empty",
         setup=lambda tmp: (tmp / "empty").mkdir()),
    Case("report-config-missing", ["report", "--run", "{tmp}/run"], "config.yaml", None,
         delete("run/config.yaml"), run=True),
    Case("report-state-not-json", ["report", "--run", "{tmp}/run"], "state.json", 1,
         write("run/state.json", "{oops"), run=True),
    Case("report-eval-not-json", ["report", "--run", "{tmp}/run"], "eval_base.json", None,
         write("run/eval_base.json", "{"), run=True),
    Case("diffs-round-not-finished", ["diffs", "--run", "{tmp}/run", "--round", "7"], "{tmp}/run", run=True,
         also=("[7]",)),
    Case("diffs-completions-bad", ["diffs", "--run", "{tmp}/run"], "completions.jsonl", None,
         edit_line("run/round_00/completions.jsonl", 0, "{"), run=True),
    Case("frontier-no-run", ["frontier", "--run", "{tmp}/nope"], "{tmp}/nope"),
    Case("frontier-round-not-finished", ["frontier", "--run", "{tmp}/run", "--round", "7"], "{tmp}/run", run=True,
         also=("7",)),
    Case("project-adapters-no-run", ["project-adapters", "--run", "{tmp}/nope"], "{tmp}/nope"),
    Case("rescore-no-run", ["rescore", "--run", "{tmp}/nope"], "{tmp}/nope"),
    Case("project-adapters-config-edited", ["project-adapters", "--run", "{tmp}/run"], "adapter_config.json",
         None, edit_json("run/round_00/adapter/adapter_config.json", lambda d: d.update(r=3)), run=True),
    Case("logit-lens-vector-truncated", ["logit-lens", "--run", "{tmp}/run"], "vector.safetensors", None,
         truncate("run/round_00/vector.safetensors"), run=True),
    Case("diag-axis-evals-missing", ["diag-axis", "--run", "{tmp}/run", "-o", "{tmp}/d"], "eval_prompt.json", None,
         delete("run/eval_prompt.json"), run=True),
    # ---- mistyped options: click's usage errors, one line too
    Case("usage-persona-side", [*EVAL, "--persona", "love", "--persona-side", "sideways"], "--persona-side",
         also=("'pos', 'neg'",)),
    Case("usage-not-a-number", ["steer", "-o", "{tmp}/o", "--n-samples", "many"], "--n-samples"),
    Case("usage-missing-option", ["report"], "--run"),
    Case("usage-unknown-command", ["frobnicate"], "frobnicate"),
    # ---- persona.pairs: the trait readout's items (read before any model loads)
    Case("pairs-file-missing", ["check-axis", "-c", str(SMOKE), SET, "persona.pairs={tmp}/p.jsonl"], "p.jsonl"),
    Case("pairs-not-json", ["check-axis", "-c", str(SMOKE), SET, "persona.pairs={tmp}/p.jsonl"], "p.jsonl", 4,
         write("p.jsonl", paired_items(12, {3: '{"scenario": "x", "pos": '}))),
    Case("pairs-missing-field", [*EVAL, SET, "persona.pairs={tmp}/p.jsonl"], "p.jsonl", 2,
         write("p.jsonl", paired_items(12, {1: '{"scenario": "x", "pos": "y"}'})), also=("'neg'",)),
    Case("pairs-empty-text", ["run", "-c", str(SMOKE), SET, "persona.pairs={tmp}/p.jsonl"], "p.jsonl", 5,
         write("p.jsonl", paired_items(12, {4: '{"scenario": "x", "pos": " ", "neg": "z"}'}))),
    Case("pairs-too-few", ["check-axis", "-c", str(SMOKE), SET, "persona.pairs={tmp}/p.jsonl"], "p.jsonl",
         setup=write("p.jsonl", paired_items(5)), also=("at least 12",)),
    Case("pairs-duplicate-id", ["check-axis", "-c", str(SMOKE), SET, "persona.pairs={tmp}/p.jsonl"], "p.jsonl", 7,
         write("p.jsonl", paired_items(12, {6: paired_items(1).strip()})), also=("duplicate id 'i0'",)),
    Case("check-axis-out-under-a-file", ["check-axis", "-c", str(SMOKE), "-o", "{tmp}/file/a.json"], "{tmp}/file",
         setup=write("file", "x")),
    Case("pairs-scenarios-missing", ["pairs", "-c", str(SMOKE), "-o", "{tmp}/p.jsonl", "--scenarios", "{tmp}/s.txt"],
         "s.txt"),
    Case("pairs-scenarios-empty", ["pairs", "-c", str(SMOKE), "-o", "{tmp}/p.jsonl", "--scenarios", "{tmp}/s.txt"],
         "s.txt", setup=write("s.txt", "\n \n")),
    Case("pairs-out-under-a-file", ["pairs", "-c", str(SMOKE), "-o", "{tmp}/file/p.jsonl"], "{tmp}/file",
         setup=write("file", "x")),
    # ---- sweep files
    Case("sweep-missing", ["sweep", "-c", "{tmp}/s.yaml"], "s.yaml"),
    Case("sweep-not-yaml", ["sweep", "-c", "{tmp}/s.yaml"], "s.yaml", 3, write("s.yaml", BAD_YAML)),
    Case("sweep-no-runs", ["sweep", "-c", "{tmp}/s.yaml"], "s.yaml", None, write("s.yaml", f"base: {SMOKE}\n"),
         also=("runs",)),
    Case("sweep-bad-override", ["sweep", "-c", "{tmp}/s.yaml"], "heal.lamm=1", None,
         write("s.yaml", f"base: {SMOKE}\nruns:\n  a: [heal.lamm=1]\n"), also=("sweep run 'a'",)),
    Case("sweep-base-missing", ["sweep", "-c", "{tmp}/s.yaml"], "nope.yaml", None,
         write("s.yaml", "base: nope.yaml\nruns:\n  a: []\n")),
    Case("sweep-file-given-as-a-config", ["plan", "-c", "{tmp}/s.yaml"], "s.yaml", None,
         write("s.yaml", f"base: {SMOKE}\nruns:\n  a: []\n"), also=("sweep file", "cli.py sweep -c")),
    Case("sweep-only-unknown", ["sweep", "-c", "{tmp}/s.yaml", "--only", "b"], "'b'", None,
         write("s.yaml", f"base: {SMOKE}\nruns:\n  a: []\n")),
    Case("pooled-missing", ["pooled", "-c", "{tmp}/s.yaml", "-o", "{tmp}/out"], "s.yaml"),
    Case("pooled-not-reported", ["pooled", "-c", "{tmp}/s.yaml", "-o", "{tmp}/out"], "s.yaml", None,
         controls_page(None), also=("controls.csv", "--report-only")),
    Case("pooled-page-disagrees", ["pooled", "-c", "{tmp}/s.yaml", "-o", "{tmp}/out"], "controls.csv", None,
         controls_page("run,stage,round\nb,healed 0,0\n"), also=("['b']",)),
]  # fmt: skip


# ---------------------------------------------------------------- running a case


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad_inputs_run")
    return run_loop(load_config(SMOKE, [f"output.runs_dir={root}", "output.name=run", *RUN_OVERRIDES]))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No hub probes: an unknown model spec fails in milliseconds."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("INTERP_HEAL_DEBUG", raising=False)


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def assert_untouched(before: dict[str, str], root: Path) -> None:
    """Every file there before is there after with the same bytes; events.jsonl may only have grown."""
    after = snapshot(root)
    for name, digest in before.items():
        assert name in after, f"{name} was deleted"
        if Path(name).name == "events.jsonl":
            continue
        assert after[name] == digest, f"{name} was changed"


def error_line(result) -> str:
    """The one `error:` line of a refused command (progress bars may share stderr; log lines go elsewhere)."""
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_bad_input_is_one_line(case: Case, tmp_path, request):
    if case.run or "{run}" in " ".join(case.argv):
        shutil.copytree(request.getfixturevalue("finished_run"), tmp_path / "run")
        (tmp_path / "run.yaml").write_text((tmp_path / "run" / "config.yaml").read_text())
    if case.setup is not None:
        case.setup(tmp_path)
    before = snapshot(tmp_path)
    fill = {"{tmp}": str(tmp_path), "{run}": str(tmp_path / "run"), "{cfg}": str(tmp_path / "run.yaml")}
    argv = [_fill(arg, fill) for arg in case.argv]
    line = error_line(CliRunner().invoke(app, argv))
    assert _fill(case.names, fill) in line
    if case.line is not None:
        assert re.search(rf"\bline {case.line}\b", line), f"no 'line {case.line}' in {line}"
    for phrase in case.also:
        assert phrase in line, phrase
    assert_untouched(before, tmp_path)


def _fill(text: str, fill: dict[str, str]) -> str:
    for key, value in fill.items():
        text = text.replace(key, value)
    return text


def test_the_table_covers_every_command():
    commands = {name for name in (c.name for c in app.registered_commands) if name} | {
        c.callback.__name__ for c in app.registered_commands if c.name is None
    }
    tested = {case.argv[0] for case in CASES}
    assert commands - tested <= {"models"}, commands - tested  # `models` reads no input
    assert len(CASES) >= 60 and len({case.id for case in CASES}) == len(CASES)


# ---------------------------------------------------------------- beyond the table


def test_the_cli_process_prints_one_line(tmp_path):
    """The real entry point: exactly the one line on stderr, exit 2."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_YAML)
    plain = subprocess.run([sys.executable, "cli.py", "config", "-c", str(bad)], capture_output=True, text=True)
    expected = f"error: {bad} line 3: not valid YAML: expected ',' or ']', but got ':' (fix the config file)\n"
    assert plain.returncode == 2 and plain.stderr == expected


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_debug_shows_the_traceback_of_a_user_error(tmp_path, monkeypatch, how):
    if how == "environment":
        monkeypatch.setenv("INTERP_HEAL_DEBUG", "1")
    args = ["--debug"] if how == "flag" else []
    result = CliRunner().invoke(app, [*args, "config", "-c", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 1 and "not found" in str(result.exception)


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only user errors become one line: anything else is a bug, and its traceback is what gets it reported."""
    monkeypatch.setattr("cli.config_to_yaml", lambda config: {}["no such key"])
    result = CliRunner().invoke(app, ["config"])
    assert result.exit_code == 1 and isinstance(result.exception, KeyError)


def test_a_full_disk_mid_stage_then_a_rerun_gives_the_same_numbers(finished_run, tmp_path, monkeypatch):
    """The atomic write of round 0's completions fails with ENOSPC: one error line, the stage stays undone,
    earlier stages and state.json are untouched; once there is space, the rerun finishes with the numbers of the
    uninterrupted run."""
    args = ["run", "-c", str(SMOKE), SET, f"output.runs_dir={tmp_path}", SET, "output.name=full",
            *[item for override in RUN_OVERRIDES for item in (SET, override)]]  # fmt: skip
    write_bytes_ok = io_module.atomic_write_bytes
    snapshots: dict[str, dict[str, str]] = {}

    def full_disk(path: Path, data: bytes) -> None:
        """Half the bytes reach the temp file, then the disk is full."""
        if path.name != "completions.jsonl":
            return write_bytes_ok(path, data)
        snapshots["before"] = snapshot(tmp_path / "full")
        with io_module.atomic_target(path) as tmp:
            tmp.write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io_module, "atomic_write_bytes", full_disk)
    line = error_line(CliRunner().invoke(app, args))
    run = tmp_path / "full"
    assert line == f"error: {run / 'round_00' / 'completions.jsonl'}: cannot write: No space left on device " \
        "(free some space and rerun: finished stages are kept)"  # fmt: skip
    assert_untouched(snapshots["before"], run)
    state = json.loads((run / "state.json").read_text())
    assert "round_00/vector" in state and "round_00/collect" not in state
    assert not list(run.rglob("*.tmp")), "a temp file was left behind"
    monkeypatch.setattr(io_module, "atomic_write_bytes", write_bytes_ok)
    assert CliRunner().invoke(app, args).exit_code == 0
    assert (run / "metrics.csv").read_text() == (finished_run / "metrics.csv").read_text()
    assert RunFolder(run).stage_seconds().keys() == RunFolder(finished_run).stage_seconds().keys()


def test_metrics_csv_is_derived_so_a_damaged_one_is_rebuilt(finished_run, tmp_path):
    """metrics.csv is written from the stage outputs and never read: a truncated or deleted one is no bad input,
    the next `run` rebuilds it byte for byte."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    args = ["run", "-c", str(run / "config.yaml"), SET, f"output.runs_dir={tmp_path}", SET, "output.name=run"]
    truncate("run/metrics.csv")(tmp_path)
    assert CliRunner().invoke(app, args).exit_code == 0
    assert (run / "metrics.csv").read_text() == (finished_run / "metrics.csv").read_text()
    (run / "metrics.csv").unlink()
    assert CliRunner().invoke(app, args).exit_code == 0
    assert (run / "metrics.csv").read_text() == (finished_run / "metrics.csv").read_text()


def test_a_second_process_on_a_run_folder_is_refused(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    args = ["run", "-c", str(run / "config.yaml"), SET, f"output.runs_dir={tmp_path}", SET, "output.name=run"]
    with RunFolder(run).locked():
        line = error_line(CliRunner().invoke(app, args))
    assert re.fullmatch(rf"error: run folder {run} is in use by pid \d+ since .*", line)


def test_a_nearly_full_disk_is_refused_before_the_run_starts(tmp_path, monkeypatch):
    monkeypatch.setattr(io_module.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**12, 10**12, 10 * 2**20))
    line = error_line(CliRunner().invoke(app, ["run", "-c", str(SMOKE), SET, f"output.runs_dir={tmp_path}"]))
    assert "only 10 MB free" in line and "(output.min_free_mb)" in line
    assert not (tmp_path / "smoke").exists()

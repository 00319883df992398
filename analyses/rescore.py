"""rescore: the held-out trait (`interp_heal.reply_trait`) for run folders evaluated before it existed.

`python cli.py rescore --run DIR`. Every eval of the run (base, prompting baseline, steered and healed per round)
stored its own replies to the held-out prompts in its adherence block; the readout needs only those replies and
the base model, so no adapter is loaded and nothing is sampled again. Each result goes into a sidecar beside its
eval (`eval_healed.reply_trait.json`): the eval JSONs are recorded by sha256 and stay as they are. Resumable: an
eval that has the readout, in itself or in a sidecar, is skipped. Then metrics.csv, summary.md and the trajectory
plot are rewritten with the new columns.
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from interp_heal.config import Config
from interp_heal.io import read_json, sha256_file
from interp_heal.models import load_configured_model
from interp_heal.personas import persona_pair
from interp_heal.reply_trait import sidecar_path, stored_replies, stored_reply_trait, write_sidecar
from interp_heal.report import write_metrics, write_report
from interp_heal.run_folder import RunFolder, read_run, round_dirs

# Readouts already computed in this call, by (the eval's sha256, the reader: model config and persona pair).
Scored = dict[tuple[str, str, str, str], dict[str, object]]


def eval_paths(root: Path) -> list[Path]:
    """Every eval JSON of a run folder, base first, then round by round."""
    paths = [root / "eval_base.json", root / "eval_prompt.json"]
    paths += [path / name for _, path in round_dirs(root) for name in ("eval_steered.json", "eval_healed.json")]
    return [path for path in paths if path.is_file()]


def pending(root: Path) -> list[Path]:
    """The evals still without the readout (neither in the eval nor in a sidecar) that stored their replies (an
    eval run with `eval.adherence: false` has none to read)."""
    todo = []
    for path in eval_paths(root):
        result = read_json(path)
        if "reply_trait" not in result and not sidecar_path(path).is_file() and stored_replies(result):
            todo.append(path)
    return todo


def rescore_run(root: Path, scored: Scored | None = None) -> list[Path]:
    """Write the missing sidecars of one run folder and its report; returns the sidecars written. `scored`: readouts
    by the eval they read and their reader, shared across the runs of one call: a sweep copies its shared stages
    (base, prompting baseline, round-0 steered eval) byte for byte, so each such file is read once."""
    config = read_run(root)
    folder = RunFolder(root)
    with folder.locked():  # a loop writing this folder at the same time would race the report
        todo = pending(root)
        _score(root, config, todo, {} if scored is None else scored)
        write_metrics(root, config)
        write_report(root, config, folder.stage_seconds())
    return [sidecar_path(path) for path in todo]


def _score(root: Path, config: Config, todo: list[Path], scored: Scored) -> None:
    if todo:
        model, tokenizer, _ = load_configured_model(config.model)
        pair = persona_pair(config.persona)
        reader = (config.model.model_dump_json(), pair.pos, pair.neg)
        for path in tqdm(todo, desc=f"held-out trait {root.name}", leave=False):
            key = (sha256_file(path), *reader)
            if key not in scored:
                scored[key] = stored_reply_trait(
                    model, tokenizer, read_json(path), pair, config.eval.n_bootstrap, config.eval.batch_size
                )
            write_sidecar(path, scored[key])

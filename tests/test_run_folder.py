"""Round folders are named and found by one module (issue 26: no other module formats a round path); a run folder
resumes only under its own config, except that it may plan more rounds; an adopted stage brings the files
annotating it."""

from pathlib import Path

import pytest

from interp_heal.config import load_config
from interp_heal.errors import ConfigError
from interp_heal.run_folder import (
    RunFolder,
    adopt_heal_independent_stages,
    prepare_run_folder,
    round_dirs,
    round_name,
    round_path,
)

SMOKE = Path("configs/smoke.yaml")


def test_round_dirs_finds_exactly_the_round_folders_by_index(tmp_path):
    for name in ("round_00", "round_01", "round_10", "round_x", "round_1", "analysis"):
        (tmp_path / name).mkdir()
    (tmp_path / "round_02").write_text("a file, not a round")
    assert round_dirs(tmp_path) == [(0, tmp_path / "round_00"), (1, tmp_path / "round_01"), (10, tmp_path / "round_10")]
    assert round_name(3) == "round_03" and round_path(tmp_path, 3) == tmp_path / "round_03"


def test_a_run_folder_can_plan_more_rounds_but_not_another_config(tmp_path):
    config = load_config(SMOKE, [f"output.runs_dir={tmp_path}", "loop.rounds=1"])
    prepare_run_folder(config)
    more = config.model_copy(update={"loop": config.loop.model_copy(update={"rounds": 3})})
    prepare_run_folder(more)  # carried further: nothing finished reads loop.rounds
    assert load_config(tmp_path / config.output.name / "config.yaml").loop.rounds == 3
    with pytest.raises(ConfigError, match="different config"):
        prepare_run_folder(config)  # fewer rounds than planned: the folder's later rounds would vanish from reports
    other = more.model_copy(update={"loop": more.loop.model_copy(update={"rounds": 4, "coh_floor": 0.1})})
    with pytest.raises(ConfigError, match="coh_floor"):
        prepare_run_folder(other)


def test_an_adopted_stage_brings_the_files_written_beside_it_later(tmp_path):
    donor, folder = RunFolder(tmp_path / "donor"), RunFolder(tmp_path / "new")
    donor.root.mkdir()
    (donor.root / "eval_base.json").write_text('{"trait": 1}')
    (donor.root / "eval_base.rows.jsonl").write_text("{}\n")
    donor.mark_done("base/eval", 1.0, (donor.root / "eval_base.json", donor.root / "eval_base.rows.jsonl"))
    (donor.root / "eval_base.reply_trait.json").write_text('{"log_ratio": 0.1}')  # e.g. by `cli.py rescore`
    (donor.root / "eval_prompt.reply_trait.json").write_text("{}")  # annotates another stage: stays
    folder.root.mkdir()
    assert folder.adopt("base/eval", donor) and folder.done("base/eval")
    assert sorted(path.name for path in folder.root.glob("eval_*")) == [
        "eval_base.json",
        "eval_base.reply_trait.json",
        "eval_base.rows.jsonl",
    ]
    assert (folder.root / "eval_base.reply_trait.json").read_text() == '{"log_ratio": 0.1}'
    folder.verify("base/eval")
    # A stage adopted before its donor was annotated gets the annotation when the sweep next shares stages.
    (folder.root / "eval_base.reply_trait.json").unlink()
    assert adopt_heal_independent_stages(folder, donor, ("base/eval",)) == []  # already done: nothing re-adopted
    assert (folder.root / "eval_base.reply_trait.json").read_text() == '{"log_ratio": 0.1}'

"""Every bad input named in the reliability issue gives one clear error, and nothing is written half-way.

The assertions check the message a user reads, not only the exception type.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from interp_heal import io as io_module
from interp_heal.config import load_config
from interp_heal.errors import ConfigError, DataError, ModelSpecError, PersonaError, RunLockedError
from interp_heal.loop import RunFolder, run_loop
from interp_heal.steer import SteeringVector, steered_logits, tokenize_prompts

FIXTURE_MFV = Path("tests/fixtures/mfv")


def _config(tmp_path: Path, *overrides: str):
    return load_config("configs/smoke.yaml", [f"output.runs_dir={tmp_path / 'runs'}", "output.name=bad", *overrides])


def _refused(tmp_path: Path, error: type[Exception], pattern: str, *overrides: str) -> None:
    with pytest.raises(error, match=pattern):
        run_loop(_config(tmp_path, *overrides))
    assert not (tmp_path / "runs" / "bad").exists(), "a refused run must not leave a run folder behind"


def test_unknown_model_spec(tmp_path):
    _refused(tmp_path, ModelSpecError, r"no-such-model-xyz.*smollm2-135m", "model.spec=no-such-model-xyz")


def test_missing_mfv_data_folder(tmp_path):
    pattern = r"MFV data not found \(looked in: /nonexistent/mfv\)"
    _refused(tmp_path, DataError, pattern, "eval.mfv_data=/nonexistent/mfv")


@pytest.mark.parametrize(
    ("broken_line", "pattern"),
    [
        ('{"id": "x-1", "foundation_coarse": "Care"', r"line 3: not valid JSON"),
        ('{"id": "x-1", "foundation_coarse": "Care", "text": ""}', r"line 3 \(id 'x-1'\): field 'text' must be a"),
        (None, r"line 3 \(id 'fairness-0'\): field 'human_Liberty' must be a number >= 0"),
    ],
)  # fmt: skip
def test_malformed_vignette_row_names_row_and_field(tmp_path, broken_line, pattern):
    data = tmp_path / "mfv"
    shutil.copytree(FIXTURE_MFV, data)
    path = data / "vignettes_fixture_other_violate.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = broken_line or lines[2].replace('"human_Liberty": 5.0', '"human_Liberty": "lots"')
    path.write_text("\n".join(lines) + "\n")
    _refused(tmp_path, DataError, f"vignettes_fixture_other_violate.jsonl {pattern}", f"eval.mfv_data={data}")


def test_config_unknown_key_and_wrong_type_name_the_key_path(tmp_path):
    _refused(tmp_path, ConfigError, r"heal\.lamm: Extra inputs are not permitted", "heal.lamm=0.5")
    _refused(tmp_path, ConfigError, r"heal\.lam: Input should be a valid number", "heal.lam=lots")


def test_empty_and_identical_persona_pairs(tmp_path):
    _refused(tmp_path, PersonaError, "pos and neg must both be non-empty", "persona.pos=''")
    _refused(tmp_path, PersonaError, "pos and neg are identical", "persona.pos=Same.", "persona.neg=  same. ")


def test_band_out_of_range(tmp_path):
    _refused(tmp_path, ConfigError, r"steer\.band: .*0 <= lo <= hi <= 1", "steer.band=[0.4, 1.5]")
    _refused(tmp_path, ConfigError, r"heal\.band: .*0 <= lo <= hi <= 1", "heal.band=[0.6, 0.4]")


def test_vector_from_another_model_does_not_fit(tiny_model, tokenizer):
    vector = SteeringVector(torch.ones(6, 64), torch.ones(6), (4, 5), (0.5, 1.0), "some-6-layer-model", "love", 8)
    inputs = dict(tokenize_prompts(tokenizer, ["hello"], torch.device("cpu")))
    with pytest.raises(DataError, match=r"from some-6-layer-model \(6 layers x d=64.*\[4, 5\]\) does not fit this "
                                        r"model \(4 layers x d=64\)"):  # fmt: skip
        steered_logits(tiny_model, tokenizer, inputs, vector, 1.0)


def test_corrupt_vector_file(tmp_path):
    path = tmp_path / "vector.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match=f"cannot read steering vector {path}"):
        SteeringVector.load(path)


@pytest.fixture
def copied_run(smoke_run, tmp_path):
    """A private copy of the finished smoke run (so tests may damage it) and its config, pointed at the copy."""
    copy = tmp_path / "runs" / "copy"
    shutil.copytree(smoke_run, copy)
    config = load_config(copy / "config.yaml", [f"output.runs_dir={copy.parent}", "output.name=copy"])
    return copy, config


@pytest.mark.parametrize(
    ("damaged", "stage"),
    [("round_00/vector.safetensors", "round_00/vector"),
     ("round_01/adapter/adapter_model.safetensors", "round_01/heal")],
)  # fmt: skip
def test_corrupt_artifact_in_run_folder_is_caught_by_its_hash(copied_run, damaged, stage):
    copy, config = copied_run
    path = copy / damaged
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit-pattern in the tensor data: still a loadable file, but not the one written
    path.write_bytes(bytes(data))
    state = (copy / "state.json").read_text()
    pattern = rf"{damaged} does not match the sha256 recorded at write time \(stage {stage}\)"
    with pytest.raises(DataError, match=pattern):
        run_loop(config)
    assert (copy / "state.json").read_text() == state


def test_run_folder_made_with_another_config(copied_run):
    _, config = copied_run
    changed = config.model_copy(update={"heal": config.heal.model_copy(update={"lam": 0.9})})
    with pytest.raises(ConfigError, match=r"different config \(first difference: 'lam: 0\.3' -> 'lam: 0\.9'\)"):
        run_loop(changed)


def test_a_moved_run_folder_resumes(copied_run):
    copy, config = copied_run
    assert run_loop(config) == copy


def test_second_process_on_a_run_folder_is_refused(copied_run):
    copy, config = copied_run
    with RunFolder(copy).locked(), pytest.raises(RunLockedError, match=rf"run folder {copy} is in use by pid \d+"):
        run_loop(config)


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match=rf"output folder {blocker} is not writable"):
        run_loop(load_config("configs/smoke.yaml", [f"output.runs_dir={blocker}"]))


def test_nearly_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(io_module.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**12, 10**12, 10 * 2**20))
    _refused(tmp_path, DataError, r"only 10 MB free on the disk of .*needs at least 500 MB \(output\.min_free_mb\)")


def test_cli_prints_one_line_and_exits_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "cli.py", "run", "-c", "configs/smoke.yaml", "--set", "eval.mfv_data=/nonexistent/mfv",
         "--set", f"output.runs_dir={tmp_path}"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("error: MFV data not found") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr

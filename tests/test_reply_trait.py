"""Held-out trait (interp_heal.reply_trait): the sign of the persona log-ratio, its pairing with the replies, and
`rescore` reproducing the live readout for a run folder evaluated before it existed."""

import csv
import json
import shutil

import pytest

from analyses.rescore import Scored, eval_paths, pending, rescore_run
from interp_heal.errors import DataError
from interp_heal.models import build_tiny_llama
from interp_heal.personas import PersonaPair, render_prompts
from interp_heal.reply_trait import reply_trait, sidecar_path, stored_reply_trait, with_sidecar, write_sidecar
from interp_heal.run_folder import RunFolder, read_run
from tests.helpers import teach

PAIR = PersonaPair("love", pos="You love everyone warmly.", neg="You are a cold machine.")
PROMPTS = ["How was your day?", "What do you think of people?"]
WARM = "I adore people and every day with them fills my heart."
COLD = "I am a program and I do not have days or opinions."


@pytest.fixture(scope="module")
def persona_taught(tokenizer):
    """The tiny model trained to answer every prompt warmly after the pos persona and coldly after the neg one."""
    model = build_tiny_llama(len(tokenizer), seed=2)
    chats = [(persona, reply) for persona, reply in ((PAIR.pos, WARM), (PAIR.neg, COLD))]
    prompts, replies = [], []
    for persona, reply in chats:
        prompts += tokenizer(render_prompts(tokenizer, PROMPTS, persona), add_special_tokens=False)["input_ids"]
        replies += [tokenizer.encode(reply, add_special_tokens=False)] * len(PROMPTS)
    return teach(model, tokenizer, prompts, replies)


def test_replies_of_the_pos_persona_read_positive_and_of_the_neg_one_negative(persona_taught, tokenizer):
    warm = reply_trait(persona_taught, tokenizer, PROMPTS, [WARM] * 2, PAIR, n_bootstrap=100, batch_size=4)
    cold = reply_trait(persona_taught, tokenizer, PROMPTS, [COLD] * 2, PAIR, n_bootstrap=100, batch_size=4)
    assert warm["log_ratio"] > 0.2 and warm["ci95"][0] > 0
    assert cold["log_ratio"] < -0.2 and cold["ci95"][1] < 0
    mixed = reply_trait(persona_taught, tokenizer, PROMPTS, [WARM, COLD], PAIR, n_bootstrap=100, batch_size=4)
    assert mixed["per_reply"] == pytest.approx([warm["per_reply"][0], cold["per_reply"][1]], abs=1e-5)


def test_a_sidecar_is_merged_only_into_the_eval_it_read(tmp_path):
    eval_path = tmp_path / "eval_healed.json"
    eval_path.write_text(json.dumps({"trait": {"log_odds": 1.0}}))
    write_sidecar(eval_path, {"log_ratio": 0.25, "ci95": [0.1, 0.4]})
    assert with_sidecar(json.loads(eval_path.read_text()), eval_path)["reply_trait"]["log_ratio"] == 0.25
    eval_path.write_text(json.dumps({"trait": {"log_odds": 2.0}}))  # the stage redone: other replies
    with pytest.raises(DataError, match=r"another version of eval_healed\.json"):
        with_sidecar(json.loads(eval_path.read_text()), eval_path)


def test_an_eval_without_stored_replies_is_a_clear_error(tiny_model, tokenizer):
    with pytest.raises(DataError, match=r"eval\.adherence"):
        stored_reply_trait(tiny_model, tokenizer, {"trait": {}}, PAIR, n_bootstrap=10, batch_size=4)


def _as_before_the_readout(run, root):
    """A copy of a finished run whose evals lack the readout, recorded as finished (an older run folder)."""
    shutil.copytree(run, root)
    state = json.loads((root / "state.json").read_text())
    live = {}
    for path in eval_paths(root):
        result = json.loads(path.read_text())
        live[path.name if path.parent == root else f"{path.parent.name}/{path.name}"] = result.pop("reply_trait")
        path.write_text(json.dumps(result))
        stage = next(name for name, entry in state.items() if str(path.relative_to(root)) in entry["sha256"])
        RunFolder(root).mark_done(stage, state[stage]["seconds"], (path,))
    return live


def test_rescore_reproduces_the_live_readout_without_touching_the_evals(smoke_run, tmp_path):
    root = tmp_path / "old_run"
    live = _as_before_the_readout(smoke_run, root)
    assert len(pending(root)) == len(live) >= 6  # base, prompt, steered and healed of two rounds
    hashes = {path: path.read_bytes() for path in eval_paths(root)}
    (root / "metrics.csv").unlink()  # the live run's table already has the column: the rescore must write its own
    written = rescore_run(root)
    assert len(written) == len(live) and pending(root) == []
    assert {path: path.read_bytes() for path in eval_paths(root)} == hashes
    read_run(root)  # every recorded sha256 still matches
    for path in eval_paths(root):
        key = path.name if path.parent == root else f"{path.parent.name}/{path.name}"
        rescored = json.loads(sidecar_path(path).read_text())
        assert rescored["per_reply"] == pytest.approx(live[key]["per_reply"], abs=1e-5)
    rows = list(csv.DictReader((root / "metrics.csv").open()))
    healed = next(row for row in rows if row["stage"] == "healed 1")
    assert float(healed["reply_trait"]) == pytest.approx(live["round_01/eval_healed.json"]["log_ratio"], abs=1e-5)
    assert rescore_run(root) == []  # resumable: nothing left to score


def test_a_second_run_with_the_same_evals_is_not_read_again(smoke_run, tmp_path, monkeypatch):
    """A sweep's runs share byte-identical evals (base, prompting baseline, ...): one call reads each once."""
    first, second = tmp_path / "first", tmp_path / "second"
    _as_before_the_readout(smoke_run, first)
    _as_before_the_readout(smoke_run, second)
    scored: Scored = {}
    rescore_run(first, scored)
    read = len(scored)

    def read_again(*args, **kwargs):
        raise AssertionError("an eval already read in this call was read again")

    monkeypatch.setattr("analyses.rescore.stored_reply_trait", read_again)
    written = rescore_run(second, scored)
    assert read == len(eval_paths(first)) and len(scored) == read and len(written) == read
    for path in eval_paths(first):
        twin = second / path.relative_to(first)
        assert json.loads(sidecar_path(twin).read_text()) == json.loads(sidecar_path(path).read_text())

import json
import subprocess
from pathlib import Path

import torch

from interp_heal import provenance as provenance_module
from interp_heal.provenance import code_label, code_version, provenance

CHECKOUT = Path(__file__).resolve().parent.parent


def test_records_this_checkouts_commit_and_the_libraries():
    head = subprocess.run(["git", "-C", str(CHECKOUT), "rev-parse", "HEAD"], capture_output=True, text=True)
    record = provenance()
    assert record["commit"] == head.stdout.strip()
    assert isinstance(record["dirty"], bool)
    assert record["versions"]["torch"] == torch.__version__
    assert set(record["versions"]) == set(provenance_module.LIBRARIES)
    assert record["machine"]


def test_a_package_outside_a_checkout_of_this_project_records_no_commit(tmp_path, monkeypatch):
    # A folder inside some other git repository must not borrow that repository's commit.
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "interp_heal").mkdir()
    monkeypatch.setattr(provenance_module, "_CHECKOUT", tmp_path / "interp_heal")
    assert code_version() == {"commit": None, "dirty": None}


def test_a_process_keeps_the_version_it_loaded_while_head_moves(monkeypatch):
    loaded = provenance()["commit"]
    monkeypatch.setattr(provenance_module, "_git", lambda *args: "f" * 40)  # as if a commit landed meanwhile
    assert provenance()["commit"] == loaded


def test_code_labels():
    assert code_label(None) == "unrecorded"
    assert code_label({"commit": None}) == "no git"
    assert code_label({"commit": "0123456789abcdef", "dirty": False}) == "0123456"
    assert code_label({"commit": "0123456789abcdef", "dirty": True}) == "0123456+dirty"


def test_every_run_start_records_the_code(smoke_run):
    events = [json.loads(line) for line in (smoke_run / "events.jsonl").read_text().splitlines()]
    starts = [event for event in events if event["event"] == "run_start"]
    assert starts and all(event["provenance"] == provenance() for event in starts)

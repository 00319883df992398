"""Round folders are named and found by one module (issue 26: no other module formats a round path)."""

from interp_heal.run_folder import round_dirs, round_name, round_path


def test_round_dirs_finds_exactly_the_round_folders_by_index(tmp_path):
    for name in ("round_00", "round_01", "round_10", "round_x", "round_1", "analysis"):
        (tmp_path / name).mkdir()
    (tmp_path / "round_02").write_text("a file, not a round")
    assert round_dirs(tmp_path) == [(0, tmp_path / "round_00"), (1, tmp_path / "round_01"), (10, tmp_path / "round_10")]
    assert round_name(3) == "round_03" and round_path(tmp_path, 3) == tmp_path / "round_03"

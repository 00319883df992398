"""A run folder's bookkeeping: which stages are done, their files' sha256, the lock, the event log, and the
stages a sweep may copy between runs.

`stage(folder, name, work, artifacts)` is the one way the loop runs a step: skipped (after checking its files)
when `state.json` says it is done, else run, timed and marked done with the sha256 of every file it wrote that
later stages read. So a killed run loses at most the stage in progress, an edited or damaged file is refused
instead of silently used, and a resumed run does exactly what the uninterrupted one would have. The loop's
algorithm lives in `loop.py`; this module knows nothing of steering or healing.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from interp_heal.config import Config, config_to_yaml, load_config, save_config
from interp_heal.errors import ConfigError, DataError, RunLockedError
from interp_heal.io import read_json, sha256_file, write_json
from interp_heal.paired_items import ReadoutItems


def annotations(path: Path) -> list[Path]:
    """Files a later command wrote beside a finished stage's file (`eval_base.json` -> `eval_base.<name>.json`, as
    `cli.py rescore` does). They are outside the stage's sha256 record because they came after it; each carries its
    own check (the reply-trait sidecar records its eval's sha256), so they travel with the file they annotate."""
    return sorted(path.parent.glob(f"{path.stem}.*{path.suffix}")) if path.suffix == ".json" else []


@dataclass(frozen=True)
class RunFolder:
    root: Path

    def round_dir(self, round_index: int) -> Path:
        return round_path(self.root, round_index)

    def _state(self) -> dict[str, dict]:
        """Finished stages; a damaged or lost state.json is an error, never an empty state (that would redo,
        and overwrite, every stage)."""
        path = self.root / "state.json"
        # Without the sha256 it records, the stages' files (still in the folder) cannot be checked.
        recover = f"the stages' files cannot be checked without it: rerun with --fresh to redo {self.root}"
        if not path.is_file():
            events = self.root / "events.jsonl"
            if events.is_file() and '"event": "stage_done"' in events.read_text(errors="replace"):
                raise DataError(f"{path}: missing, but {events} records finished stages ({recover})")
            return {}
        state = read_json(path, "run state", hint=recover)
        entries = state.values() if isinstance(state, dict) else ()
        if not isinstance(state, dict) or not all(isinstance(entry, dict) and "seconds" in entry for entry in entries):
            raise DataError(f"{path}: not a run state (stage name -> record of its files) ({recover})")
        return state

    def done(self, stage: str) -> bool:
        return stage in self._state()

    def mark_done(self, stage: str, seconds: float, artifacts: tuple[Path, ...] = ()) -> None:
        """Record a finished stage with the sha256 of the files (folders: every file inside) later stages read."""
        state = self._state()
        files = [file for path in artifacts for file in (sorted(path.rglob("*")) if path.is_dir() else [path])]
        hashes = {str(file.relative_to(self.root)): sha256_file(file) for file in files if file.is_file()}
        state[stage] = {"seconds": round(seconds, 2), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "sha256": hashes}
        write_json(self.root / "state.json", state)
        self.event("stage_done", stage=stage, seconds=round(seconds, 2))

    def verify(self, stage: str) -> None:
        """A finished stage's files must be the ones it wrote: a corrupt or edited file is an error, not input."""
        for relative, expected in self._state()[stage].get("sha256", {}).items():
            path = self.root / relative
            if not path.is_file() or sha256_file(path) != expected:
                problem = "is missing" if not path.is_file() else "does not match the sha256 recorded at write time"
                raise DataError(
                    f"{path} {problem} (stage {stage}): the run folder is damaged. Delete that round's folder and "
                    f"its entries in {self.root / 'state.json'} to redo it, or rerun with --fresh"
                )

    def verify_all(self) -> None:
        for stage_name in self._state():
            self.verify(stage_name)

    def adopt(self, stage: str, donor: RunFolder) -> bool:
        """Record `stage` as done by copying a donor run's finished files for it (with their `annotations`); False
        when the donor has not finished it or recorded no files (there is then nothing to check the copy against)."""
        entry = donor._state().get(stage)
        if not entry or not entry.get("sha256"):
            return False
        donor.verify(stage)
        for relative in entry["sha256"]:
            (self.root / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(donor.root / relative, self.root / relative)
        self.bring_annotations(stage, donor)
        state = self._state()
        state[stage] = {**entry, "adopted_from": str(donor.root)}
        write_json(self.root / "state.json", state)
        self.event("stage_adopted", stage=stage, donor=str(donor.root))
        return True

    def bring_annotations(self, stage: str, donor: RunFolder) -> None:
        """Copy the donor's `annotations` of a stage both folders hold with the same files, where this one lacks them
        (a stage adopted before its donor was annotated, or by code that did not copy them)."""
        for relative in donor._state().get(stage, {}).get("sha256", {}):
            for source in annotations(donor.root / relative):
                target = self.root / source.relative_to(donor.root)
                if not target.exists():
                    shutil.copyfile(source, target)

    def same_files(self, stage: str, other: RunFolder) -> bool:
        mine, theirs = self._state().get(stage, {}), other._state().get(stage, {})
        return bool(mine.get("sha256")) and mine.get("sha256") == theirs.get("sha256")

    def stage_seconds(self) -> dict[str, float]:
        return {stage: info["seconds"] for stage, info in self._state().items()}

    def event(self, kind: str, **fields: object) -> None:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "event": kind, **fields}
        with (self.root / "events.jsonl").open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold an exclusive lock on the folder for the whole run: a second process refuses to start.

        An OS file lock (flock), so a killed process releases it; the holder's pid is written for the message.
        """
        self.root.parent.mkdir(parents=True, exist_ok=True)
        # Beside the folder, not in it: `--fresh` deletes the folder, and must do so under the lock.
        with (self.root.parent / f".{self.root.name}.lock").open("a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise RunLockedError(
                    f"run folder {self.root} is in use by {holder}; wait for it to finish or use another output.name"
                ) from None
            handle.truncate(0)
            handle.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}")
            handle.flush()
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def run_root(config: Config) -> Path:
    """The run's folder: <output.runs_dir>/<output.name>."""
    return Path(config.output.runs_dir) / config.output.name


def prepare_run_folder(config: Config, fresh: bool = False) -> RunFolder:
    """Create (or reopen) runs/<name>/; refuse to resume a folder made with a different config.

    Configs are compared as values (the saved YAML read back with today's defaults, `output` excluded), so
    adding a config field with a default does not orphan existing runs.
    """
    root = run_root(config)
    saved = root / "config.yaml"
    if saved.is_file() and not fresh:
        try:
            saved_config = load_config(saved)
        except ConfigError as err:
            raise ConfigError(f"run folder {root} has a config this version cannot read ({err}); use --fresh") from None
        # Where the folder lives is not part of what the run is: a moved or copied run folder resumes.
        planned = _planning(saved_config, config)
        if planned != config:
            raise ConfigError(
                f"run folder {root} was made with a different config ({first_difference(planned, config)}); "
                "rerun with --fresh to start over, or set output.name to use another folder"
            )
        if saved_config.loop.rounds != config.loop.rounds:
            logger.info(f"{root}: planned rounds {saved_config.loop.rounds} -> {config.loop.rounds} (finished kept)")
    if fresh and root.exists():
        shutil.rmtree(root)
    else:
        RunFolder(root).verify_all()  # a damaged folder is refused before anything in it is written
    root.mkdir(parents=True, exist_ok=True)
    save_config(config, saved)
    return RunFolder(root)


def _planning(saved: Config, config: Config) -> Config:
    """The folder's config as `config` may resume it: where it lives does not count, and planning more rounds is
    allowed (no finished stage reads `loop.rounds`, so a sweep can be carried from 2 rounds to 6). Fewer rounds
    are not: the folder's later rounds would vanish from its reports."""
    loop = saved.loop.model_copy(update={"rounds": max(saved.loop.rounds, config.loop.rounds)})
    return saved.model_copy(update={"output": config.output, "loop": loop})


def read_run(root: Path) -> Config:
    """A run folder's config, once every finished stage's files match the sha256 recorded when they were
    written: the analyses read a run folder only after this check, as a resumed run does."""
    where = "give a folder that `run` made, e.g. runs/demo"
    if not root.is_dir():
        raise DataError(f"{root}: no such run folder ({where})")
    if not (root / "config.yaml").is_file():
        raise DataError(f"{root}: not a run folder, no config.yaml ({where})")
    config = load_config(root / "config.yaml")
    RunFolder(root).verify_all()
    return config


# Stages that read no `heal` field: runs whose configs differ only in `heal` compute them identically, so a sweep
# copies them from the first such run instead of recomputing (everything after the first heal depends on it).
# The base stages also read nothing of `loop.source`, so a prompt-distillation run shares them with a steering one.
BASE_STAGES = ("axis/check", "base/eval", "prompt/eval", "base/demo")
HEAL_INDEPENDENT_STAGES = (*BASE_STAGES, "round_00/vector", "round_00/collect", "round_00/eval_steered")


def _same_apart_from(config: Config, other: Config, loop_fields: tuple[str, ...]) -> bool:
    """Equal once `heal`, `output` (where a run lives) and the named `loop` fields are taken from `config`."""
    loop = other.loop.model_copy(update={field: getattr(config.loop, field) for field in loop_fields})
    return other.model_copy(update={"heal": config.heal, "output": config.output, "loop": loop}) == config


def differs_only_in_heal(config: Config, other: Config) -> bool:
    """True when the two runs compute the same HEAL_INDEPENDENT_STAGES: where a run lives and how many rounds it
    plans do not count (none of those stages reads either)."""
    return _same_apart_from(config, other, ("rounds",))


def shared_stages(config: Config, donor: Config) -> tuple[str, ...]:
    """The finished stages a run may copy from a donor run: the heal-independent ones when the two differ only in
    `heal`, the base stages when they differ also in `loop.source`, else none."""
    if differs_only_in_heal(config, donor):
        return heal_independent_stages(config)
    return BASE_STAGES if _same_apart_from(config, donor, ("rounds", "source")) else ()


def check_stage_donor(config: Config, donor_root: Path) -> tuple[str, ...]:
    """The stages a run may copy from the run folder `donor_root` (see `shared_stages`); an error when none."""
    saved = donor_root / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"cannot share stages with {donor_root}: it is not a run folder (no config.yaml)")
    donor_config = load_config(saved)
    stages = shared_stages(config, donor_config)
    if not stages:
        raise ConfigError(
            f"cannot share stages with {donor_root}: its config differs outside `heal` "
            f"({first_difference(donor_config, config)})"
        )
    return stages


def heal_independent_stages(config: Config) -> tuple[str, ...]:
    """HEAL_INDEPENDENT_STAGES that this config's loop runs (prompt distillation extracts no vector)."""
    steering = config.loop.source == "steer"
    return tuple(name for name in HEAL_INDEPENDENT_STAGES if steering or not name.endswith("/vector"))


def adopt_heal_independent_stages(folder: RunFolder, donor: RunFolder, stages: tuple[str, ...]) -> list[str]:
    """Copy the donor run's finished `stages` (heal-independent ones, in order) that `folder` has not done;
    returns their names. The caller has checked the donor with `check_stage_donor`."""
    adopted: list[str] = []
    for name in stages:  # in order: each may read the ones before it
        if folder.done(name):
            if not folder.same_files(name, donor):
                break  # this run computed it differently: later donor stages would not follow from its files
            folder.bring_annotations(name, donor)
        elif folder.adopt(name, donor):
            adopted.append(name)
        else:
            break
    return adopted


def first_difference(saved: Config, config: Config) -> str:
    for old, new in zip(config_to_yaml(saved).splitlines(), config_to_yaml(config).splitlines(), strict=False):
        if old != new:
            return f"first difference: {old.strip()!r} -> {new.strip()!r}"
    return "different length"


def stage(folder: RunFolder, name: str, work: Callable[[], object], artifacts: tuple[Path, ...] = ()) -> bool:
    """Run `work` unless `name` is done; returns True when it ran now. `artifacts` are the files it writes that
    later stages read: hashed when it finishes, checked whenever it is skipped."""
    if folder.done(name):
        folder.verify(name)
        logger.info(f"[{name}] done earlier; skipped")
        return False
    logger.info(f"[{name}] ...")
    started = time.perf_counter()
    folder.event("stage_start", stage=name)
    work()
    folder.mark_done(name, time.perf_counter() - started, artifacts)
    return True


def check_readout_unchanged(folder: RunFolder, readout: ReadoutItems) -> None:
    """A resumed run must score the items its earlier stages scored: an edited pairs file would mix two readouts."""
    path = folder.root / "eval_base.json"
    if not folder.done("base/eval") or not path.is_file():
        return
    recorded = json.loads(path.read_text())["trait"].get("items_sha256")
    if recorded is None:
        logger.warning(f"{path} predates recorded readout items: its trait numbers may use an older item set")
    elif recorded != readout.sha256:
        raise DataError(
            f"the readout items ({readout.source}) differ from those {path} was scored on; restore them, "
            "or rerun with --fresh"
        )


def round_name(round_index: int) -> str:
    """`round_00`, ...: a round's folder in a run folder, its stages' prefix and its adapter's name."""
    return f"round_{round_index:02d}"


def round_path(root: Path, round_index: int) -> Path:
    return root / round_name(round_index)


def round_dirs(root: Path) -> list[tuple[int, Path]]:
    """Every round folder present in a run folder, as (round index, path), by index."""
    found = [(path, path.name.removeprefix("round_")) for path in root.glob("round_*") if path.is_dir()]
    return sorted(
        (int(index), path) for path, index in found if index.isdigit() and path == round_path(root, int(index))
    )

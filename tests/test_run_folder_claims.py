"""A run claims its output folder before it builds anything: a second run into a folder
that another run holds stops in one line and leaves it untouched, two runs started
together into one folder end with one run's files, and the claim of a run that ended or
was killed blocks nothing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from finetune_helpers import write_recipe

import evit_patch.train.loop as loop
from evit_patch.tools.finetune import main as finetune_main
from evit_patch.train.recipe import RecipeError, load_recipe
from evit_patch.train.run_folder import LOCK_FILE, claim_output_folder

ROOT = Path(__file__).resolve().parent.parent
SHORT = {"train": {"epochs": 1, "max_steps_per_epoch": 2}, "data": {"train_subset": 64, "eval_subset": 32}}


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder``, hidden ones included, with a hash of its bytes."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def error_line(err: str) -> str:
    assert err.endswith("\n") and "Traceback" not in err, err
    line = err[:-1].split("\n")[-1]
    assert line.startswith("error: "), err
    return line


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("finished")
    return loop.train(load_recipe(write_recipe(folder, SHORT)), show_progress=False)


@pytest.mark.parametrize("extra", [[], ["--overwrite"], ["--resume"]], ids=["fresh", "overwrite", "resume"])
def test_a_run_into_a_folder_another_run_holds_stops_before_building_anything(finished_run, tmp_path, capsys,
                                                                            no_work, extra) -> None:
    folder = tmp_path / "run"
    shutil.copytree(finished_run, folder)
    recipe = write_recipe(tmp_path, {**SHORT, "train": {**SHORT["train"], "epochs": 2, "output_dir": str(folder)}})
    arguments = [str(recipe), "--no-report", *extra]
    if extra == ["--resume"]:
        arguments.append(str(folder / "checkpoint.pth"))
    with claim_output_folder(folder):  # the first run, still running
        before = snapshot(folder)
        with pytest.raises(SystemExit) as stopped:
            finetune_main(arguments)
        assert stopped.value.code == 2
        line = error_line(capsys.readouterr().err)
        assert f"train.output_dir {str(folder)!r} is in use by a run that has not ended (process {os.getpid()} on " \
               in line and "--set train.output_dir=NEW_FOLDER" in line, line
        assert snapshot(folder) == before  # the first run's files and its claim untouched
    assert not (folder / LOCK_FILE).exists()


def test_two_runs_started_together_into_one_folder_end_with_one_runs_files(tmp_path) -> None:
    recipe = write_recipe(tmp_path, SHORT)
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "evit_patch.finetune", str(recipe), "--no-report"]
    runs = [subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    assert sorted(code for code, _ in results) == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    line = error_line(refused)
    folder = tmp_path / "run"
    assert f"train.output_dir {str(folder)!r}" in line and ("is in use by a run" in line or "already holds a run" in line)
    assert [json.loads(text)["epoch"] for text in (folder / "metrics.jsonl").read_text().splitlines()] == [1]
    assert not (folder / LOCK_FILE).exists()


CLAIM_AND_DIE = """
import os, signal, sys
from pathlib import Path
from evit_patch.train.run_folder import claim_output_folder
with claim_output_folder(Path(sys.argv[1])):
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_claim_of_a_killed_run_blocks_nothing(tmp_path) -> None:
    folder = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", CLAIM_AND_DIE, str(folder)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (folder / LOCK_FILE).exists()  # left behind, but no longer locked
    with claim_output_folder(folder):
        assert f"process {os.getpid()} on " in (folder / LOCK_FILE).read_text()
    assert os.listdir(folder) == []  # the lock file went with the new claim; the folder was not its to remove


def test_a_claim_is_released_on_errors_and_ctrl_c_and_takes_away_only_what_it_created(tmp_path) -> None:
    folder = tmp_path / "new" / "nested" / "run"
    for stop in (RecipeError("refused"), KeyboardInterrupt()):
        with pytest.raises(type(stop)):
            with claim_output_folder(folder):
                assert (folder / LOCK_FILE).is_file()
                raise stop
        assert not (tmp_path / "new").exists()
    with claim_output_folder(folder):
        (folder / "metrics.jsonl").write_text("{}\n")
    assert os.listdir(folder) == ["metrics.jsonl"]
    with claim_output_folder(folder):
        with pytest.raises(RecipeError, match="is in use by a run that has not ended"):
            with claim_output_folder(folder):
                pass
        assert (folder / LOCK_FILE).is_file()  # the refused claim did not remove the holder's lock file

"""The base-training curves table: every epoch of every run, in order, each run's own value."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "training_curves.py"


def write_run(folder: Path, top1: list[float]) -> Path:
    folder.mkdir()
    lines = [json.dumps({"epoch": epoch, "train_loss": 1.0, "top1": value}) for epoch, value in enumerate(top1, start=1)]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_table_has_one_column_per_run_and_a_row_per_epoch(tmp_path) -> None:
    short = write_run(tmp_path / "short", [70.0, 75.5])
    long = write_run(tmp_path / "long", [71.25, 76.0, 79.125])
    result = subprocess.run([sys.executable, str(SCRIPT), str(short), str(long), "--labels", "a", "b",
                             "--out", str(tmp_path / "curves")], capture_output=True, text=True, check=True)
    table = (tmp_path / "curves.md").read_text().splitlines()
    assert table[0] == "| epoch | top-1, a | top-1, b |"
    assert table[2:] == ["| 1 | 70.00 | 71.25 |", "| 2 | 75.50 | 76.00 |", "| 3 | — | 79.12 |"]
    assert result.stdout.splitlines()[:1] == table[:1]
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_a_folder_without_metrics_or_mismatched_labels_is_one_line_exit_2(tmp_path) -> None:
    run = write_run(tmp_path / "run", [70.0])
    for arguments, message in ((["--labels", "a", "b"], "give one per run"), ([], "metrics.jsonl not found")):
        folders = [str(run)] if arguments else [str(tmp_path)]
        result = subprocess.run([sys.executable, str(SCRIPT), *folders, *arguments, "--out", str(tmp_path / "c")],
                                capture_output=True, text=True)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr
        assert not (tmp_path / "c.md").exists()


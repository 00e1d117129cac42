"""The prepared GPU script runs end to end in its CPU ``--quick`` form, so it cannot rot
between the sessions that are lent a GPU."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = {  # file -> variants its table must list
    "inference_b4_bf16": ["unpatched", "evit 0.7", "evit-no-fusion 0.7", "tome 0.7", "dynamicvit 0.7",
                          "width-pruning 0.7"],
    "inference_b4_bf16_evit": ["unpatched", "evit 0.7", "evit 0.5"],
    "latency_b1_bf16": ["unpatched", "evit 0.7", "evit 0.5", "token-count bound 0.7", "token-count bound 0.5"],
    "train_b4_bf16": ["unpatched", "evit 0.7", "evit-no-fusion 0.7", "tome 0.7", "dynamicvit 0.7",
                      "width-pruning 0.7"],
    "compiled_b1_bf16": ["unpatched", "tome 0.7", "compiled unpatched", "compiled tome 0.7"],
}


def test_device_script_quick_writes_every_table(tmp_path: Path) -> None:
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_run.sh"), "--quick", f"--out={tmp_path}"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for name, variants in EXPECTED.items():
        table = (tmp_path / f"{name}.md").read_text()
        rows = [line.split(" | ")[2] for line in table.splitlines() if line.startswith("| deit_tiny")]
        assert rows == variants, (name, rows)
        assert (tmp_path / f"{name}.json").is_file() and (tmp_path / f"{name}.png").is_file()
    assert "training step" in (tmp_path / "train_b4_bf16.md").read_text()
    compiled = [line.split(" | ") for line in (tmp_path / "compiled_b1_bf16.md").read_text().splitlines()
                if line.startswith("| deit_tiny")]
    assert [row[-1] for row in compiled] == ["n/a |", "n/a |", "0 |", "0 |"]  # dynamo's graph breaks
    rotary = [line.split(" | ")[:2] for line in (tmp_path / "rotary_b1_b4_bf16.md").read_text().splitlines()
              if line.startswith("| ") and "---" not in line][1:]
    models = ["| deit_small_patch16_224", "| eva02_small_patch14_224", "| vit_small_patch16_dinov3"]
    assert rotary == [[model, batch] for batch in ("1", "4") for model in models]


def test_device_script_refuses_an_unknown_argument(tmp_path: Path) -> None:
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_run.sh"), "--quik"], capture_output=True,
                            text=True)
    assert result.returncode == 2 and "unknown argument --quik" in result.stderr

"""benchmarks/mac_engines.py, the measurement behind docs/macs.md, run as documented with small arguments."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTED = "python benchmarks/mac_engines.py --out docs/macs.md"


def test_the_documented_command_writes_the_table(tmp_path) -> None:
    assert DOCUMENTED in (ROOT / "docs" / "macs.md").read_text()
    assert DOCUMENTED in (ROOT / "benchmarks" / "mac_engines.py").read_text()
    arguments = DOCUMENTED.split()[1:]
    arguments[arguments.index("--out") + 1] = str(tmp_path / "macs.md")
    result = subprocess.run([sys.executable, *arguments, "--cases", "DeiT-S keep 0.7", "--repeats", "1"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    (row,) = [line for line in (tmp_path / "macs.md").read_text().splitlines() if line.startswith("| DeiT-S keep 0.7 |")]
    fvcore, torch_count, ratio, alone = (float(cell) for cell in row.split("|")[2:6])
    assert fvcore == torch_count == 3.0359 and ratio == 1.0  # the paper's 3.0, and the two engines agree
    assert alone < fvcore - 0.1  # FlopCounterMode alone misses norms and the CPU attention kernel


def test_a_case_it_does_not_know_exits_2() -> None:
    result = subprocess.run([sys.executable, "benchmarks/mac_engines.py", "--cases", "DeiT-L", "--repeats", "1"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "invalid choice: 'DeiT-L'" in result.stderr

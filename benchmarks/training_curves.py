"""Test top-1 after every epoch of one or more training runs, side by side: whether a base
model has stopped improving before it is used as the starting point of a comparison.

    python benchmarks/training_curves.py runs/fashion_mnist_pretrain runs/fashion_mnist_pretrain_reg4 \\
        --labels "no registers" "4 register tokens" --out benchmarks/results/fashion_mnist_base_training

reads each run folder's ``metrics.jsonl`` and writes ``<out>.md`` (a table, one column per
run) and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from evit_patch.extras import require


def fail(message: str) -> None:
    """A bad argument: one line on stderr, exit status 2."""
    print(f"training_curves.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def read_curve(run: Path) -> dict[int, float]:
    """Epoch -> test top-1 of one run folder."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        fail(f"{path} not found; pass the output folder of a training run")
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {line["epoch"]: line["top1"] for line in lines}


def markdown(curves: dict[str, dict[int, float]]) -> str:
    epochs = sorted({epoch for curve in curves.values() for epoch in curve})
    lines = ["| epoch | " + " | ".join(f"top-1, {label}" for label in curves) + " |",
             "|---|" + "---|" * len(curves)]
    for epoch in epochs:
        cells = [f"{curve[epoch]:.2f}" if epoch in curve else "—" for curve in curves.values()]
        lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(curves: dict[str, dict[int, float]], path: Path) -> None:
    matplotlib = require("matplotlib", "plot")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for label, curve in curves.items():
        axis.plot(list(curve), list(curve.values()), marker="o", label=label)
    axis.set_xlabel("epoch")
    axis.set_ylabel("test top-1 (%)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="output folders of training runs")
    parser.add_argument("--labels", nargs="+", help="one per run (default: the folder names)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    labels = args.labels or [run.name for run in args.runs]
    if len(labels) != len(args.runs):
        fail(f"--labels: {len(labels)} given for {len(args.runs)} runs; give one per run")
    curves = {label: read_curve(run) for label, run in zip(labels, args.runs)}
    table = markdown(curves)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(table + "\n")
    plot(curves, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()

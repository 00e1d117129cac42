"""The published EViT GMACs tables, reproduced with count_macs, beside the paper's figures.

    python benchmarks/macs_table.py [--out benchmarks/results/macs_table.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import timm

import evit_patch
from evit_patch.cost import keep_rate_for_resolution

# (model, img_size, layers, keep rate, published GMACs); published figures from the EViT paper
PUBLISHED = [
    ("deit_small_patch16_224", 224, [3, 6, 9], 1.0, 4.6),
    ("deit_small_patch16_224", 224, [3, 6, 9], 0.9, 4.0),
    ("deit_small_patch16_224", 224, [3, 6, 9], 0.8, 3.5),
    ("deit_small_patch16_224", 224, [3, 6, 9], 0.7, 3.0),
    ("deit_small_patch16_224", 224, [3, 6, 9], 0.6, 2.6),
    ("deit_small_patch16_224", 224, [3, 6, 9], 0.5, 2.3),
    ("deit_base_patch16_224", 224, [3, 6, 9], 1.0, 17.6),
    ("deit_base_patch16_224", 224, [3, 6, 9], 0.7, 11.6),
    ("deit_small_patch16_224", 272, [3, 6, 9], 0.7, 4.6),
    ("deit_small_patch16_224", 288, [3, 6, 9], 0.6, 4.6),
    ("deit_small_patch16_224", 304, [3, 6, 9], 0.5, 4.6),
]
LVVIT = [("lvvit_s", 224, [4, 8, 12], 1.0, 6.6), ("lvvit_s", 224, [4, 8, 12], 0.7, 4.7),
         ("lvvit_m", 224, [5, 10, 15], 1.0, 12.7)]


def rows(entries: list[tuple]) -> list[str]:
    lines = []
    for name, size, layers, rate, published in entries:
        model = timm.create_model(name, img_size=size)
        if rate < 1.0:
            evit_patch.apply_evit(model, layers, rate)
        measured = evit_patch.count_macs(model) / 1e9
        bound = "at most " if size != 224 else ""
        lines.append(f"| {name} | {size} | {layers if rate < 1 else '-'} | {rate} | {measured:.2f} | "
                     f"{bound}{published} |")
    return lines


def resolution_rows() -> list[str]:
    base = timm.create_model("deit_small_patch16_224")
    return [
        f"| deit_small_patch16_224 | {size} | {keep_rate_for_resolution(base, size, [3, 6, 9]):.3f} | {paper} |"
        for size, paper in ((272, 0.7), (288, 0.6), (304, 0.5))
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    entries = list(PUBLISHED)
    try:
        import evit_patch.models  # noqa: F401  (registers LV-ViT when present)

        entries += LVVIT
    except ImportError:
        pass
    table = [
        "| model | px | layers | keep | GMACs (count_macs) | GMACs (paper) |",
        "|---|---|---|---|---|---|",
        *rows(entries),
        "",
        "| model | px | largest keep rate at the 224 px cost | paper's setting |",
        "|---|---|---|---|",
        *resolution_rows(),
    ]
    text = "\n".join(table)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

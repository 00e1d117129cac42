"""The tuner's choice against the paper's placement with the training-free variant, at that
placement's own measured speed-ups, on a trained Fashion-MNIST model.

One :func:`evit_patch.tune` over the recipe's model and the first ``--images`` test images
(half choose, half report), at ``--batch-size`` on this machine. The references, the paper's
blocks at each ``--keep-rates`` with the training-free variant, are timed in the same way
(paired with the unpatched model) and evaluated on the same held-out images; for each, the
tuned setting is the tuner's rule applied to what it timed: the most agreeing (on the
calibration half) of its front at least as fast as the reference.

    python benchmarks/tune_against_paper.py --batch-size 64 --out benchmarks/results/tune_fashion_mnist_b64

Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from evit_patch.core.arguments import paper_layers
from evit_patch.core.model_info import transformer_blocks
from evit_patch.tools.results import write_results
from evit_patch.train.data import build_dataset
from evit_patch.train.model_source import build_model
from evit_patch.train.recipe import load_recipe
from evit_patch.tuning.config import TokenConfig, apply_config
from evit_patch.tuning.search import outputs, quality, tune
from evit_patch.tuning.timing import paired_speeds, positive_int

ROOT = Path(__file__).resolve().parent.parent


def test_images(recipe, model, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = build_dataset(recipe.data, model, training=False)
    pairs = [dataset[index] for index in range(min(count, len(dataset)))]
    return torch.stack([image for image, _ in pairs]), torch.tensor([label for _, label in pairs])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "fashion_mnist.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.SUB=VALUE")
    parser.add_argument("--images", type=positive_int, default=1024)
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--keep-rates", type=float, nargs="+", default=[0.7, 0.5])
    parser.add_argument("--time-budget", type=float, default=600.0)
    parser.add_argument("--repeats", type=positive_int, default=7)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe, args.overrides)
    model = build_model(recipe.model).eval()
    images, labels = test_images(recipe, model, args.images)
    result = tune(model, images, labels, batch_size=args.batch_size, time_budget_s=args.time_budget,
                  repeats=args.repeats, progress=False)
    held_out = torch.tensor(result.held_out_images)
    reference_logits = outputs(model, images[held_out], args.batch_size, torch.device("cpu"))
    paper = tuple(paper_layers(len(transformer_blocks(model))))
    rows = []
    for keep_rate in args.keep_rates:
        config = TokenConfig("evit-training-free", paper, (keep_rate,) * len(paper), (("pooling", "always"),))
        patched = apply_config(copy.deepcopy(model), config)
        speed = paired_speeds({"unpatched": model, "paper": patched}, images[:args.batch_size],
                              repeats=args.repeats)["paper"]
        paper_quality = quality(reference_logits, outputs(patched, images[held_out], args.batch_size,
                                                          torch.device("cpu")), labels[held_out])
        faster = [trial for trial in result.front if trial.config is not None and trial.speed.speedup >= speed.speedup]
        tuned = max(faster, key=lambda trial: (trial.calibration.agreement, -trial.calibration.mean_kl), default=None)
        rows.append({"keep_rate": keep_rate, "paper": config.describe(), "paper_speedup": speed.speedup,
                     "paper_top1": paper_quality.top1, "paper_agreement": paper_quality.agreement,
                     "tuned": None if tuned is None else tuned.label,
                     "tuned_speedup": None if tuned is None else tuned.speed.speedup,
                     "tuned_top1": None if tuned is None else tuned.held_out.top1,
                     "tuned_agreement": None if tuned is None else tuned.held_out.agreement})
    unpatched_top1 = result.trials[0].held_out.top1 if result.trials[0].held_out else None
    lines = [f"{args.recipe.name} {' '.join(args.overrides)}: batch {args.batch_size}, {len(held_out)} held-out test "
             f"images (unpatched top-1 {unpatched_top1}), {len(result.measured)} settings timed of {len(result.trials)}.",
             "", "| paper's blocks, training-free, keep | its speed-up | its top-1 | tuned setting | its speed-up | "
             "its top-1 |", "|---|---|---|---|---|---|"]
    for row in rows:
        tuned = ("none as fast", "—", "—") if row["tuned"] is None else (
            row["tuned"], f"{row['tuned_speedup']:.3f}", f"{100 * row['tuned_top1']:.2f}")
        lines.append(f"| {row['keep_rate']} | {row['paper_speedup']:.3f} | {100 * row['paper_top1']:.2f} | "
                     + " | ".join(tuned) + " |")
    if result.warning:
        lines += ["", result.warning]
    table = "\n".join(lines)
    print(table)
    write_results(args.out, table, {"setup": {**vars(args), "recipe": str(args.recipe), "out": str(args.out)},
                                    "rows": rows, "front": [trial.label for trial in result.front]})


if __name__ == "__main__":
    main()

"""The tuner's choice against the paper's placement with the training-free variant, at that
placement's own measured speed-ups, on a trained Fashion-MNIST model.

One :func:`evit_patch.tune` over the recipe's model and the first ``--images`` test images
(half choose, half report), at ``--batch-size`` on this machine. The references, the paper's
blocks at each ``--keep-rates`` with the training-free variant, are timed in the same way
(paired with the unpatched model) and evaluated on the same held-out images; for each, the
tuned setting is the tuner's rule applied to what it timed: the most agreeing (on the
calibration half) of its front at least as fast as the reference. Both are also scored on the
rest of the test set, which the tuning never saw (about 9,000 images: a tighter figure than
the held-out half). With ``--finetune`` both settings of every row are then fine-tuned with the
recipe's own budget (its ``train`` section; ``--set`` applies) and scored again.

    python benchmarks/tune_against_paper.py --batch-size 64 --out benchmarks/results/tune_fashion_mnist_b64

Writes ``<out>.json``, ``<out>.md`` and ``<out>.png`` (held-out top-1 against speed-up); the
fine-tuning runs go under ``--runs``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from evit_patch.core.arguments import paper_layers
from evit_patch.core.model_info import transformer_blocks
from evit_patch.tools.evaluate import read_run_recipe
from evit_patch.tools.results import write_results
from evit_patch.train.assembly import rebuild
from evit_patch.train.data import build_dataset
from evit_patch.train.loop import train
from evit_patch.train.model_source import build_model
from evit_patch.train.recipe import Recipe, load_recipe, recipe_from_dict, recipe_to_dict
from evit_patch.tuning.config import TokenConfig, apply_config, recipe_fragment
from evit_patch.tuning.result import TuneResult
from evit_patch.tuning.search import outputs, quality, tune
from evit_patch.tuning.timing import paired_speeds, positive_int

ROOT = Path(__file__).resolve().parent.parent


def test_images(recipe: Recipe, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The recipe's whole evaluation set (its ``data.eval_subset``) with its labels."""
    dataset = build_dataset(recipe.data, model, training=False)
    pairs = [dataset[index] for index in range(len(dataset))]
    return torch.stack([image for image, _ in pairs]), torch.tensor([label for _, label in pairs])


def fine_tuned(recipe: Recipe, config: Optional[TokenConfig], runs: Path) -> nn.Module:
    """The recipe's fine-tuning (its budget, its starting weights) run with ``config`` (None:
    no token reduction) in a
    folder of ``runs`` named after the setting and the whole recipe; a finished run there is
    reused (the other batch size often tunes to the same setting). The model, rebuilt from its files."""
    values = {**recipe_to_dict(recipe), **recipe_fragment(config)}
    digest = hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:10]
    name = "unpatched" if config is None else config.describe()
    folder = runs / f"{re.sub(r'[^0-9A-Za-z.-]+', '_', name)}-{digest}"
    values["train"] = {**values["train"], "output_dir": str(folder)}
    if not (folder / "model.safetensors").exists():
        train(recipe_from_dict(values), show_progress=False)
    return rebuild(read_run_recipe(folder / "recipe.yaml"), folder / "model.safetensors")


def top1(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> Optional[float]:
    if not len(images):
        return None
    logits = outputs(model, images, batch_size, torch.device("cpu"))
    return (logits.argmax(dim=-1) == labels).float().mean().item()


def percent(value: Optional[float]) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def plot(result: TuneResult, rows: list[dict], title: str, path: Path) -> None:
    """Held-out top-1 against speed-up: every timed setting, the paper's placement and the
    tuned setting of each row (hollow: after fine-tuning)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.4))
    timed = [trial for trial in result.trials if trial.speed is not None and trial.held_out is not None]
    axes.scatter([t.speed.speedup for t in timed], [100 * t.held_out.top1 for t in timed], s=10, color="0.7",
                 label="timed settings")
    for who, color in (("paper", "tab:red"), ("tuned", "tab:blue")):
        points = [row for row in rows if row[f"{who}_speedup"] is not None]
        name = "paper's blocks, training-free" if who == "paper" else "tuned"
        axes.scatter([r[f"{who}_speedup"] for r in points], [100 * r[f"{who}_top1"] for r in points], color=color,
                     label=name)
        after = [r for r in points if r.get(f"{who}_top1_fine_tuned") is not None]
        if after:
            axes.scatter([r[f"{who}_speedup"] for r in after], [100 * r[f"{who}_top1_fine_tuned"] for r in after],
                         facecolors="none", edgecolors=color, label=f"{name}, fine-tuned")
    axes.set_xlabel(f"speed-up over the unpatched model (batch {result.batch_size}, {result.device})")
    axes.set_ylabel("top-1 on held-out images (%)")
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def markdown(args: argparse.Namespace, result: TuneResult, rows: list[dict]) -> str:
    unpatched = result.trials[0].held_out
    after = "fine_tuned" in rows[0]
    lines = [f"{args.recipe.name} {' '.join(args.overrides)}: batch {args.batch_size}, {len(result.held_out_images)} "
             f"held-out test images (unpatched top-1 {100 * unpatched.top1:.2f}), {len(result.measured)} settings "
             f"timed of {len(result.trials)}." + (" Fine-tuned: the recipe's budget from the same weights." if after
                                                  else ""),
             "", "| paper's blocks, training-free, keep | its speed-up | its top-1 | tuned setting | its speed-up | "
             "its top-1 |" + (" paper fine-tuned | tuned fine-tuned |" if after else ""),
             "|---|---|---|---|---|---|" + ("---|---|" if after else "")]
    for row in rows:
        tuned = ("none as fast", "—", "—") if row["tuned"] is None else (
            row["tuned"], f"{row['tuned_speedup']:.3f}", f"{100 * row['tuned_top1']:.2f}")
        cells = [str(row["keep_rate"]), f"{row['paper_speedup']:.3f}", f"{100 * row['paper_top1']:.2f}", *tuned]
        if after:
            cells += [percent(row[f"{who}_top1_fine_tuned"]) for who in ("paper", "tuned")]
        lines.append("| " + " | ".join(cells) + " |")
    if result.warning:
        lines += ["", result.warning]
    if rows[0]["rest_images"]:
        lines += ["", f"Top-1 on the other {rows[0]['rest_images']} test images, which the tuning never saw "
                  f"(unpatched {percent(rows[0]['unpatched_top1_rest'])}):", "",
                  "| keep | paper's blocks | tuned | " + ("paper fine-tuned | tuned fine-tuned |" if after else ""),
                  "|---|---|---|" + ("---|---|" if after else "")]
        for row in rows:
            keys = ["paper_top1_rest", "tuned_top1_rest"] + (
                ["paper_top1_rest_fine_tuned", "tuned_top1_rest_fine_tuned"] if after else [])
            lines.append(f"| {row['keep_rate']} | " + " | ".join(percent(row[key]) for key in keys) + " |")
    return "\n".join(lines)


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
    parser.add_argument("--finetune", action="store_true", help="also fine-tune both settings of every row")
    parser.add_argument("--runs", type=Path, default=Path("runs") / "tune_against_paper",
                        help="where the fine-tuning runs go (one folder per setting and recipe)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe, args.overrides)
    model = build_model(recipe.model).eval()
    every_image, every_label = test_images(recipe, model)
    images, labels = every_image[:args.images], every_label[:args.images]
    rest, rest_labels = every_image[args.images:], every_label[args.images:]  # never seen by the tuning
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
        faster = [trial for trial in result.front if trial.speed.speedup >= speed.speedup]  # the unpatched model too
        tuned = max(faster, key=lambda trial: (trial.calibration.agreement, -trial.calibration.mean_kl), default=None)
        row = {"keep_rate": keep_rate, "paper": config.to_dict(), "paper_label": config.describe(),
               "paper_speedup": speed.speedup, "paper_top1": paper_quality.top1,
               "paper_agreement": paper_quality.agreement,
               "tuned": None if tuned is None else tuned.label,
               "tuned_config": None if tuned is None or tuned.config is None else tuned.config.to_dict(),
               "tuned_speedup": None if tuned is None else tuned.speed.speedup,
               "tuned_top1": None if tuned is None else tuned.held_out.top1,
               "tuned_agreement": None if tuned is None else tuned.held_out.agreement,
               "rest_images": len(rest), "unpatched_top1_rest": top1(model, rest, rest_labels, args.batch_size),
               "paper_top1_rest": top1(patched, rest, rest_labels, args.batch_size),
               "tuned_top1_rest": None if tuned is None else top1(
                   model if tuned.config is None else apply_config(copy.deepcopy(model), tuned.config), rest,
                   rest_labels, args.batch_size)}
        rows.append(row)
    if args.finetune:  # after every timing, so that nothing is timed beside the training
        print("timing done; fine-tuning", flush=True)
        for row in rows:
            for who, setting in (("paper", row["paper"]), ("tuned", row["tuned_config"])):
                trained = None if row[who] is None else fine_tuned(
                    recipe, None if setting is None else TokenConfig.from_dict(setting), args.runs)
                row[f"{who}_top1_fine_tuned"] = None if trained is None else top1(
                    trained, images[held_out], labels[held_out], args.batch_size)
                row[f"{who}_top1_rest_fine_tuned"] = None if trained is None else top1(
                    trained, rest, rest_labels, args.batch_size)
            row["fine_tuned"] = True
    table = markdown(args, result, rows)
    print(table)
    setup = {name: str(value) if isinstance(value, Path) else value for name, value in vars(args).items()}
    write_results(args.out, table, {"setup": setup, "rows": rows, "front": [trial.label for trial in result.front],
                                    "timed": [{"setting": trial.label, "speedup": trial.speed.speedup,
                                               "calibration_top1": trial.calibration.top1,
                                               "calibration_agreement": trial.calibration.agreement}
                                              for trial in result.measured]})
    plot(result, rows, f"{args.recipe.name} {' '.join(args.overrides)}"[:90], args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()

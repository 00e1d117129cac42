"""Token methods used off the shelf: top-1 of a trained model patched and evaluated as it is.

Every method runs at EViT's layers and token counts from the recipe's model, with no
fine-tuning: the registry's unpatched model, paper EViT, training-free EViT, ToMe-style
merging and random drop, and three ablations of training-free EViT (never pooling, pooling
only the samples it merges closer, no proportional attention). For the per-sample choice the
share of images that each layer pooled rather than absorbed is recorded too. On a model whose
positions follow the kept tokens (rotary), each method runs under its own default position rule
(``members`` for merged tokens, ``representative`` for EViT's fused token), and
``--position-rules representative members`` adds the methods that make tokens stand for several
under each rule that is not their default (:func:`evit_patch.set_position_rule`; ``top-member``
only paper EViT, the one it changes).

    python benchmarks/training_free.py --out benchmarks/results/training_free_fashion_mnist
    python benchmarks/training_free.py --recipe recipes/lvvit_fashion_mnist.yaml \\
        --out benchmarks/results/training_free_lvvit_fashion_mnist
    python benchmarks/training_free.py --recipe recipes/fashion_mnist_rotary.yaml \\
        --position-rules representative members top-member --out benchmarks/results/training_free_fashion_mnist_rotary

Writes ``<out>.json``, ``<out>.md`` (top-1 per method and keep rate) and ``<out>.png``.
``--set data.eval_subset=2000`` evaluates the first 2000 test images only.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Callable, Iterator, Optional
from unittest import mock

import torch
from torch import nn

from evit_patch.core.positions import POSITION_RULES
from evit_patch.core.token_patch import apply_token_reducer, reduction_state, set_position_rule
from evit_patch.reducers import TrainingFreeEvit, training_free
from evit_patch.tools.results import write_results
from evit_patch.train import distributed
from evit_patch.train.assembly import prepare_model
from evit_patch.train.data import build_dataset
from evit_patch.train.loaders import eval_loader
from evit_patch.train.methods import METHODS
from evit_patch.train.metrics import accuracy
from evit_patch.train.model_source import build_model
from evit_patch.train.recipe import Recipe, load_recipe

ROOT = Path(__file__).resolve().parent.parent
REGISTRY_METHODS = ["unpatched", "evit", "evit-training-free", "tome", "random"]
ABLATIONS: dict[str, Callable[[], TrainingFreeEvit]] = {
    "training-free EViT never pooling (absorb only)": lambda: TrainingFreeEvit(pooling="never"),
    "training-free EViT pooling the samples it merges closer": lambda: TrainingFreeEvit(pooling="closer"),
    "training-free EViT without proportional attention": lambda: TrainingFreeEvit(proportional_attention=False),
}
MIXING_METHODS = ["evit", "evit-training-free", "tome"]  # those whose tokens can stand for several
RULE_METHODS = {"top-member": ["evit"]}  # a rule that changes fewer (its merged tokens are the default's)


@contextlib.contextmanager
def pooled_counter(model: nn.Module) -> Iterator[Optional[list[list[int]]]]:
    """Per reorganization layer ``[pooled, seen]`` images while the context is open, when
    the model's reducer is training-free EViT choosing per sample (else None: the others
    pool wherever they can, or never)."""
    reducer = getattr(getattr(model, "evit_state", None), "reducer", None)
    if not isinstance(reducer, TrainingFreeEvit) or reducer.pooling != "closer":
        yield None
        return
    counts = [[0, 0] for _ in model.evit_state.layers]
    position = [0]
    reduce, decide = reducer.reduce, training_free.pools_closer

    def reduce_at(x, attention, context):
        position[0] = context.position
        counts[position[0]][1] += x.shape[0]
        return reduce(x, attention, context)

    def decide_counted(*similarities: torch.Tensor) -> torch.Tensor:
        pools = decide(*similarities)
        counts[position[0]][0] += int(pools.sum())
        return pools

    reducer.reduce = reduce_at
    with mock.patch.object(training_free, "pools_closer", decide_counted):
        yield counts
    del reducer.reduce


def measure(model: nn.Module, loader, runtime: distributed.Runtime) -> dict:
    with pooled_counter(model) as counts:
        row = {"top1": accuracy(model.eval(), loader, runtime)["top1"]}
    if counts is not None:
        row["pooled_share"] = [pooled / max(seen, 1) for pooled, seen in counts]
    return row


def method_rows(recipe_path: Path, overrides: list[str], keep_rate: float, loader,
                runtime: distributed.Runtime, position_rules: list[str]) -> list[dict]:
    """Every registry method but the unpatched model, and the ablations, at one keep rate, each under
    its default position rule; the methods whose tokens stand for several again under each of
    ``position_rules`` that is not their default."""
    rows = []
    for name in REGISTRY_METHODS[1:]:
        recipe = load_recipe(recipe_path, [*overrides, *METHODS[name].selection, f"reduction.keep_rate={keep_rate}"])
        model = prepare_model(recipe)
        rows.append({"method": name, "label": METHODS[name].label, "keep_rate": keep_rate,
                     "position_rule": reduction_state(model).position_rule, **measure(model, loader, runtime)})
    for rule in position_rules:
        for name in RULE_METHODS.get(rule, MIXING_METHODS):
            recipe = load_recipe(recipe_path, [*overrides, *METHODS[name].selection, f"reduction.keep_rate={keep_rate}"])
            model = prepare_model(recipe)
            if reduction_state(model).position_rule == rule:
                continue  # its default: the row above
            set_position_rule(model, rule)
            rows.append({"method": name, "label": f"{METHODS[name].label}, position rule {rule}",
                         "keep_rate": keep_rate, **measure(model, loader, runtime)})
    recipe = load_recipe(recipe_path, [*overrides, f"reduction.keep_rate={keep_rate}"])
    for label, make in ABLATIONS.items():
        model = apply_token_reducer(build_model(recipe.model), recipe.reduction.layers, keep_rate, make())
        rows.append({"method": "ablation", "label": label, "keep_rate": keep_rate, **measure(model, loader, runtime)})
    return rows


def markdown(rows: list[dict], setup: dict) -> str:
    keep_rates = setup["keep_rates"]
    lines = [f"{setup['recipe']} {' '.join(setup['overrides'])}: top-1 (%) with no fine-tuning on "
             f"{setup['eval_images']} test images, EViT's layers {setup['layers']} and token counts.", "",
             "| method | " + " | ".join(f"keep {k}" for k in keep_rates) + " |",
             "|---|" + "---|" * len(keep_rates)]
    for label in dict.fromkeys(row["label"] for row in rows):
        cells = {row["keep_rate"]: row for row in rows if row["label"] == label}
        lines.append(f"| {label} | " + " | ".join(f"{cells[k]['top1']:.2f}" for k in keep_rates) + " |")
    shares = [row for row in rows if "pooled_share" in row]
    if shares:
        lines += ["", f"{shares[0]['label']}: share of images pooled (bipartite merge closer than absorbing) per layer: "
                  + "; ".join(f"keep {row['keep_rate']}: " + " / ".join(f"{s:.0%}" for s in row["pooled_share"])
                              for row in shares) + "."]
    return "\n".join(lines)


def plot(rows: list[dict], setup: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(row["label"] for row in rows))
    keep_rates = setup["keep_rates"]
    figure, axis = plt.subplots(figsize=(1.6 * len(labels) + 2, 4.5))
    width = 0.8 / len(keep_rates)
    for offset, keep in enumerate(keep_rates):
        values = [next(row["top1"] for row in rows if row["label"] == label and row["keep_rate"] == keep)
                  for label in labels]
        bars = axis.bar([i + offset * width for i in range(len(labels))], values, width, label=f"keep {keep}")
        axis.bar_label(bars, fmt="%.1f", fontsize=7)
    axis.set_xticks([i + width * (len(keep_rates) - 1) / 2 for i in range(len(labels))])
    axis.set_xticklabels([label.replace(" without ", "\nwithout ") for label in labels], fontsize=7)
    axis.set_ylabel("top-1 (%), no fine-tuning")
    axis.set_title(f"{setup['recipe']} {' '.join(setup['overrides'])}", fontsize=8)
    axis.legend()
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "fashion_mnist.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.SUB=VALUE")
    parser.add_argument("--keep-rates", type=float, nargs="+", default=[0.7, 0.5])
    parser.add_argument("--position-rules", nargs="+", choices=POSITION_RULES, default=[],
                        help="each adds the rows of the methods it changes, where it is not their default")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    runtime = distributed.Runtime(torch.device("cpu"))
    recipe: Recipe = load_recipe(args.recipe, args.overrides)
    dataset = build_dataset(recipe.data, build_model(recipe.model), training=False)
    loader = eval_loader(dataset, recipe, runtime)
    unpatched = measure(prepare_model(load_recipe(args.recipe, [*args.overrides, *METHODS["unpatched"].selection])),
                        loader, runtime)
    rows = [row for keep in args.keep_rates for row in [
        {"method": "unpatched", "label": METHODS["unpatched"].label, "keep_rate": keep, **unpatched},
        *method_rows(args.recipe, args.overrides, keep, loader, runtime, args.position_rules)]]
    setup = {"recipe": str(args.recipe.relative_to(ROOT) if args.recipe.is_relative_to(ROOT) else args.recipe),
             "overrides": args.overrides, "keep_rates": args.keep_rates, "position_rules": args.position_rules,
             "layers": recipe.reduction.layers,
             "eval_images": len(dataset), "torch": torch.__version__}
    table = markdown(rows, setup)
    print(table)
    write_results(args.out, table, {"setup": setup, "rows": rows})
    plot(rows, setup, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()

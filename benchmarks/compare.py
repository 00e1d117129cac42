"""EViT against the other ways of making a ViT cheaper, at equal MACs, on real data.

Every method starts from the same base weights (the recipe's ``model``), gets the same
fine-tuning (the recipe's optimizer and data, the same number of steps and seed), and
is measured the same way: top-1 before and after fine-tuning on the full evaluation
split, GMACs (fvcore), parameters, and images/s of all fine-tuned models timed side by
side, interleaved, in this one process (speed-up = median of per-repeat ratios to the
unpatched model). Budgets are EViT's cost at each keep rate: token methods run at
EViT's layers and token counts, DynamicViT at the keep ratio whose MACs match, width
pruning to EViT's MACs.

    python benchmarks/compare.py                                   # the embedded default, about an hour on 2 cores
    python benchmarks/compare.py --recipe recipes/deit_s.yaml --set data.root=/data/imagenet --steps 2000

writes ``<out>.md`` (the table), ``<out>.json`` and ``<out>.png`` (top-1 against images/s).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from evit_patch import apply_evit, count_macs
from evit_patch.core.model_info import example_images
from evit_patch.cost import largest_within
from evit_patch.dynamicvit import apply_dynamicvit, dynamicvit_state
from evit_patch.tools.timing import interleaved_images_per_second
from evit_patch.train import distributed
from evit_patch.train.assembly import prepare_model
from evit_patch.train.data import build_dataset
from evit_patch.train.loaders import eval_loader
from evit_patch.train.loop import run_training
from evit_patch.train.methods import METHODS
from evit_patch.train.metrics import accuracy
from evit_patch.train.model_source import build_model
from evit_patch.train.recipe import Recipe, load_recipe

ROOT = Path(__file__).resolve().parent.parent

COMPARISON_SETTINGS = {"dynamicvit": ["dynamicvit.freeze_epochs=0"]}  # a short budget: no frozen backbone
LABELS = {"unpatched": "unpatched (same fine-tuning)", "dynamicvit": "DynamicViT (learned predictors)",
          "width-pruning": "width pruning (torch-pruning)"}  # the comparison's wording of the registry's labels


def label_of(method: str) -> str:
    return LABELS.get(method, METHODS[method].label)


@dataclass
class Row:
    """One method at one budget."""

    method: str
    family: str  # the method's label without its budget
    keep_rate: Optional[float]  # EViT's keep rate whose MACs are the budget
    setting: str  # what the method runs with to meet it
    macs: float
    parameters: int
    top1_before: Optional[float]
    top1_after: float
    minutes: float
    images_per_second: list[float] = field(default_factory=list)
    speedup: Optional[float] = None

    @property
    def label(self) -> str:
        return self.family if self.keep_rate is None else f"{self.family}, keep {self.keep_rate}"


def method_recipe(args: argparse.Namespace, method: str, keep_rate: Optional[float]) -> Recipe:
    overrides = [*METHODS[method].selection, *COMPARISON_SETTINGS.get(method, [])]
    tag = method if keep_rate is None else f"{method}_{keep_rate}"
    run = ["train.epochs=1", f"train.max_steps_per_epoch={args.steps}", f"train.output_dir={args.out.parent / 'runs' / tag}"]
    budget = [] if keep_rate is None else [f"evit.keep_rate={keep_rate}", f"dynamicvit.keep_ratio={keep_rate}"]
    recipe = load_recipe(args.recipe, [*args.overrides, *overrides, *budget, *run])
    if recipe.dynamicvit.enabled:  # stages where EViT reorganizes, keep ratio at EViT's cost
        recipe.dynamicvit.layers = list(recipe.evit.layers)
        recipe.dynamicvit.keep_ratio = dynamicvit_ratio_for(recipe, evit_macs(recipe))
    return recipe


def evit_macs(recipe: Recipe) -> float:
    """The budget: the recipe's model with EViT at its layers and keep rate."""
    return count_macs(apply_evit(build_model(recipe.model), recipe.evit.layers, recipe.evit.keep_rate))


def dynamicvit_ratio_for(recipe: Recipe, target_macs: float) -> float:
    """The largest DynamicViT keep ratio whose inference costs at most ``target_macs``.

    Its predictors sit before their blocks, so at EViT's rate it prunes a block earlier
    and costs less; bisection on the exact count matches the budget instead."""
    model = apply_dynamicvit(build_model(recipe.model), recipe.dynamicvit.layers, 1.0).eval()
    state = dynamicvit_state(model)

    def macs_at(ratio: float) -> float:
        state.keep_ratio = ratio
        return count_macs(model)

    return round(largest_within(macs_at, target_macs, 0.01, 1.0, 1e-3), 3)


def method_setting(recipe: Recipe) -> str:
    """What a method runs with: keep rate, DynamicViT's keep ratio, or pruned widths."""
    if recipe.structural.enabled:
        shape = recipe.structural.shape
        return f"heads {shape.heads[0]}, MLP {shape.mlp_hidden[0]} per block"
    if recipe.dynamicvit.enabled:
        return f"keep ratio {recipe.dynamicvit.keep_ratio}"
    return f"keep {recipe.evit.keep_rate}" if recipe.evit.enabled else "all tokens, full width"


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def evaluate_method(args: argparse.Namespace, method: str, keep_rate: Optional[float],
                    runtime: distributed.Runtime) -> tuple[list[Row], dict[str, nn.Module]]:
    """Fine-tune one method at one budget; its table rows and its models for timing."""
    recipe = method_recipe(args, method, keep_rate)
    label, meaningful_untrained = label_of(method), METHODS[method].meaningful_untrained
    loader = eval_loader(build_dataset(recipe.data, build_model(recipe.model), training=False), recipe, runtime)
    before = accuracy(prepare_model(recipe), loader, runtime)["top1"] if meaningful_untrained else None
    started = time.perf_counter()
    _, model = run_training(recipe, None, runtime, show_progress=args.progress, overwrite=True)  # its own runs/
    minutes = (time.perf_counter() - started) / 60
    model.eval()
    after = accuracy(model, loader, runtime)["top1"]
    if method == "oracle":
        reducer = model.evit_state.reducer
        oracle_macs, oracle_parameters = count_macs(reducer.oracle), parameter_count(reducer.oracle)
        reducer.at_eval = False
        own = Row(method, f"{label}, own attention at eval", keep_rate, method_setting(recipe), count_macs(model), parameter_count(model),
                  None, accuracy(model, loader, runtime)["top1"], minutes)
        own_model = copy.deepcopy(model)
        reducer.at_eval = True
        rows = [Row(method, f"{label}, oracle at eval", keep_rate, own.setting, own.macs + oracle_macs,
                    own.parameters + oracle_parameters, before, after, minutes), own]
        models = {rows[0].label: model, own.label: own_model}
    else:
        rows = [Row(method, label, keep_rate, method_setting(recipe), count_macs(model), parameter_count(model),
                    before, after, minutes)]
        models = {rows[0].label: model}
    print(json.dumps({"method": rows[0].label, "top1_before": before, "top1_after": after, "minutes": round(minutes, 2)}),
          flush=True)
    return rows, models


def time_side_by_side(rows: list[Row], models: dict[str, nn.Module], recipe: Recipe, repeats: int) -> None:
    """Images/s of every fine-tuned model, interleaved; speed-up against the unpatched one."""
    images = example_images(next(iter(models.values())), recipe.train.benchmark_batch_size, seed=0)
    timings = interleaved_images_per_second(models, images, repeats)
    base = timings[rows[0].label]
    for row in rows:
        row.images_per_second = timings[row.label]
        row.speedup = statistics.median(t / b for t, b in zip(row.images_per_second, base))


def markdown(rows: list[Row], setup: dict) -> str:
    lines = [
        f"{setup['recipe']}: {setup['steps']} fine-tuning steps of batch {setup['batch_size']} for every method "
        f"from the same base, top-1 on all {setup['eval_images']} evaluation images; images/s at batch "
        f"{setup['benchmark_batch_size']} on {setup['device']} ({setup['threads']} threads), median of "
        f"{setup['repeats']} interleaved repeats; speed-up = median of per-repeat ratios to the unpatched model.",
        "",
        "| method | budget: EViT's MACs at keep | runs with | GMACs | params (M) | top-1 before FT | top-1 after FT "
        "| images/s | speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        before = f"{row.top1_before:.2f}" if row.top1_before is not None else "—"
        keep = f"{row.keep_rate}" if row.keep_rate is not None else "—"
        lines.append(f"| {row.family} | {keep} | {row.setting} | {row.macs / 1e9:.4f} | {row.parameters / 1e6:.3f} | {before} | "
                     f"{row.top1_after:.2f} | {statistics.median(row.images_per_second):.0f} | {row.speedup:.2f}x |")
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for family in dict.fromkeys(row.family for row in rows):
        members = sorted((row for row in rows if row.family == family), key=lambda row: row.speedup)
        axis.plot([row.speedup for row in members], [row.top1_after for row in members], marker="o", label=family)
        for row in members:
            if row.keep_rate is not None:
                axis.annotate(f"{row.keep_rate}", (row.speedup, row.top1_after), fontsize=7,
                              textcoords="offset points", xytext=(3, 3))
    axis.set_xlabel("speed-up over the unpatched model (images/s ratio, same process)")
    axis.set_ylabel("top-1 after fine-tuning (%)")
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "fashion_mnist.yaml",
                        help="base recipe: model, data, optimizer and EViT layers of every method")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.SUB=VALUE")
    parser.add_argument("--keep-rates", type=float, nargs="+", default=[0.7, 0.5])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps, the same for every method")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--progress", action="store_true", help="show a progress bar per run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "compare_fashion_mnist")
    args = parser.parse_args()
    runtime = distributed.Runtime(torch.device("cuda" if torch.cuda.is_available() else "cpu"))

    rows: list[Row] = []
    models: dict[str, nn.Module] = {}
    plan = [("unpatched", None)] + [(m, k) for k in args.keep_rates for m in args.methods if m != "unpatched"]
    for method, keep_rate in plan:
        method_rows, method_models = evaluate_method(args, method, keep_rate, runtime)
        rows += method_rows
        models.update(method_models)
    recipe = method_recipe(args, "unpatched", None)
    time_side_by_side(rows, models, recipe, args.repeats)
    setup = {"recipe": str(args.recipe.relative_to(ROOT) if args.recipe.is_relative_to(ROOT) else args.recipe),
             "steps": args.steps, "batch_size": recipe.train.batch_size,
             "eval_images": len(build_dataset(recipe.data, models[rows[0].label], training=False)),
             "benchmark_batch_size": recipe.train.benchmark_batch_size, "device": runtime.device.type,
             "threads": torch.get_num_threads(), "repeats": args.repeats, "torch": torch.__version__}
    table = markdown(rows, setup)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(table + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"setup": setup, "rows": [asdict(r) for r in rows]}, indent=2))
    plot(rows, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()

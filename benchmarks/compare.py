"""EViT against the other ways of making a ViT cheaper, at equal MACs, on real data, and
against the fine-tuning budget.

Every method starts from the same base weights (the recipe's ``model``), gets the same
fine-tuning (the recipe's optimizer and data, seed, and each number of steps in
``--steps``: one complete run, with its own lr schedule, per budget), and is measured the
same way: top-1 before and after fine-tuning on the full evaluation split, GMACs (fvcore),
parameters, and images/s of the models of the longest budget timed side by side,
interleaved, in this one process (speed-up = median of per-repeat ratios to the unpatched
model). Budgets are EViT's cost at each keep rate: token methods run at EViT's layers and
token counts, DynamicViT at the keep rate whose MACs match, width pruning to EViT's MACs.

    python benchmarks/compare.py                                   # the embedded default, 150 steps
    python benchmarks/compare.py --steps 150 600 1800 --methods unpatched evit tome width-pruning
    python benchmarks/compare.py --recipe recipes/deit_s.yaml --set data.root=/data/imagenet --steps 2000

Each run is kept in ``<runs>/<method>_<keep>/steps_<n>/`` with its result; a second
call with the same settings reuses every finished run and trains only the missing ones,
so a crash or a stop loses one run, not the table (a folder holding the results of other
settings is refused). Writes ``<out>.md`` (the table: top-1 after each budget, and from
which budget each method is within 0.5 points of the unpatched model fine-tuned alike),
``<out>.json`` and ``<out>.png`` (top-1 against the budget, one panel per MAC budget).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from evit_patch import apply_evit, count_macs
from evit_patch.core.model_info import example_images
from evit_patch.cost import largest_within
from evit_patch.dynamicvit import apply_dynamicvit, dynamicvit_state
from evit_patch.extras import require
from evit_patch.tools.evaluate import read_run_recipe
from evit_patch.tools.results import write_results
from evit_patch.train import distributed
from evit_patch.train.assembly import prepare_model, rebuild
from evit_patch.train.data import build_dataset
from evit_patch.train.loaders import eval_loader, train_loader
from evit_patch.train.loop import run_training
from evit_patch.train.methods import METHODS
from evit_patch.train.metrics import accuracy
from evit_patch.train.model_source import build_model
from evit_patch.train.recipe import Recipe, RecipeError, load_recipe, reduces_tokens
from evit_patch.tuning.timing import interleaved_images_per_second

ROOT = Path(__file__).resolve().parent.parent
WITHIN = 0.5  # points of top-1: "as accurate as the unpatched model fine-tuned alike"

COMPARISON_SETTINGS = {"dynamicvit": ["dynamicvit.freeze_epochs=0"]}  # a short budget: no frozen backbone
LABELS = {"unpatched": "unpatched (same fine-tuning)", "dynamicvit": "DynamicViT (learned predictors)",
          "width-pruning": "width pruning (torch-pruning)"}  # the comparison's wording of the registry's labels
ORACLE_OWN = "own attention at eval"  # the oracle-guided model's second row: the oracle switched off


def label_of(method: str) -> str:
    return LABELS.get(method, METHODS[method].label)


@dataclass
class Row:
    """One method at one MAC budget, after each fine-tuning budget."""

    method: str
    family: str  # the method's label without its budget
    keep_rate: Optional[float]  # EViT's keep rate whose MACs are the budget
    setting: str  # what the method runs with to meet it
    macs: float
    parameters: int
    top1_before: Optional[float]
    top1_after: dict[int, float] = field(default_factory=dict)  # by fine-tuning steps
    minutes: dict[int, float] = field(default_factory=dict)
    images_per_second: list[float] = field(default_factory=list)
    speedup: Optional[float] = None

    @property
    def label(self) -> str:
        return self.family if self.keep_rate is None else f"{self.family}, keep {self.keep_rate}"


def run_folder(args: argparse.Namespace, method: str, keep_rate: Optional[float]) -> Path:
    tag = method if keep_rate is None else f"{method}_{keep_rate}"
    return (args.runs or args.out.parent / f"{args.out.name}_runs") / tag


def fail(message: str) -> None:
    """A bad argument or run folder: one line on stderr, exit status 2, nothing written."""
    print(f"compare.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def epochs_for(steps: int, steps_per_epoch: int) -> int:
    """Whole epochs of equal length that make exactly ``steps`` (a budget longer than an
    epoch runs several, each a fresh shuffle of the data)."""
    epochs = math.ceil(steps / steps_per_epoch)
    if steps % epochs:
        fits = sorted({epochs * (steps // epochs), epochs * (steps // epochs + 1)})
        fail(f"--steps {steps} does not split into {epochs} equal epochs of at most "
             f"{steps_per_epoch} steps; use {' or '.join(map(str, fits))}")
    return epochs


def method_recipe(args: argparse.Namespace, method: str, keep_rate: Optional[float], steps: int) -> Recipe:
    overrides = [*METHODS[method].selection, *COMPARISON_SETTINGS.get(method, [])]
    budget = [] if keep_rate is None else [f"reduction.keep_rate={keep_rate}"]
    if method == "dynamicvit":  # stages where EViT reorganizes, keep rate at EViT's cost (below)
        budget.append(f"dynamicvit.layers={json.dumps(load_recipe(args.recipe, args.overrides).reduction.layers)}")
    recipe = load_recipe(args.recipe, [*args.overrides, *overrides, *budget])
    epochs = epochs_for(steps, args.steps_per_epoch)
    recipe.train.epochs = epochs
    recipe.train.max_steps_per_epoch = steps // epochs
    recipe.train.output_dir = str(run_folder(args, method, keep_rate) / f"steps_{steps}")
    if recipe.dynamicvit.enabled:
        recipe.dynamicvit.keep_rate = dynamicvit_ratio_for(recipe, evit_macs(recipe))
    return recipe


def evit_macs(recipe: Recipe) -> float:
    """The budget: the recipe's model with EViT at its layers and keep rate."""
    return count_macs(apply_evit(build_model(recipe.model), recipe.reduction.layers, recipe.reduction.keep_rate))


def dynamicvit_ratio_for(recipe: Recipe, target_macs: float) -> float:
    """The largest DynamicViT keep rate whose inference costs at most ``target_macs``.

    Its predictors sit before their blocks, so at EViT's rate it prunes a block earlier
    and costs less; bisection on the exact count matches the budget instead."""
    model = apply_dynamicvit(build_model(recipe.model), recipe.dynamicvit.layers, 1.0).eval()
    state = dynamicvit_state(model)

    def macs_at(ratio: float) -> float:
        state.keep_rate = ratio
        return count_macs(model)

    return round(largest_within(macs_at, target_macs, 0.01, 1.0, 1e-3), 3)


def method_setting(recipe: Recipe) -> str:
    """What a method runs with: keep rate, DynamicViT's keep rate, or pruned widths."""
    if recipe.structural.enabled:
        shape = recipe.structural.shape
        return f"heads {shape.heads[0]}, MLP {shape.mlp_hidden[0]} per block"
    if recipe.dynamicvit.enabled:
        return f"keep rate {recipe.dynamicvit.keep_rate}"
    return f"keep {recipe.reduction.keep_rate}" if reduces_tokens(recipe) else "all tokens, full width"


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def cached(path: Path, settings: dict[str, Any], compute: Callable[[], Any]) -> Any:
    """``compute()``'s JSON result, kept at ``path`` with the settings that produced it,
    so a rerun with the same settings reuses it instead of training again."""
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved["settings"] != settings:
            differing = ", ".join(key for key in settings if saved["settings"].get(key) != settings[key])
            fail(f"{path} holds a result of other settings (differing: {differing}); pass another --out "
                 f"or --runs, or delete {path.parent}")
        return saved["result"]
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps({"settings": settings, "result": result}, indent=2))
    partial.replace(path)  # whole or absent: a crash while writing loses this run only
    return result


def as_model_pair(model: nn.Module, family: str) -> dict[str, nn.Module]:
    """The rows a fine-tuned model gives: one, or for the oracle-guided method, the oracle
    at eval and a copy with it switched off (the model's own attention)."""
    reducer = getattr(getattr(model, "evit_state", None), "reducer", None)
    if not hasattr(reducer, "at_eval"):
        return {family: model}
    reducer.at_eval = True
    own = copy.deepcopy(model)
    own.evit_state.reducer.at_eval = False
    return {f"{family}, oracle at eval": model, f"{family}, {ORACLE_OWN}": own}


def describe(args: argparse.Namespace, method: str, keep_rate: Optional[float], loader,
             runtime: distributed.Runtime) -> list[dict[str, Any]]:
    """The method's rows before fine-tuning: setting, GMACs, parameters, top-1."""
    recipe = method_recipe(args, method, keep_rate, args.steps[0])
    rows = []
    for family, model in as_model_pair(prepare_model(recipe).eval(), label_of(method)).items():
        macs = count_macs(model)
        parameters = parameter_count(model)
        if family.endswith("oracle at eval"):  # its MACs count the oracle's forward; its weights are not the model's
            parameters += parameter_count(model.evit_state.reducer.oracle)
        meaningful = METHODS[method].meaningful_untrained and not family.endswith(ORACLE_OWN)
        rows.append(asdict(Row(method, family, keep_rate, method_setting(recipe), macs, parameters,
                               accuracy(model, loader, runtime)["top1"] if meaningful else None)))
    return rows


def fine_tune(args: argparse.Namespace, method: str, keep_rate: Optional[float], steps: int, loader,
              runtime: distributed.Runtime) -> dict[str, Any]:
    """One complete fine-tuning run of ``steps``; top-1 of each of its rows and its minutes."""
    recipe = method_recipe(args, method, keep_rate, steps)
    started = time.perf_counter()
    _, model = run_training(recipe, None, runtime, show_progress=args.progress, overwrite=True)  # its own folder
    minutes = (time.perf_counter() - started) / 60
    return {"top1": {family: accuracy(m, loader, runtime)["top1"]
                     for family, m in as_model_pair(model.eval(), label_of(method)).items()},
            "minutes": minutes}


def evaluate_method(args: argparse.Namespace, method: str, keep_rate: Optional[float],
                    runtime: distributed.Runtime) -> list[Row]:
    """One method at one MAC budget after every fine-tuning budget, reusing finished runs."""
    folder = run_folder(args, method, keep_rate)
    settings = {"recipe": args.recipe.read_text(), "overrides": args.overrides, "method": method, "keep_rate": keep_rate}
    recipe = method_recipe(args, method, keep_rate, args.steps[0])
    loader = eval_loader(build_dataset(recipe.data, build_model(recipe.model), training=False), recipe, runtime)
    rows = [Row(**row) for row in cached(folder / "before.json", settings,
                                         lambda: describe(args, method, keep_rate, loader, runtime))]
    for steps in args.steps:
        result = cached(folder / f"steps_{steps}" / "result.json", {**settings, "steps": steps},
                        lambda: fine_tune(args, method, keep_rate, steps, loader, runtime))
        for row in rows:
            row.top1_after[steps] = result["top1"][row.family]
            row.minutes[steps] = result["minutes"]
        print(json.dumps({"method": rows[0].label, "steps": steps, "top1_before": rows[0].top1_before,
                          "top1_after": rows[0].top1_after[steps], "minutes": round(result["minutes"], 2)}), flush=True)
    return rows


def fine_tuned_models(args: argparse.Namespace, plan: list[tuple[str, Optional[float]]]) -> dict[str, nn.Module]:
    """Every method's model after the longest budget, rebuilt from its run folder."""
    models: dict[str, nn.Module] = {}
    for method, keep_rate in plan:
        folder = run_folder(args, method, keep_rate) / f"steps_{max(args.steps)}"
        model = rebuild(read_run_recipe(folder / "recipe.yaml"), folder / "model.safetensors")
        suffix = "" if keep_rate is None else f", keep {keep_rate}"
        models.update({family + suffix: m for family, m in as_model_pair(model, label_of(method)).items()})
    return models


def time_side_by_side(rows: list[Row], models: dict[str, nn.Module], recipe: Recipe, repeats: int) -> None:
    """Images/s of every fine-tuned model, interleaved; speed-up against the unpatched one."""
    images = example_images(next(iter(models.values())), recipe.train.benchmark_batch_size, seed=0)
    timings = interleaved_images_per_second(models, images, repeats)
    base = timings[rows[0].label]
    for row in rows:
        row.images_per_second = timings[row.label]
        row.speedup = statistics.median(t / b for t, b in zip(row.images_per_second, base))


def within_from(row: Row, reference: Row) -> Optional[int]:
    """The first budget from which ``row`` stays within WITHIN points of the reference
    fine-tuned alike (None: not at the longest budget)."""
    first = None
    for steps in sorted(row.top1_after):
        close = row.top1_after[steps] >= reference.top1_after[steps] - WITHIN
        first = (first or steps) if close else None
    return first


def markdown(rows: list[Row], setup: dict) -> str:
    steps = setup["steps"]
    lines = [
        f"{setup['recipe']}: every method fine-tuned from the same base for {', '.join(map(str, steps))} steps "
        f"of batch {setup['batch_size']} (one complete run per budget), top-1 on all {setup['eval_images']} "
        f"evaluation images; images/s of the {max(steps)}-step models at batch {setup['benchmark_batch_size']} on "
        f"{setup['device']} ({setup['threads']} threads), median of {setup['repeats']} interleaved repeats; "
        f"speed-up = median of per-repeat ratios to the unpatched model. \"Within {WITHIN} from\": the first budget "
        "from which the method stays within "
        f"{WITHIN} points of the unpatched model fine-tuned for as many steps.",
        "",
        "| method | budget: EViT's MACs at keep | runs with | GMACs | params (M) | top-1 before FT | "
        + " | ".join(f"after {n}" for n in steps) + f" | within {WITHIN} from | images/s | speed-up |",
        "|---|---|---|---|---|---|" + "---|" * len(steps) + "---|---|---|",
    ]
    reference = rows[0]
    for row in rows:
        before = f"{row.top1_before:.2f}" if row.top1_before is not None else "—"
        keep = f"{row.keep_rate}" if row.keep_rate is not None else "—"
        after = " | ".join(f"{row.top1_after[n]:.2f}" for n in steps)
        first = "—" if row is reference else (f"{within_from(row, reference)} steps" if within_from(row, reference)
                                              else f"not by {max(steps)}")
        speed = (f"{statistics.median(row.images_per_second):.0f} | {row.speedup:.2f}x" if row.speedup is not None
                 else "— | —")
        lines.append(f"| {row.family} | {keep} | {row.setting} | {row.macs / 1e9:.4f} | {row.parameters / 1e6:.3f} | "
                     f"{before} | {after} | {first} | {speed} |")
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> None:
    """Top-1 against the fine-tuning budget, one panel per MAC budget (keep rate), the
    unpatched model in each; budget 0 is the model before fine-tuning."""
    matplotlib = require("matplotlib", "plot")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keep_rates = sorted({row.keep_rate for row in rows if row.keep_rate is not None}, reverse=True)
    figure, axes = plt.subplots(1, len(keep_rates), figsize=(6 * len(keep_rates), 4.5), sharey=True, squeeze=False)
    for axis, keep_rate in zip(axes[0], keep_rates):
        for row in (r for r in rows if r.keep_rate in (None, keep_rate)):
            points = ([(0, row.top1_before)] if row.top1_before is not None else []) + sorted(row.top1_after.items())
            axis.plot([s for s, _ in points], [t for _, t in points], marker="o", label=row.family,
                      linestyle="--" if row.keep_rate is None else "-", color="black" if row.keep_rate is None else None)
        axis.set_xscale("symlog", linthresh=min(rows[0].top1_after))
        axis.set_title(f"budget: EViT's MACs at keep {keep_rate}")
        axis.set_xlabel("fine-tuning steps (0: before fine-tuning)")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-1 (%)")
    axes[0][-1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "fashion_mnist.yaml",
                        help="base recipe: model, data, optimizer and EViT layers of every method")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.SUB=VALUE")
    parser.add_argument("--keep-rates", type=float, nargs="+", default=[0.7, 0.5])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, nargs="+", default=[150],
                        help="fine-tuning budgets in steps: one complete run of each for every method")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--progress", action="store_true", help="show a progress bar per run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "compare_fashion_mnist")
    parser.add_argument("--runs", type=Path, help="folder of the runs (default: <out>_runs); comparisons that share "
                        "it reuse each other's finished runs, such as the unpatched model's")
    args = parser.parse_args()
    for name, values in (("--steps", args.steps), ("--repeats", [args.repeats])):
        if min(values) < 1:
            parser.error(f"{name}: must be at least 1, got {min(values)}")
    args.steps = sorted(set(args.steps))
    runtime = distributed.Runtime(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        recipe = load_recipe(args.recipe, [*args.overrides, "reduction.enabled=false"])
    except RecipeError as error:
        fail(str(error))
    args.steps_per_epoch = len(train_loader(build_dataset(recipe.data, build_model(recipe.model), training=True),
                                            recipe, runtime, 0))
    for steps in args.steps:
        epochs_for(steps, args.steps_per_epoch)  # every budget checked before the first run

    plan = [("unpatched", None)] + [(m, k) for k in args.keep_rates for m in args.methods if m != "unpatched"]
    rows = [row for method, keep_rate in plan for row in evaluate_method(args, method, keep_rate, runtime)]
    time_side_by_side(rows, fine_tuned_models(args, plan), recipe, args.repeats)
    setup = {"recipe": str(args.recipe.relative_to(ROOT) if args.recipe.is_relative_to(ROOT) else args.recipe),
             "overrides": args.overrides, "steps": args.steps, "batch_size": recipe.train.batch_size,
             "eval_images": len(build_dataset(recipe.data, build_model(recipe.model), training=False)),
             "benchmark_batch_size": recipe.train.benchmark_batch_size, "device": runtime.device.type,
             "threads": torch.get_num_threads(), "repeats": args.repeats, "torch": torch.__version__}
    table = markdown(rows, setup)
    print(table)
    write_results(args.out, table, {"setup": setup, "rows": [asdict(r) for r in rows]})
    plot(rows, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()

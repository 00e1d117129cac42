"""Speed of token methods on timm models against the unpatched model, side by side.

Every variant is timed in the same process, interleaved repeat by repeat in rotating
order, so drift of the machine (clock, other load) hits all of them alike. The report
gives the median images/s of each variant and the median of its per-repeat ratios to
the unpatched model, next to the MAC ratio that bounds the speed-up. Inference times a
forward pass in eval mode; ``--train`` times a training step (forward, cross-entropy,
backward, AdamW step) in train mode.

    python benchmarks/throughput.py --models deit_small_patch16_224 --batch-sizes 32 1 \\
        --keep-rates 1.0 0.7 0.5 --repeats 15 --out benchmarks/results/deit_s_cpu
    python benchmarks/throughput.py --train --batch-sizes 32 --keep-rates 0.7 --methods evit evit-no-fusion
    python benchmarks/throughput.py --source transformers --models vit --batch-sizes 32 --keep-rates 1.0 0.7 \
        --model-kwargs '{"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6,
                         "intermediate_size": 1536, "image_size": 224, "patch_size": 16}' \
        --out benchmarks/results/hf_vit_s_cpu

With ``--source transformers`` a model is a transformers model type (``vit``, ``deit``,
``dinov2``, ``dinov2_with_registers``) and ``--model-kwargs`` its config (the example is
ViT-S/16 at 224 px, DeiT-S's shape), built as an image classifier with random weights.

Methods are the registry's (``evit``, ``evit-no-fusion``, ``random``, ``tome``,
``dynamicvit``, ``width-pruning``), each at every keep rate (DynamicViT: that keep
ratio; width pruning: EViT's MACs at that keep rate). Writes ``<out>.json``, ``<out>.md``
and ``<out>.png`` (speed-up against keep rate).

``--bound`` adds, per keep rate, the same token counts as EViT reached by cutting the
sequence (no scores, no top-k, no gather, no fused sum): what any method at these counts
could gain on this machine, so the cost of EViT's own work shows as the gap to it.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import timm
import torch
import torch.nn.functional as F
from torch import nn

import evit_patch
from evit_patch.core.model_info import example_images
from evit_patch.core.reduction import LayerContext, Reduction, TokenMap, TokenReducer, identity_reduction
from evit_patch.core.scores import AttentionTensors
from evit_patch.extras import require
from evit_patch.reducers.evit import kept_token_count
from evit_patch.tools.results import write_results
from evit_patch.train.checkpoint import load_weights
from evit_patch.train.methods import METHODS
from evit_patch.train.recipe import apply_overrides, recipe_from_dict
from evit_patch.train.transformers_source import build_transformers_model, class_count, logits_of
from evit_patch.tuning.timing import autocast_to, interleaved_images_per_second, interleaved_rates, positive_int, timed_call

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
TIMED_METHODS = [name for name in METHODS if name not in ("unpatched", "oracle")]  # an oracle needs trained weights


@dataclass
class Variant:
    """One model setting measured at one batch size."""

    name: str
    keep_rate: float
    batch_size: int
    macs: float
    images_per_second: list[float] = field(default_factory=list)
    peak_memory_mb: Optional[float] = None
    graph_breaks: Optional[int] = None  # compiled variants: torch._dynamo's count


class TokenCountBound(TokenReducer):
    """EViT's token counts (kept tokens plus the fused one) by keeping the first tokens
    as they lie: the cheapest possible way to reach those counts."""

    name = "token-count bound"

    def reduce(self, x: torch.Tensor, attention: AttentionTensors, context: LayerContext) -> Reduction:
        num_image = x.shape[1] - context.num_prefix_tokens
        keep = kept_token_count(num_image, context.keep_rate)
        if keep >= num_image:
            return identity_reduction(x, context.num_prefix_tokens)
        kept_index = torch.arange(keep + 1, device=x.device).expand(x.shape[0], -1)
        return Reduction(x[:, :context.num_prefix_tokens + keep + 1], TokenMap.selection(kept_index, num_image, False))


def with_method(base: nn.Module, model_name: str, model_kwargs: dict, method: str, keep_rate: float,
                layers: list[int], source: str = "timm") -> nn.Module:
    """A copy of ``base`` with a registry method at ``keep_rate`` on ``layers``."""
    values = {"model": {"name": model_name, "kwargs": model_kwargs, "source": source},
              "reduction": {"layers": layers, "keep_rate": keep_rate},
              "dynamicvit": {"layers": layers, "keep_rate": keep_rate}}
    recipe = recipe_from_dict(apply_overrides(values, list(METHODS[method].selection)))
    return METHODS[method].apply(copy.deepcopy(base), recipe, keep_rate, base)


def build_models(args: argparse.Namespace, model_name: str) -> dict[str, tuple[float, nn.Module]]:
    """The unpatched model and one copy per method and keep rate: ``name -> (keep rate, model)``."""
    torch.manual_seed(0)
    if args.source == "transformers":
        base = build_transformers_model(model_name, args.model_kwargs).eval()
    else:
        base = timm.create_model(model_name, **args.model_kwargs).eval()
    if args.checkpoint is not None:  # trained weights: a method whose work depends on them is timed as it runs
        load_weights(base, args.checkpoint)
    models = {"unpatched": (1.0, copy.deepcopy(base))}  # every variant a copy: same memory placement
    for method in args.methods:
        for rate in args.keep_rates:
            name = f"{method} {rate}" if len(args.methods) > 1 or method != "evit" else f"evit {rate}"
            models[name] = (rate, with_method(base, model_name, args.model_kwargs, method, rate, args.layers,
                                              args.source))
    if args.bound:
        for rate in args.keep_rates:
            bound = evit_patch.apply_token_reducer(copy.deepcopy(base), args.layers, rate, TokenCountBound())
            models[f"token-count bound {rate}"] = (rate, bound)
    return {name: (rate, model.to(args.device)) for name, (rate, model) in models.items()}


def training_step(model: nn.Module, images: torch.Tensor, dtype: Optional[torch.dtype]) -> Callable[[], object]:
    """One AdamW step on a fixed batch, in train mode (fp16 without a scaler: a timing, not a run)."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    labels = torch.randint(0, class_count(model), (images.shape[0],), generator=torch.Generator().manual_seed(0))
    labels = labels.to(images.device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast_to(images.device, dtype):
            outputs = model(images)
        logits = logits_of(outputs[0] if isinstance(outputs, tuple) else outputs)
        F.cross_entropy(logits.float(), labels).backward()
        optimizer.step()

    return step


def peak_memory_mb(call: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak memory of one call on CUDA (None elsewhere)."""
    if device.type != "cuda":
        timed_call(call, device)
        return None
    torch.cuda.reset_peak_memory_stats(device)
    timed_call(call, device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def compiled_variants(models: dict[str, tuple[float, nn.Module]], args: argparse.Namespace,
                      images: torch.Tensor) -> dict[str, tuple[float, nn.Module, int]]:
    """Each model compiled (``--compile-mode``) with dynamo's count of its graph breaks, named
    ``compiled <name>`` beside the eager ones with ``--with-eager``, else in their place."""
    compiled = {}
    for name, (rate, model) in models.items():
        torch._dynamo.reset()
        with torch.inference_mode(not args.train):
            breaks = torch._dynamo.explain(model.train(args.train))(images).graph_break_count
        key = f"compiled {name}" if args.with_eager else name
        compiled[key] = (rate, torch.compile(model, mode=args.compile_mode), breaks)
    return compiled


def measure(args: argparse.Namespace, model_name: str, batch_size: int) -> list[Variant]:
    built = build_models(args, model_name)
    images = example_images(next(iter(built.values()))[1], batch_size, seed=0)
    dtype = DTYPES[args.dtype]
    models = {name: (rate, model, None) for name, (rate, model) in built.items()} if not args.compile or \
        args.with_eager else {}
    if args.compile:
        models |= compiled_variants(built, args, images)
    variants = {name: Variant(name, rate, batch_size, evit_patch.count_macs(built[name.removeprefix("compiled ")][1]),
                              graph_breaks=breaks) for name, (rate, _, breaks) in models.items()}
    compiled = {name: model for name, (_, model, _) in models.items()}
    if args.train:
        calls = {name: training_step(model, images, dtype) for name, model in compiled.items()}
        for name, call in calls.items():
            for _ in range(args.warmup):
                variants[name].peak_memory_mb = peak_memory_mb(call, images.device)
        rates = interleaved_rates(calls, batch_size, images.device, args.repeats, 0, args.calls_per_repeat)
    else:
        with torch.inference_mode():
            for name, model in compiled.items():
                model.eval()
                for _ in range(args.warmup):
                    variants[name].peak_memory_mb = peak_memory_mb(lambda: model(images), images.device)
        rates = interleaved_images_per_second(compiled, images, args.repeats, dtype, 0, args.calls_per_repeat)
    for name, values in rates.items():
        variants[name].images_per_second = values
    return list(variants.values())


def speedups(variant: Variant, base: Variant) -> list[float]:
    """Per-repeat ratios of images/s to the unpatched model (timed in the same repeat)."""
    return [v / b for v, b in zip(variant.images_per_second, base.images_per_second)]


def speedup(variant: Variant, base: Variant) -> float:
    return statistics.median(speedups(variant, base))


def quartiles(values: list[float]) -> str:
    """The middle half of the per-repeat ratios: how far one median can be trusted."""
    if len(values) < 4:
        return "n/a"
    low, _, high = statistics.quantiles(values, n=4)
    return f"{low:.2f}-{high:.2f}"


def markdown(results: dict[str, list[Variant]], setup: dict) -> str:
    mode = "training step (forward, backward, AdamW)" if setup["train"] else "inference"
    lines = [
        f"{setup['device']} ({setup['threads']} CPU threads), {mode}, {setup['dtype']}, compile={setup['compile']}, "
        f"layers {setup['layers']}, median of {setup['repeats']} interleaved repeats of "
        f"{setup['calls_per_repeat']} calls; speed-up = median of per-repeat ratios (quartiles beside it)",
        "",
        "| model | batch | variant | GMACs | MAC ratio | images/s | speed-up | quartiles | peak MB | graph breaks |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, variants in results.items():
        model_name = key.rsplit("@", 1)[0]
        base = variants[0]
        for variant in variants:
            memory = f"{variant.peak_memory_mb:.0f}" if variant.peak_memory_mb is not None else "n/a"
            breaks = "n/a" if variant.graph_breaks is None else variant.graph_breaks
            lines.append(
                f"| {model_name} | {variant.batch_size} | {variant.name} | {variant.macs / 1e9:.3f} | "
                f"{base.macs / variant.macs:.2f}x | {statistics.median(variant.images_per_second):.1f} | "
                f"{speedup(variant, base):.3f}x | {quartiles(speedups(variant, base))} | {memory} | {breaks} |"
            )
    return "\n".join(lines)


def plot(results: dict[str, list[Variant]], path: Path) -> None:
    matplotlib = require("matplotlib", "plot")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for key, variants in results.items():
        base = variants[0]
        methods = sorted({v.name.rsplit(" ", 1)[0] for v in variants[1:]})
        for method in methods:
            patched = sorted((v for v in variants[1:] if v.name.rsplit(" ", 1)[0] == method), key=lambda v: v.keep_rate)
            rates = [v.keep_rate for v in patched]
            line = axis.plot(rates, [speedup(v, base) for v in patched], marker="o", label=f"{key} {method}")[0]
            axis.plot(rates, [base.macs / v.macs for v in patched], linestyle="--", color=line.get_color(),
                      label=f"{key} {method} MAC ratio")
    axis.axhline(1.0, color="grey", linewidth=0.8)
    axis.set_xlabel("keep rate")
    axis.set_ylabel("speed-up over unpatched (images/s ratio)")
    axis.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["deit_small_patch16_224"])
    parser.add_argument("--model-kwargs", type=json.loads, default={},
                        help="timm.create_model keywords (--source transformers: the config), as JSON")
    parser.add_argument("--source", choices=["timm", "transformers"], default="timm",
                        help="where --models come from: timm names, or transformers model types")
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[32])
    parser.add_argument("--methods", nargs="+", default=["evit"], choices=TIMED_METHODS)
    parser.add_argument("--keep-rates", type=float, nargs="+", default=[1.0, 0.7, 0.5])
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 6, 9])
    parser.add_argument("--bound", action="store_true", help="add EViT's token counts reached by cutting the sequence")
    parser.add_argument("--train", action="store_true", help="time training steps instead of inference")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="autocast dtype")
    parser.add_argument("--compile", action="store_true", help="torch.compile every variant")
    parser.add_argument("--compile-mode", default=None, choices=[None, "default", "reduce-overhead", "max-autotune"],
                        help="torch.compile's mode (reduce-overhead: CUDA graphs)")
    parser.add_argument("--with-eager", action="store_true",
                        help="with --compile: time the eager variants beside the compiled ones")
    parser.add_argument("--repeats", type=positive_int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--calls-per-repeat", type=positive_int, default=1, help="calls timed back to back in one repeat")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="weights of the model (default: random), e.g. recipes/checkpoints/fashion_mnist_vit.safetensors")
    parser.add_argument("--out", type=Path, default=None, help="write <out>.json, <out>.md and <out>.png")
    args = parser.parse_args(argv)
    if (args.with_eager or args.compile_mode) and not args.compile:
        parser.error("--with-eager and --compile-mode go with --compile")
    return args


def main(argv: Optional[list[str]] = None) -> dict[str, list[Variant]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {
        f"{name}@{batch}": measure(args, name, batch) for name in args.models for batch in args.batch_sizes
    }
    setup = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "threads": torch.get_num_threads(), "train": args.train, "dtype": args.dtype, "compile": args.compile,
        "layers": args.layers, "methods": args.methods, "bound": args.bound, "repeats": args.repeats,
        "calls_per_repeat": args.calls_per_repeat, "torch": torch.__version__, "timm": timm.__version__,
        "source": args.source, "model_kwargs": args.model_kwargs, "compile_mode": args.compile_mode,
        "with_eager": args.with_eager,
    }
    table = markdown(results, setup)
    print(table)
    if args.out:
        write_results(args.out, table,
                      {"setup": setup, "results": {k: [asdict(v) for v in vs] for k, vs in results.items()}})
        plot(results, args.out.with_suffix(".png"))
    return results


if __name__ == "__main__":
    main()

"""Images/s of EViT-patched timm models against the unpatched model, side by side.

Every variant is timed in the same process, interleaved repeat by repeat in rotating
order, so drift of the machine (clock, other load) hits all of them alike. The report
gives the median images/s of each variant and the median of its per-repeat ratios to
the unpatched model, next to the MAC ratio that bounds the speed-up.

    python benchmarks/throughput.py --model deit_small_patch16_224 --batch-sizes 32 1 \\
        --keep-rates 1.0 0.7 0.5 --repeats 15 --out benchmarks/results/deit_s_cpu

writes ``<out>.json``, ``<out>.md`` and ``<out>.png`` (images/s against keep rate).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import timm
import torch

import evit_patch
from evit_patch.core.model_info import example_images
from evit_patch.tools.timing import interleaved_images_per_second, timed_forward

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Variant:
    """One model setting measured at one batch size."""

    name: str
    keep_rate: float
    batch_size: int
    macs: float
    images_per_second: list[float] = field(default_factory=list)
    peak_memory_mb: float | None = None


def build_models(args: argparse.Namespace, model_name: str) -> dict[str, tuple[float, torch.nn.Module]]:
    """The unpatched model and one patched copy per keep rate: ``name -> (keep rate, model)``."""
    torch.manual_seed(0)
    base = timm.create_model(model_name).eval().to(args.device)
    models = {"unpatched": (1.0, copy.deepcopy(base))}  # every variant a copy: same memory placement
    for rate in args.keep_rates:
        patched = evit_patch.apply_evit(copy.deepcopy(base), args.layers, rate, fuse=not args.no_fuse)
        models[f"evit {rate}"] = (rate, patched)
    if args.compile:
        models = {name: (rate, torch.compile(model)) for name, (rate, model) in models.items()}
    return models


def measure(args: argparse.Namespace, model_name: str, batch_size: int) -> list[Variant]:
    models = build_models(args, model_name)
    dtype = DTYPES[args.dtype]
    variants = {}
    for name, (rate, model) in models.items():
        inner = getattr(model, "_orig_mod", model)
        variants[name] = Variant(name, rate, batch_size, evit_patch.count_macs(inner))
    images = example_images(next(iter(models.values()))[1], batch_size, seed=0)
    with torch.inference_mode():
        for name, (_, model) in models.items():
            if images.is_cuda:
                torch.cuda.reset_peak_memory_stats()
            for _ in range(args.warmup):
                timed_forward(model, images, dtype)
            if images.is_cuda:
                variants[name].peak_memory_mb = torch.cuda.max_memory_allocated() / 2**20
    timings = interleaved_images_per_second({name: model for name, (_, model) in models.items()}, images,
                                            args.repeats, dtype, warmup=0)
    for name, values in timings.items():
        variants[name].images_per_second = values
    return list(variants.values())


def speedup(variant: Variant, base: Variant) -> float:
    return statistics.median(v / b for v, b in zip(variant.images_per_second, base.images_per_second))


def markdown(results: dict[str, list[Variant]], setup: dict) -> str:
    lines = [
        f"{setup['device']} ({setup['threads']} CPU threads), {setup['dtype']}, compile={setup['compile']}, "
        f"layers {setup['layers']}, fuse {setup['fuse']}, median of {setup['repeats']} interleaved repeats",
        "",
        "| model | batch | variant | GMACs | MAC ratio | images/s | speed-up | peak MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, variants in results.items():
        model_name = key.rsplit("@", 1)[0]
        base = variants[0]
        for variant in variants:
            memory = f"{variant.peak_memory_mb:.0f}" if variant.peak_memory_mb is not None else "n/a"
            lines.append(
                f"| {model_name} | {variant.batch_size} | {variant.name} | {variant.macs / 1e9:.2f} | "
                f"{base.macs / variant.macs:.2f}x | {statistics.median(variant.images_per_second):.1f} | "
                f"{speedup(variant, base):.3f}x | {memory} |"
            )
    return "\n".join(lines)


def plot(results: dict[str, list[Variant]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for key, variants in results.items():
        base = variants[0]
        patched = sorted(variants[1:], key=lambda v: v.keep_rate)
        rates = [v.keep_rate for v in patched]
        line = axis.plot(rates, [speedup(v, base) for v in patched], marker="o", label=f"{key} measured")[0]
        axis.plot(rates, [base.macs / v.macs for v in patched], linestyle="--", color=line.get_color(),
                  label=f"{key} MAC ratio")
    axis.axhline(1.0, color="grey", linewidth=0.8)
    axis.set_xlabel("keep rate")
    axis.set_ylabel("speed-up over unpatched (images/s ratio)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["deit_small_patch16_224"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32])
    parser.add_argument("--keep-rates", type=float, nargs="+", default=[1.0, 0.7, 0.5])
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 6, 9])
    parser.add_argument("--no-fuse", action="store_true", help="EViT without fusion")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="autocast dtype")
    parser.add_argument("--compile", action="store_true", help="torch.compile every variant")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="write <out>.json, <out>.md and <out>.png")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {
        f"{name}@{batch}": measure(args, name, batch) for name in args.models for batch in args.batch_sizes
    }
    setup = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "threads": torch.get_num_threads(), "dtype": args.dtype, "compile": args.compile,
        "layers": args.layers, "fuse": not args.no_fuse, "repeats": args.repeats,
        "torch": torch.__version__, "timm": timm.__version__,
    }
    table = markdown(results, setup)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(table + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(
            {"setup": setup, "results": {k: [asdict(v) for v in vs] for k, vs in results.items()}}, indent=2))
        plot(results, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()

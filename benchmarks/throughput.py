"""Images/s of EViT-patched models against the unpatched model, side by side.

Every variant is timed in the same process, interleaved repeat by repeat (in rotating
order), so drift of
the machine (clock, other load) hits all of them alike; the report gives the median
images/s of each and the median of the per-repeat ratios to the unpatched model, next
to the MAC ratio that bounds the speed-up.

    python benchmarks/throughput.py --model deit_small_patch16_224 --batch-size 32 \\
        --keep-rates 1.0 0.7 0.5 --repeats 15 --json results/throughput.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import asdict, dataclass

import timm
import torch

import evit_patch


@dataclass
class Variant:
    name: str
    keep_rate: float | None
    macs: float
    images_per_second: list[float]


def time_forward(model: torch.nn.Module, images: torch.Tensor) -> float:
    """Seconds of one forward pass (synchronized on CUDA)."""
    if images.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    model(images)
    if images.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(args: argparse.Namespace) -> tuple[list[Variant], dict]:
    torch.manual_seed(0)
    base = timm.create_model(args.model).eval().to(args.device)
    shape = evit_patch.inspection.native_input_shape(base)
    images = torch.randn(args.batch_size, *shape, device=args.device)
    models = {"unpatched": copy.deepcopy(base)}  # every variant a copy: same memory placement
    for rate in args.keep_rates:
        models[f"keep {rate}"] = evit_patch.apply_evit(copy.deepcopy(base), args.layers, rate, fuse=not args.no_fuse)
    variants = {
        name: Variant(name, getattr(m, "evit_state", None) and m.evit_state.keep_rates[0], evit_patch.count_macs(m), [])
        for name, m in models.items()
    }
    with torch.inference_mode():
        for model in models.values():
            for _ in range(args.warmup):
                model(images)
        names = list(models)
        for repeat in range(args.repeats):
            shift = repeat % len(names)  # rotate the order so no variant always follows the same one
            for name in names[shift:] + names[:shift]:
                variants[name].images_per_second.append(args.batch_size / time_forward(models[name], images))
    setup = {
        "model": args.model, "batch_size": args.batch_size, "layers": args.layers, "fuse": not args.no_fuse,
        "device": str(images.device), "threads": torch.get_num_threads(), "repeats": args.repeats,
        "torch": torch.__version__, "timm": timm.__version__,
    }
    return list(variants.values()), setup


def report(variants: list[Variant], setup: dict) -> str:
    base = variants[0]
    lines = [
        f"{setup['model']}, batch {setup['batch_size']}, {setup['device']} ({setup['threads']} threads), "
        f"layers {setup['layers']}, fuse {setup['fuse']}, median of {setup['repeats']} interleaved repeats",
        "",
        "| variant | GMACs | MAC ratio | images/s | speed-up (median of paired ratios) |",
        "|---|---|---|---|---|",
    ]
    for variant in variants:
        paired = [v / b for v, b in zip(variant.images_per_second, base.images_per_second)]
        lines.append(
            f"| {variant.name} | {variant.macs / 1e9:.2f} | {base.macs / variant.macs:.2f}x | "
            f"{statistics.median(variant.images_per_second):.1f} | {statistics.median(paired):.3f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--keep-rates", type=float, nargs="+", default=[1.0, 0.7])
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 6, 9])
    parser.add_argument("--no-fuse", action="store_true", help="EViT without fusion")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="also write the raw measurements here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants, setup = measure(args)
    print(report(variants, setup))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"setup": setup, "variants": [asdict(v) for v in variants]}, handle, indent=2)


if __name__ == "__main__":
    main()

"""A bounded soak of one patched model served from several threads at once.

For each method, the same few hundred calls of mixed batch sizes (images drawn per call)
are made one after another (the reference), then by ``--threads`` threads of one pool at
once, twice. Reported per method: calls/s and images/s of the sequential and of the
concurrent runs, resident memory (VmRSS) before the first concurrent run and after each
(growth between the two concurrent runs would be a leak), and the count of calls that
raised or whose output differs from the reference bitwise (both must be 0). Intra-op
threads are 1 by default (``--intra-op-threads``): the pool's threads are the parallelism,
and one call is then bitwise the same computation in any thread.

    python benchmarks/soak.py --threads 4 --calls 300 --out benchmarks/results/soak_cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import timm
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks are scripts, not a package
from throughput import TIMED_METHODS, with_method  # noqa: E402

from evit_patch.tools.results import write_results  # noqa: E402
from evit_patch.tuning.timing import positive_int  # noqa: E402

SMALL_VIT = {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 6, "num_heads": 4}


@dataclass
class SoakResult:
    """One method's soak."""

    method: str
    calls: int
    images: int
    sequential_calls_per_second: float
    concurrent_calls_per_second: list[float]
    rss_mb_before: float
    rss_mb_after: list[float]
    errors: int
    mismatches: int


def resident_mb() -> float:
    """This process's resident memory (Linux ``/proc``), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def call_plan(calls: int, max_batch: int, channels: int, size: int) -> list[torch.Tensor]:
    """``calls`` image batches of sizes cycling through 1..max_batch, each its own draw."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(1 + call % max_batch, channels, size, size, generator=generator) for call in range(calls)]


def soak(model: nn.Module, plan: list[torch.Tensor], threads: int, rounds: int, method: str) -> SoakResult:
    with torch.inference_mode():
        start = time.perf_counter()
        reference = [model(images) for images in plan]
        sequential = len(plan) / (time.perf_counter() - start)
        errors = mismatches = 0
        rates, after = [], []
        before = resident_mb()

        def call(index: int) -> bool:
            with torch.inference_mode():
                return torch.equal(model(plan[index]), reference[index])

        with ThreadPoolExecutor(threads) as pool:
            for _ in range(rounds):
                start = time.perf_counter()
                futures = [pool.submit(call, index) for index in range(len(plan))]
                for future in futures:
                    try:
                        mismatches += not future.result()
                    except Exception:  # counted: a soak reports failures, it does not stop at the first
                        errors += 1
                rates.append(len(plan) / (time.perf_counter() - start))
                after.append(resident_mb())
    return SoakResult(method, len(plan), sum(images.shape[0] for images in plan), sequential, rates, before, after,
                      errors, mismatches)


def markdown(results: list[SoakResult], setup: dict) -> str:
    lines = [
        f"{setup['calls']} calls of batch 1..{setup['max_batch']} on {setup['model']} {json.dumps(setup['model_kwargs'])}, "
        f"{setup['threads']} threads x {setup['rounds']} rounds, {setup['intra_op_threads']} intra-op thread(s), "
        f"keep rate {setup['keep_rate']}, layers {setup['layers']}",
        "",
        "| method | sequential calls/s | concurrent calls/s (each round) | concurrent / sequential | RSS MiB before | "
        "RSS MiB after each round | errors | outputs not bitwise the reference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        rounds = ", ".join(f"{rate:.1f}" for rate in result.concurrent_calls_per_second)
        ratio = statistics.median(result.concurrent_calls_per_second) / result.sequential_calls_per_second
        memory = ", ".join(f"{rss:.0f}" for rss in result.rss_mb_after)
        lines.append(f"| {result.method} | {result.sequential_calls_per_second:.1f} | {rounds} | {ratio:.2f}x | "
                     f"{result.rss_mb_before:.0f} | {memory} | {result.errors} | {result.mismatches} |")
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--model-kwargs", type=json.loads, default=SMALL_VIT, help="timm.create_model's keyword arguments")
    parser.add_argument("--methods", nargs="+", default=[m for m in TIMED_METHODS if m != "width-pruning"],
                        choices=TIMED_METHODS)
    parser.add_argument("--keep-rate", type=float, default=0.7)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 3, 4])
    parser.add_argument("--threads", type=positive_int, default=4)
    parser.add_argument("--calls", type=positive_int, default=300)
    parser.add_argument("--max-batch", type=positive_int, default=8)
    parser.add_argument("--rounds", type=positive_int, default=2)
    parser.add_argument("--intra-op-threads", type=positive_int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write <out>.md and <out>.json")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> list[SoakResult]:
    args = parse_args(argv)
    torch.set_num_threads(args.intra_op_threads)
    torch.manual_seed(0)
    base = timm.create_model(args.model, **args.model_kwargs).eval()
    plan = call_plan(args.calls, args.max_batch, base.patch_embed.proj.in_channels, args.model_kwargs.get("img_size", 224))
    results = []
    for method in args.methods:
        model = with_method(base, args.model, args.model_kwargs, method, args.keep_rate, args.layers).eval()
        results.append(soak(model, plan, args.threads, args.rounds, method))
        del model
    setup = {"model": args.model, "model_kwargs": args.model_kwargs, "calls": args.calls, "max_batch": args.max_batch,
             "threads": args.threads, "rounds": args.rounds, "intra_op_threads": args.intra_op_threads,
             "keep_rate": args.keep_rate, "layers": args.layers, "torch": torch.__version__, "timm": timm.__version__}
    table = markdown(results, setup)
    print(table)
    if args.out:
        write_results(args.out, table, {"setup": setup, "results": [asdict(result) for result in results]})
    return results


if __name__ == "__main__":
    main()

"""Find the fastest token-reduction setting that keeps a model's answers, measured on your device
and images: every setting measured, the Pareto front, the chosen one and its recipe fragment.

    evit-tune deit_small_patch16_224 --pretrained --folder photos/ --batch-size 1 --out tune_deit
    evit-tune vit_tiny_patch16_224 --checkpoint recipes/checkpoints/fashion_mnist_vit.safetensors \\
        --model-arg img_size=28 ... --fashion-mnist --images 256 --target-speedup 1.5

Writes PREFIX.md, PREFIX.json, PREFIX.png (speed-up against agreement) and PREFIX.recipe.yaml.
Exit status 2, in one line and before anything is timed: numbers that make no sense, a folder
without images or with a file that is not one, a model that cannot be built or patched, a target
no setting can reach. A target that no measured setting meets is found after timing: the files
are written (the fastest setting measured in place of the chosen one), then one line names
the fastest found, exit status 2.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional, Sequence

import timm
import torch
import torch.nn.functional as F
from timm.data import get_img_extensions
from torch import Tensor, nn

from evit_patch.core.arguments import validated_keep_rates
from evit_patch.core.model_info import native_input_shape, transformer_blocks
from evit_patch.errors import CheckpointError
from evit_patch.reducers.registry import token_methods
from evit_patch.tools.file_faults import file_fault
from evit_patch.tools.tune_report import write_report
from evit_patch.tools.visualize import load_image, parse_model_args
from evit_patch.train.data import FashionMNIST
from evit_patch.train.messages import one_line
from evit_patch.train.model_source import build_model
from evit_patch.train.recipe import ModelConfig
from evit_patch.tuning.result import TargetNotMet, TuneResult
from evit_patch.tuning.search import check_numbers, tune
from evit_patch.tuning.space import KEEP_RATES, TUNED_METHODS, candidate_configs
from evit_patch.tuning.timing import Clock


def image_files(folder: Path, count: int) -> list[Path]:
    """The first ``count`` image files under ``folder`` (by path), which must hold some."""
    if not folder.is_dir():
        raise ValueError(f"--folder {str(folder)!r} is not a folder of images")
    files = sorted(path for path in folder.rglob("*") if path.is_file() and path.suffix.lower() in get_img_extensions())
    if not files:
        raise ValueError(f"--folder {str(folder)!r} holds no images ({', '.join(get_img_extensions())})")
    return files[:count]


def folder_images(files: Sequence[Path], model: nn.Module) -> Tensor:
    """The model's evaluation transform of each file; a file that is not an image is named."""
    tensors = []
    for path in files:
        try:
            tensors.append(load_image(path, model)[0])
        except OSError:
            raise ValueError(f"{str(path)!r} is not an image that can be read") from None
    return torch.stack(tensors)


def fashion_mnist(count: int, model: nn.Module) -> tuple[Tensor, Tensor]:
    """The first ``count`` Fashion-MNIST test images, resized to ``model``'s input and given as
    many channels as it takes (a 224-pixel RGB model gets the garments at 224 in grey), and their labels."""
    test = FashionMNIST("test")
    images = test.images[:count]
    channels, height, width = native_input_shape(model) or images.shape[1:]
    if tuple(images.shape[-2:]) != (height, width):
        images = F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False)
    return images.expand(-1, channels, -1, -1).contiguous(), test.labels[:count]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="timm model name (with --checkpoint FILE or --pretrained for its weights)")
    parser.add_argument("--checkpoint", type=Path, help="weights (.safetensors, a .pth state_dict or a timm train.py checkpoint)")
    parser.add_argument("--pretrained", action="store_true", help="timm's hub weights")
    parser.add_argument("--model-arg", action="append", default=[], help="create_model keyword, key=value")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--folder", type=Path, help="a folder of images (searched recursively; no labels needed)")
    source.add_argument("--fashion-mnist", action="store_true", help="the Fashion-MNIST test set (with its labels)")
    parser.add_argument("--images", type=int, default=256, help="how many images (half choose, half report)")
    parser.add_argument("--batch-size", type=int, default=64, help="the batch size speed is measured at")
    parser.add_argument("--device", default="cpu", help="where speed is measured (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--compile", action="store_true", help="time the models compiled with torch.compile")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--target-speedup", type=float, help="the most agreeing setting at least this fast")
    target.add_argument("--max-agreement-loss", type=float, help="the fastest setting losing at most this share of agreement")
    parser.add_argument("--time-budget", type=float, default=600.0, help="seconds of measuring (default 600)")
    parser.add_argument("--methods", nargs="+", default=list(TUNED_METHODS), choices=list(token_methods()),
                        metavar="METHOD", help=f"registered token methods to try (default: {' '.join(TUNED_METHODS)})")
    parser.add_argument("--keep-rates", type=float, nargs="+", default=list(KEEP_RATES), metavar="RATE",
                        help=f"keep rates to try at the paper's blocks (default: {' '.join(map(str, KEEP_RATES))})")
    parser.add_argument("--seed", type=int, default=0, help="the calibration split's draw")
    parser.add_argument("--out", type=Path, default=Path("tune"), help="prefix of the files written")
    return parser


def check_device(name: str) -> None:
    """A ValueError for a device torch does not know or this machine does not have."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device torch knows (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: this machine has no CUDA device")


def _model(args: argparse.Namespace) -> nn.Module:
    """The timm model with its weights, in eval mode."""
    if not timm.is_model(args.model):
        close = timm.list_models(f"*{args.model.split('.')[0]}*")[:3]
        raise ValueError(f"{args.model!r} is not a timm model name" + (f"; close: {close}" if close else ""))
    return build_model(ModelConfig(name=args.model, pretrained=args.pretrained,
                                   checkpoint=str(args.checkpoint) if args.checkpoint else None,
                                   kwargs=parse_model_args(args.model_arg))).eval()


def main(argv: Optional[Sequence[str]] = None, clock: Clock = time.perf_counter) -> None:
    """The command line; ``clock`` is what timing reads (a test injects one)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        check_numbers(args.images, args.target_speedup, args.max_agreement_loss, args.batch_size, args.time_budget, 0.5)
        check_device(args.device)
        validated_keep_rates(args.keep_rates, len(args.keep_rates))
        if not args.out.parent.is_dir():
            raise ValueError(f"--out {str(args.out)!r}: the folder {str(args.out.parent)!r} does not exist")
        files = image_files(args.folder, args.images) if args.folder else None
        model = _model(args)
        images, labels = fashion_mnist(args.images, model) if files is None else (folder_images(files, model), None)
        result = tune(model, images, labels, target_speedup=args.target_speedup, max_agreement_loss=args.max_agreement_loss,
                      batch_size=args.batch_size, device=args.device, compile=args.compile, time_budget_s=args.time_budget,
                      seed=args.seed, clock=clock,
                      candidates=candidate_configs(len(transformer_blocks(model)), args.methods, args.keep_rates))
    except TargetNotMet as error:  # after timing: what was measured is kept, then refused
        report(parser, error.result, args)
        parser.exit(2, f"error: {one_line(error)}\n")
    except (TypeError, ValueError, CheckpointError) as error:  # UnsupportedModelError, UnreachableTarget among them
        parser.exit(2, f"error: {one_line(error)}\n")
    except OSError as error:  # Fashion-MNIST files not found, a checkpoint that cannot be read
        parser.exit(2, f"error: {file_fault(error)}\n")
    report(parser, result, args)
    chosen = result.chosen
    print(f"chosen: {chosen.label}: {chosen.speed.speedup:.2f}x, held-out agreement {100 * chosen.held_out.agreement:.1f}%"
          + ("" if chosen.held_out.top1 is None else f", held-out top-1 {100 * chosen.held_out.top1:.1f}%"))


def report(parser: argparse.ArgumentParser, result: TuneResult, args: argparse.Namespace) -> None:
    """Write the result's files and say where, with the spread warning and what the budget left."""
    try:
        written = write_report(result, args.out, f"evit-tune {args.model}")
    except OSError as error:  # a full disk, a folder made read-only meanwhile
        parser.exit(1, f"error: {file_fault(error)}\n")
    for path in written:
        print(f"wrote {path}")
    if result.warning:
        print(result.warning)
    if result.out_of_time:
        print(f"the time budget ended the search: {len(result.left)} settings were left (--time-budget)")

if __name__ == "__main__":
    main()

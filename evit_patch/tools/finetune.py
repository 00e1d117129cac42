"""Fine-tune a timm ViT with EViT (or another method) from a YAML recipe, on CPU, one GPU or many.

    python -m evit_patch.finetune recipes/fashion_mnist.yaml [--set train.epochs=2] [--resume PATH]
    torchrun --nproc_per_node 8 -m evit_patch.finetune recipes/deit_s.yaml
    python -m evit_patch.finetune recipes/deit_s.yaml --dry-run --world-size 8

Each epoch writes ``checkpoint.pth`` atomically and a line of ``metrics.jsonl``;
``--resume`` continues to the same weights as an uninterrupted run, and may change the
number of epochs and the optimizer settings but not the model, method or data. A folder
that holds a run is not written over without ``--overwrite``. Ctrl-C saves and exits; a
non-finite loss stops before the update. The final weights go to ``model.safetensors``
with the resolved ``recipe.yaml`` beside them, from which ``python -m evit_patch.evaluate``
rebuilds the model. ``--dry-run`` checks the recipe, builds its model and data pipeline
without training or loading data (nor weights from the hub), and prints the resolved
recipe as YAML with what it implies on ``--world-size`` processes: the effective peak
and minimum lr, the global batch, steps per epoch, the lr each epoch starts at, the
GMACs unpatched and patched and the image tokens after each reorganization layer. A
missing data folder or weight file is noted, not refused (see docs/recipes.md).

Exit status 2: a bad recipe, override or output folder (one another run is writing, or
that cannot be written), or a resume that changes what the run is; 1: a checkpoint or
weights file that cannot be used or written, missing data, an unsupported model, a
diverging loss; 130: interrupted (resumable). Each is one line.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import yaml

from evit_patch.errors import CheckpointError, UnsupportedModelError
from evit_patch.tools.evaluate import compare_with_base
from evit_patch.tools.file_faults import file_fault
from evit_patch.train.dry_run import describe
from evit_patch.train.loop import TrainingDiverged, train
from evit_patch.train.messages import one_line
from evit_patch.train.methods import method_label
from evit_patch.train.recipe import RecipeError, load_recipe, recipe_to_dict


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="YAML recipe (see recipes/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.SUB=VALUE",
                        help="override a recipe value; repeatable")
    parser.add_argument("--resume", default=None, metavar="PATH",
                        help="checkpoint.pth to continue from (train.epochs and optimizer settings may change)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run in train.output_dir: its recipe.yaml, metrics.jsonl, checkpoint.pth "
                             "and model weights are deleted once the new run has started; other files stay")
    parser.add_argument("--no-report", action="store_true", help="skip the base-vs-EViT table at the end")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the recipe and print it resolved, with what it implies; train nothing")
    parser.add_argument("--world-size", type=int, default=None, metavar="N",
                        help="with --dry-run: the number of processes to resolve for (default 1)")
    args = parser.parse_args(argv)
    if args.world_size is not None and not args.dry_run:
        parser.exit(2, "error: --world-size is read by --dry-run only; torchrun sets the number of processes\n")
    if args.world_size is not None and args.world_size < 1:
        parser.exit(2, f"error: --world-size must be at least 1, got {args.world_size}\n")
    if args.dry_run:
        dry_run(parser, args.recipe, args.overrides, args.world_size or 1)
        return
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        output = train(recipe, args.resume, overwrite=args.overwrite)
    except RecipeError as error:
        parser.exit(2, f"error: {one_line(error)}\n")
    except (CheckpointError, TrainingDiverged, UnsupportedModelError) as error:
        parser.exit(1, f"error: {one_line(error)}\n")
    except OSError as error:  # missing data; a file of the run that cannot be written (a full disk)
        parser.exit(1, f"error: {file_fault(error)}\n")
    if not args.no_report and method_label(recipe) is not None and int(os.environ.get("RANK", "0")) == 0:
        print(compare_with_base(recipe, output / "model.safetensors"))


def dry_run(parser: argparse.ArgumentParser, path: str, overrides: list[str], world_size: int) -> None:
    """Print the resolved recipe and what it implies as one YAML document; exit 2 on a bad
    recipe, as a run would."""
    missing: list[str] = []
    try:
        recipe = load_recipe(path, overrides, missing=missing)
        implied, notes = describe(recipe, world_size)
    except RecipeError as error:
        parser.exit(2, f"error: {one_line(error)}\n")
    except UnsupportedModelError as error:
        parser.exit(1, f"error: {one_line(error)}\n")
    document = {"recipe": recipe_to_dict(recipe), "implied": implied, "notes": missing + notes}
    sys.stdout.write(yaml.dump(document, Dumper=_FlowListDumper, sort_keys=False, width=120))


class _FlowListDumper(yaml.SafeDumper):
    """Block mappings; lists of numbers and short names on one line."""

    def represent_list(self, data: list) -> yaml.Node:
        flow = all(not isinstance(item, (dict, list)) and len(str(item)) <= 40 for item in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_FlowListDumper.add_representer(list, _FlowListDumper.represent_list)


if __name__ == "__main__":
    main()

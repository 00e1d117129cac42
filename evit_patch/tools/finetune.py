"""Fine-tune a timm ViT with EViT (or another method) from a YAML recipe, on CPU, one GPU or many.

    python -m evit_patch.finetune recipes/fashion_mnist.yaml [--set train.epochs=2] [--resume PATH]
    torchrun --nproc_per_node 8 -m evit_patch.finetune recipes/deit_s.yaml

Each epoch writes ``checkpoint.pth`` atomically and a line of ``metrics.jsonl``;
``--resume`` continues to the same weights as an uninterrupted run, and may change the
number of epochs and the optimizer settings but not the model, method or data. A folder
that holds a run is not written over without ``--overwrite``. Ctrl-C saves and exits; a
non-finite loss stops before the update. The final weights go to ``model.safetensors``
with the resolved ``recipe.yaml`` beside them, from which ``python -m evit_patch.evaluate``
rebuilds the model.

Exit status 2: a bad recipe, override or output folder, or a resume that changes what the
run is; 1: a checkpoint or weights file that cannot be used, missing data, an
unsupported model, a diverging loss; 130: interrupted (resumable). Each is one line.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from evit_patch.errors import CheckpointError, UnsupportedModelError
from evit_patch.tools.evaluate import compare_with_base
from evit_patch.train.loop import TrainingDiverged, train
from evit_patch.train.methods import method_label
from evit_patch.train.recipe import RecipeError, load_recipe


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
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        output = train(recipe, args.resume, overwrite=args.overwrite)
    except RecipeError as error:
        parser.exit(2, f"error: {_one_line(error)}\n")
    except (CheckpointError, TrainingDiverged, UnsupportedModelError, FileNotFoundError) as error:
        parser.exit(1, f"error: {_one_line(error)}\n")
    if not args.no_report and method_label(recipe) is not None and int(os.environ.get("RANK", "0")) == 0:
        print(compare_with_base(recipe, output / "model.safetensors"))


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


if __name__ == "__main__":
    main()

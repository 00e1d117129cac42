"""Run by torchrun in tests: train the tiny recipe, then each rank saves its own weights.

``--nan-at STEP`` makes rank 1's loss NaN at that (1-based) training step, as a diverging
run on one process only. A run that stops (a diverging loss, an output folder in use)
prints ``rank N stopped: ERROR`` and exits 3.
"""

import argparse
from pathlib import Path

import torch.distributed as dist
from safetensors.torch import save_file

import evit_patch.train.loop as loop
from evit_patch.train import distributed
from evit_patch.train.criterion import DistillationLoss
from evit_patch.train.recipe import RecipeError, load_recipe


def poison_rank_one(step: int) -> None:
    original = DistillationLoss.forward
    calls = {"n": 0}

    def forward(self, images, outputs, targets):
        calls["n"] += 1
        loss = original(self, images, outputs, targets)
        return loss * float("nan") if dist.get_rank() == 1 and calls["n"] == step else loss

    DistillationLoss.forward = forward


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe")
    parser.add_argument("--nan-at", type=int, default=None)
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    runtime = distributed.start()
    if args.nan_at:
        poison_rank_one(args.nan_at)
    try:
        output, model = loop.run_training(recipe, None, runtime, show_progress=False)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(Path(output) / f"rank{dist.get_rank()}.safetensors"))
    except (loop.TrainingDiverged, RecipeError) as error:
        print(f"rank {dist.get_rank()} stopped: {error}", flush=True)
        raise SystemExit(3)
    finally:
        distributed.stop(runtime)


if __name__ == "__main__":
    main()

"""Run by torchrun in tests: train the tiny recipe, then each rank saves its own weights."""

import sys
from pathlib import Path

import torch.distributed as dist
from safetensors.torch import save_file

from evit_patch import distributed
from evit_patch.config import load_recipe
from evit_patch.finetune import run_training


def main() -> None:
    recipe = load_recipe(sys.argv[1])
    runtime = distributed.start()
    try:
        output, model = run_training(recipe, None, runtime, show_progress=False)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(Path(output) / f"rank{dist.get_rank()}.safetensors"))
    finally:
        distributed.stop(runtime)


if __name__ == "__main__":
    main()

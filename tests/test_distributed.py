"""The same training under torchrun: 2 CPU processes (gloo) as one DDP run."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from finetune_helpers import tiny_recipe, write_recipe
from safetensors.torch import load_file

from evit_patch.train.assembly import prepare_model
from evit_patch.train.checkpoint import load_checkpoint
from evit_patch.train.run_folder import claim_output_folder

TESTS = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(recipe: Path, *arguments: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), str(TESTS / "ddp_worker.py"), str(recipe), *arguments],
        env=environment, timeout=240, capture_output=True, text=True,
    )


def test_torchrun_with_two_cpu_processes_ends_with_identical_weights(tmp_path) -> None:
    recipe = write_recipe(tmp_path, {"train": {"epochs": 1, "max_steps_per_epoch": 3}})
    completed = torchrun(recipe)
    assert completed.returncode == 0, completed.stderr[-3000:]
    rank0 = load_file(str(tmp_path / "run" / "rank0.safetensors"))
    rank1 = load_file(str(tmp_path / "run" / "rank1.safetensors"))
    untrained = prepare_model(tiny_recipe(tmp_path)).state_dict()
    assert all(torch.equal(rank0[key], rank1[key]) for key in rank0)
    assert any(not torch.equal(rank0[key], untrained[key]) for key in rank0)
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    assert len(saved["rng"]) == 2  # each rank's random state, to resume each where it was


def test_nan_on_one_rank_stops_every_rank_with_the_last_good_checkpoint(tmp_path) -> None:
    recipe = write_recipe(tmp_path, {"train": {"epochs": 2, "max_steps_per_epoch": 3}})
    completed = torchrun(recipe, "--nan-at", "5")  # epoch 2, step 2, rank 1 only
    assert completed.returncode != 0
    assert "rank 1 stopped: loss is nan at epoch 2, step 2" in completed.stdout, completed.stdout[-3000:]
    assert "rank 0 stopped: loss is not finite on another process at epoch 2, step 2" in completed.stdout
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    assert state["position"]["epoch"] == 1
    assert all(torch.isfinite(value).all() for value in state["model"].values())


def test_a_folder_in_use_stops_every_rank_with_rank_zeros_refusal(tmp_path) -> None:
    recipe = write_recipe(tmp_path, {"train": {"epochs": 1, "max_steps_per_epoch": 3}})
    with claim_output_folder(tmp_path / "run"):  # another run holds the folder: only rank 0 tries to claim it
        completed = torchrun(recipe)
        assert sorted(os.listdir(tmp_path / "run")) == [".evit-run.lock"]
    assert completed.returncode != 0
    for rank in (0, 1):
        assert f"rank {rank} stopped: train.output_dir {str(tmp_path / 'run')!r} is in use by a run that has not " \
               "ended" in completed.stdout, completed.stdout[-3000:] + completed.stderr[-3000:]

"""Few-step fine-tuning runs on a Fashion-MNIST subset with a tiny ViT."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import evit_patch
import evit_patch.finetune as finetune
from evit_patch.checkpoint import CheckpointError, load_checkpoint
from evit_patch.evaluate import main as evaluate_main
from finetune_helpers import tiny_recipe, write_recipe

TESTS = Path(__file__).resolve().parent
REAL_INTERRUPT = finetune._Interrupt


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def test_loss_goes_down_and_the_run_is_saved(tmp_path) -> None:
    recipe = tiny_recipe(tmp_path, {"train": {"epochs": 3, "max_steps_per_epoch": 8}})
    run = finetune.train(recipe, show_progress=False)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"] - 0.1, metrics
    assert metrics[-1]["top1"] > 25.0, metrics  # 10 classes: chance is 10%
    state = load_checkpoint(run / "checkpoint.pth")
    assert state["position"] == {"epoch": 3, "step_in_epoch": 0, "global_step": 24}
    assert set(weights(run)) == set(state["model"])


def test_keep_rate_schedule_is_set_every_step(tmp_path, monkeypatch) -> None:
    recipe = tiny_recipe(tmp_path, {"keep_rate_schedule": {"kind": "cosine", "start_epoch": 0.5, "epochs": 1.0}})
    seen = []
    original = finetune.set_keep_rate
    monkeypatch.setattr(finetune, "set_keep_rate", lambda model, rate: (seen.append(rate), original(model, rate)))
    finetune.train(recipe, show_progress=False)
    expected = [finetune.keep_rate_at(step / 4, 0.5, recipe.keep_rate_schedule) for step in range(8)]
    assert seen == expected
    assert seen[:2] == [1.0, 1.0] and seen[-1] == 0.5 and 0.5 < seen[3] < 1.0


class InterruptAfter:
    """Stands in for Ctrl-C arriving after a given number of training steps."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __call__(self):
        outer = self

        class Interrupt(REAL_INTERRUPT):
            @property
            def requested(self) -> bool:
                outer.steps -= 1
                return outer.steps < 0

            @requested.setter
            def requested(self, value) -> None:
                pass

        return Interrupt()


@pytest.mark.parametrize("interrupt_after", [3, 4])  # mid-epoch, and at an epoch's last step
def test_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch, interrupt_after) -> None:
    overrides = {"data": {"mixup": 0.5, "train_subset": 256}, "train": {"ema_decay": 0.9}}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = finetune.train(tiny_recipe(tmp_path / "a", overrides), show_progress=False)
    recipe = tiny_recipe(tmp_path / "b", overrides)
    monkeypatch.setattr(finetune, "_Interrupt", InterruptAfter(interrupt_after))
    with pytest.raises(SystemExit) as stopped:
        finetune.train(recipe, show_progress=False)
    assert stopped.value.code == 130
    monkeypatch.undo()
    resumed = finetune.train(recipe, resume=str(Path(recipe.train.output_dir) / "checkpoint.pth"), show_progress=False)
    expected, actual = weights(straight), weights(resumed)
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    ema_expected = load_file(str(straight / "model_ema.safetensors"))
    ema_actual = load_file(str(resumed / "model_ema.safetensors"))
    assert all(torch.equal(ema_expected[key], ema_actual[key]) for key in ema_expected)


def test_ctrl_c_is_turned_into_a_request() -> None:
    with finetune._Interrupt() as interrupt:
        os.kill(os.getpid(), signal.SIGINT)
        assert interrupt.requested


def test_corrupt_or_truncated_checkpoint_gives_a_clear_error(tmp_path) -> None:
    run = finetune.train(tiny_recipe(tmp_path, {"train": {"epochs": 1}}), show_progress=False)
    data = (run / "checkpoint.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    for name in ("truncated.pth", "garbage.pth"):
        with pytest.raises(CheckpointError, match="corrupt or truncated"):
            load_checkpoint(tmp_path / name)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.pth")


def test_nan_loss_stops_clearly_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch) -> None:
    recipe = tiny_recipe(tmp_path)
    calls = {"n": 0}
    original = finetune.DistillationLoss.forward

    def poisoned(self, images, outputs, targets):
        calls["n"] += 1
        loss = original(self, images, outputs, targets)
        return loss * float("nan") if calls["n"] == 6 else loss  # step 2 of epoch 2

    monkeypatch.setattr(finetune.DistillationLoss, "forward", poisoned)
    with pytest.raises(finetune.TrainingDiverged, match=r"loss is nan at epoch 2, step 2.*last good checkpoint"):
        finetune.train(recipe, show_progress=False)
    state = load_checkpoint(Path(recipe.train.output_dir) / "checkpoint.pth")
    assert state["position"]["epoch"] == 1
    assert all(torch.isfinite(value).all() for value in state["model"].values())


def test_evaluate_rebuilds_the_patched_model_from_the_run(tmp_path, capsys) -> None:
    run = finetune.train(tiny_recipe(tmp_path, {"train": {"epochs": 1, "benchmark_batch_size": 8}}), show_progress=False)
    evaluate_main([str(run)])
    printed = capsys.readouterr().out
    assert "| unpatched |" in printed and "| EViT keep 0.5 |" in printed


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_with_two_cpu_processes_ends_with_identical_weights(tmp_path) -> None:
    recipe = write_recipe(tmp_path, {"train": {"epochs": 1, "max_steps_per_epoch": 3}})
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), str(TESTS / "ddp_worker.py"), str(recipe)],
        check=True, env=environment, timeout=240, capture_output=True,
    )
    rank0 = load_file(str(tmp_path / "run" / "rank0.safetensors"))
    rank1 = load_file(str(tmp_path / "run" / "rank1.safetensors"))
    untrained = evit_patch.finetune.prepare_model(tiny_recipe(tmp_path)).state_dict()
    assert all(torch.equal(rank0[key], rank1[key]) for key in rank0)
    assert any(not torch.equal(rank0[key], untrained[key]) for key in rank0)

"""Every command docs/findings.md gives for training-free EViT, run with small arguments.

Each documented command string is here verbatim; a test splits it, swaps the long
arguments (images, steps, repeats, output paths) for small ones and runs it in-process.
"""

import json
import re
import shlex
import sys
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark

from evit_patch.tools import finetune

BASE = "python benchmarks/training_free.py --out benchmarks/results/training_free_fashion_mnist"
LVVIT = ("python benchmarks/training_free.py --recipe recipes/lvvit_fashion_mnist.yaml --set data.eval_subset=2000 "
         "--out benchmarks/results/training_free_lvvit_fashion_mnist")
REG4_BASE = ("python -m evit_patch.finetune recipes/fashion_mnist_pretrain.yaml --set model.kwargs.reg_tokens=4 "
             "--set train.epochs=2 --set train.output_dir=runs/fashion_mnist_pretrain_reg4_2ep")
REG4 = ("python benchmarks/training_free.py --set model.checkpoint=runs/fashion_mnist_pretrain_reg4_2ep/model.safetensors "
        "--set model.kwargs.reg_tokens=4 --set data.eval_subset=2000 --out benchmarks/results/training_free_fashion_mnist_reg4")
FINETUNE = "python -m evit_patch.finetune recipes/fashion_mnist.yaml --set reduction.variant=training-free"
COMPARE = ("python benchmarks/compare.py --methods unpatched evit evit-training-free --keep-rates 0.7 0.5 --steps 234 "
           "--repeats 5 --out benchmarks/results/training_free_finetune_fashion_mnist --runs runs/training_free_compare")
COMPARE_REG4 = ("python benchmarks/compare.py --set model.checkpoint=runs/fashion_mnist_pretrain_reg4_2ep/model.safetensors "
                "--set model.kwargs.reg_tokens=4 --methods unpatched evit evit-training-free --keep-rates 0.7 0.5 "
                "--steps 234 --repeats 5 --out benchmarks/results/training_free_finetune_fashion_mnist_reg4 "
                "--runs runs/training_free_compare_reg4")
COMPARE_LVVIT = ("python benchmarks/compare.py --recipe recipes/lvvit_fashion_mnist.yaml --set token_labeling.enabled=false "
                 "--set data.eval_subset=2000 --methods unpatched evit evit-training-free --keep-rates 0.7 0.5 --steps 234 "
                 "--repeats 5 --out benchmarks/results/training_free_finetune_lvvit_fashion_mnist "
                 "--runs runs/training_free_compare_lvvit")
SPEED = ("python benchmarks/throughput.py --models vit_tiny_patch16_224 --layers 1 3 4 --model-kwargs "
         "'{\"img_size\": 28, \"patch_size\": 2, \"in_chans\": 1, \"num_classes\": 10, \"embed_dim\": 64, \"depth\": 6, "
         "\"num_heads\": 4, \"mlp_ratio\": 2}' --checkpoint recipes/checkpoints/fashion_mnist_vit.safetensors "
         "--batch-sizes 64 1 --keep-rates 0.7 0.5 --methods evit evit-training-free tome --repeats 15 "
         "--calls-per-repeat 5 --threads 2 --out benchmarks/results/training_free_speed_fashion_mnist")
SPEED_DEIT_S = ("python benchmarks/throughput.py --batch-sizes 64 --keep-rates 0.7 0.5 --methods evit "
                "evit-training-free tome --repeats 9 --threads 2 --out benchmarks/results/training_free_speed_deit_s_cpu")
SPEED_DEIT_S_B1 = ("python benchmarks/throughput.py --batch-sizes 1 --keep-rates 0.7 0.5 --methods evit "
                   "evit-training-free tome --repeats 41 --calls-per-repeat 5 --threads 2 "
                   "--out benchmarks/results/training_free_speed_deit_s_cpu_b1")
ROOT = Path(__file__).resolve().parent.parent
SMALL_DATA = ["--set", "data.eval_subset=32"]
SMALL_TRAINING = ["--set", "data.train_subset=64", "--set", "train.batch_size=32", "--set", "data.eval_subset=32",
                  "--set", "train.max_steps_per_epoch=2",
                  "--set", "train.epochs=1", "--set", "train.benchmark_batch_size=2"]


def small(command: str, replacements: dict[str, str], extra: list[str] = ()) -> list[str]:
    """The command's arguments after ``python <script>`` (or ``python -m <module>``), each
    ``option value`` pair named in ``replacements`` given the new value, then ``extra``."""
    words = shlex.split(command)
    words = words[3:] if words[1] == "-m" else words[2:]
    for position, word in enumerate(words[:-1]):
        key = f"{word} {words[position + 1].split('=')[0]}" if word == "--set" else word
        if key in replacements:
            value = replacements[key]
            words[position + 1] = f"{words[position + 1].split('=')[0]}={value}" if word == "--set" else value
    for option in (o for o in replacements if " " not in o and o not in words):
        raise AssertionError(f"{option} is not in the documented command {command!r}")
    return [*words, *extra]


def run_script(name: str, arguments: list[str], monkeypatch) -> None:
    script = load_benchmark(name)
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *arguments])
    script.main()


def test_off_the_shelf_table_on_the_shipped_base(tmp_path, monkeypatch) -> None:
    out = tmp_path / "base"
    run_script("training_free", small(BASE, {"--out": str(out)}, SMALL_DATA), monkeypatch)
    saved = json.loads(out.with_suffix(".json").read_text())
    labels = {row["label"] for row in saved["rows"]}
    assert {"unpatched", "EViT", "training-free EViT", "ToMe-style merging", "random drop"} <= labels
    assert {"training-free EViT never pooling (absorb only)", "training-free EViT pooling the samples it merges closer"} <= labels
    assert {row["keep_rate"] for row in saved["rows"]} == {0.7, 0.5}
    shares = [row["pooled_share"] for row in saved["rows"] if "pooled_share" in row]
    assert {row["label"] for row in saved["rows"] if "pooled_share" in row} == {
        "training-free EViT pooling the samples it merges closer"}
    assert len(shares) == 2 and all(len(share) == 3 and all(0 <= s <= 1 for s in share) for share in shares)
    assert out.with_suffix(".png").is_file() and "| training-free EViT |" in out.with_suffix(".md").read_text()


def test_off_the_shelf_table_on_lvvit(tmp_path, monkeypatch) -> None:
    out = tmp_path / "lvvit"
    run_script("training_free", small(LVVIT, {"--out": str(out), "--set data.eval_subset": "32"}), monkeypatch)
    assert json.loads(out.with_suffix(".json").read_text())["setup"]["eval_images"] == 32


def test_register_base_and_its_table(tmp_path, monkeypatch) -> None:
    """The register base trained (a few steps here), then measured off the shelf."""
    monkeypatch.chdir(ROOT)
    run_folder = tmp_path / "reg4"
    finetune.main(small(REG4_BASE, {"--set train.output_dir": str(run_folder)}, SMALL_TRAINING))
    out = tmp_path / "reg4_table"
    run_script("training_free", small(REG4, {"--set model.checkpoint": str(run_folder / "model.safetensors"),
                                             "--set data.eval_subset": "32", "--out": str(out)}), monkeypatch)
    assert json.loads(out.with_suffix(".json").read_text())["setup"]["overrides"][1] == "model.kwargs.reg_tokens=4"


def test_fine_tuning_the_variant(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    finetune.main(small(FINETUNE, {}, [*SMALL_TRAINING, "--set", f"train.output_dir={tmp_path / 'run'}"]))
    assert "variant: training-free" in (tmp_path / "run" / "recipe.yaml").read_text()


def test_fine_tuning_comparison(tmp_path, monkeypatch) -> None:
    out = tmp_path / "compare"
    data = ["--set", "data.train_subset=256", "--set", "data.eval_subset=32", "--set", "train.batch_size=32",
            "--set", "train.benchmark_batch_size=2"]
    run_script("compare", small(COMPARE, {"--steps": "4", "--repeats": "1", "--out": str(out),
                                          "--runs": str(tmp_path / "runs")}, data), monkeypatch)
    saved = json.loads(out.with_suffix(".json").read_text())
    assert [row["method"] for row in saved["rows"]] == ["unpatched", "evit", "evit-training-free", "evit", "evit-training-free"]


def test_fine_tuning_comparison_on_the_register_base(tmp_path, monkeypatch) -> None:
    """The register base trained (a few steps here), then every method fine-tuned from it."""
    monkeypatch.chdir(ROOT)
    run_folder = tmp_path / "reg4"
    finetune.main(small(REG4_BASE, {"--set train.output_dir": str(run_folder)}, SMALL_TRAINING))
    out = tmp_path / "compare_reg4"
    data = ["--set", "data.train_subset=256", "--set", "data.eval_subset=32", "--set", "train.batch_size=32",
            "--set", "train.benchmark_batch_size=2"]
    run_script("compare", small(COMPARE_REG4, {"--set model.checkpoint": str(run_folder / "model.safetensors"),
                                               "--steps": "4", "--repeats": "1", "--out": str(out),
                                               "--runs": str(tmp_path / "runs")}, data), monkeypatch)
    saved = json.loads(out.with_suffix(".json").read_text())
    assert [row["method"] for row in saved["rows"]] == ["unpatched", "evit", "evit-training-free", "evit", "evit-training-free"]
    assert "model.kwargs.reg_tokens=4" in saved["setup"]["overrides"]


def test_fine_tuning_comparison_on_lvvit(tmp_path, monkeypatch) -> None:
    out = tmp_path / "compare_lvvit"
    data = ["--set", "data.train_subset=256", "--set", "train.batch_size=32", "--set", "train.benchmark_batch_size=2"]
    run_script("compare", small(COMPARE_LVVIT, {"--set data.eval_subset": "32", "--steps": "3", "--repeats": "1",
                                                "--out": str(out), "--runs": str(tmp_path / "runs")}, data), monkeypatch)
    saved = json.loads(out.with_suffix(".json").read_text())
    assert [row["method"] for row in saved["rows"]] == ["unpatched", "evit", "evit-training-free", "evit", "evit-training-free"]
    assert saved["setup"]["recipe"] == "recipes/lvvit_fashion_mnist.yaml"


def test_speed_side_by_side(tmp_path, monkeypatch) -> None:
    out = tmp_path / "speed"
    run_script("throughput", small(SPEED, {"--batch-sizes": "2", "--repeats": "1", "--calls-per-repeat": "1",
                                           "--out": str(out)}), monkeypatch)
    variants = {v["name"] for result in json.loads(out.with_suffix(".json").read_text())["results"].values() for v in result}
    assert {"evit 0.7", "evit-training-free 0.5", "tome 0.7"} <= variants


@pytest.mark.parametrize("command", [SPEED_DEIT_S, SPEED_DEIT_S_B1], ids=["batch 64", "batch 1"])
def test_speed_on_deit_s_sized_blocks(command, tmp_path, monkeypatch) -> None:
    """Each DeiT-S command on a 2-block model of DeiT-S's width (the full model takes minutes)."""
    out = tmp_path / "speed_deit_s"
    run_script("throughput", small(command, {"--batch-sizes": "2", "--repeats": "1", "--out": str(out)},
                                   ["--model-kwargs", '{"depth": 2, "img_size": 64}', "--layers", "0", "1",
                                    "--warmup", "0", "--calls-per-repeat", "1"]), monkeypatch)
    saved = json.loads(out.with_suffix(".json").read_text())
    variants = {v["name"] for result in saved["results"].values() for v in result}
    assert {"evit 0.7", "evit-training-free 0.7", "tome 0.5"} <= variants
    assert saved["setup"]["layers"] == [0, 1]


def test_the_findings_give_exactly_these_commands() -> None:
    """Every command of the training-free section of docs/findings.md is one run above."""
    findings = (ROOT / "docs" / "findings.md").read_text()
    section = findings[findings.index("## Training-free EViT"):]
    documented = [line for block in re.findall(r"```bash\n(.*?)```", section, re.S) for line in block.strip().splitlines()]
    assert set(documented) == {BASE, LVVIT, REG4_BASE, REG4, FINETUNE, COMPARE, COMPARE_REG4, COMPARE_LVVIT, SPEED,
                               SPEED_DEIT_S, SPEED_DEIT_S_B1}

"""The commands docs/dense.md shows, run at a tiny size: the garment segmentation and the speed table."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_benchmark

DOCS = Path(__file__).resolve().parent.parent / "docs" / "dense.md"
SEGMENTATION = "python benchmarks/dense.py --out benchmarks/results/dense_fashion_mnist"
SPEED = ("python benchmarks/dense_speed.py --batch-sizes 1 32 --repeats 15 --calls-per-repeat 2 "
         "--out benchmarks/results/dense_speed_deit_s_cpu")
SPEED_B1 = ("python benchmarks/dense_speed.py --batch-sizes 1 --repeats 61 --calls-per-repeat 4 "
            "--out benchmarks/results/dense_speed_deit_s_cpu_b1")
OP_LATENCY = "python benchmarks/op_latency.py --repeats 61 --threads 2 --out benchmarks/results/op_latency_deit_s_cpu"
TINY_SEGMENTATION = ["--train-images", "64", "--test-images", "32", "--epochs", "1", "--finetune-epochs", "1",
                     "--keep-rates", "0.7", "--fills", "carry", "zeros"]
TINY_SPEED = ["--model", "deit_tiny_patch16_224", "--batch-sizes", "1", "2", "--repeats", "2", "--warmup", "0",
              "--indices", "5", "11"]


def _arguments(command: str, out: Path) -> list[str]:
    """The documented command's arguments after the script, with ``--out`` sent to ``out``."""
    words = shlex.split(command)[2:]
    words[words.index("--out") + 1] = str(out)
    return words


def test_the_documented_commands_are_the_ones_tested():
    text = DOCS.read_text()
    assert SEGMENTATION in text and SPEED in text and SPEED_B1 in text and OP_LATENCY in text


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="Fashion-MNIST is not installed")
def test_garment_segmentation_runs_and_writes_its_results(tmp_path):
    script = load_benchmark("dense")
    rows = script.main(_arguments(SEGMENTATION, tmp_path / "dense") + TINY_SEGMENTATION)
    assert [row.label for row in rows] == ["unpatched", "EViT 0.7, restoration: carry",
                                           "EViT 0.7, no restoration (holes empty)", "ToMe 0.7, unmerge"]
    written = json.loads((tmp_path / "dense.json").read_text())
    assert [row["label"] for row in written["results"]] == [row.label for row in rows]
    assert all(0 <= row["miou_finetuned"] <= 100 for row in written["results"])
    assert rows[1].gmacs < rows[0].gmacs
    assert (tmp_path / "dense.png").stat().st_size > 0 and "| unpatched |" in (tmp_path / "dense.md").read_text()


def test_garment_masks_are_the_pixels_above_the_threshold():
    script = load_benchmark("dense")
    raw = torch.tensor([[0.0, 0.05], [0.11, 1.0]]).view(1, 1, 2, 2)
    images = (raw - script.FASHION_MNIST_MEAN[0]) / script.FASHION_MNIST_STD[0]
    assert script.garment_masks(images, 0.1).tolist() == [[[0, 0], [1, 1]]]


@pytest.mark.parametrize("command", [SPEED, SPEED_B1], ids=["batch-1-and-32", "batch-1"])
def test_speed_table_runs_and_reports_the_share_of_the_speed_up(tmp_path, command):
    script = load_benchmark("dense_speed")
    results = script.main(_arguments(command, tmp_path / "speed") + TINY_SPEED)
    assert set(results) == {1, 2}
    names = list(results[1])
    assert names[0] == "unpatched" and "reduced" in names[1]
    assert [name.split(" (")[0] for name in names[2:]] == (["EViT 0.7 restored"] * 2 + ["restoration work alone"] * 2
                                                           + ["restoration work alone, a block before each step"] * 2)
    assert len(results[2]) == len(results[1]) - 2  # the replay after blocks runs at batch 1 only
    assert all("share_of_speedup_eaten" in results[1][name] for name in names[2:])
    assert not any("blocks alone" in name for name in names)  # the helper rows are subtracted, not reported
    written = json.loads((tmp_path / "speed.json").read_text())
    assert written["results"]["1"]["unpatched"]["speedup"] == 1.0
    assert "share of EViT's speed-up eaten" in (tmp_path / "speed.md").read_text()


def test_the_replay_after_blocks_is_its_time_less_the_blocks_alone():
    """Repeat by repeat: 2 images in 0.5 s with the blocks and 0.4 s for the blocks alone is 2 images
    of work in 0.1 s (20/s); in 0.6 s against 0.2 s, 5/s."""
    script = load_benchmark("dense_speed")
    work = f"{script.COLD_PREFIX}(carry)"
    rates = {"unpatched": [1.0, 1.0], f"{work}{script.HELPER}": [2 / 0.5, 2 / 0.6],
             f"blocks alone (carry){script.HELPER}": [2 / 0.4, 2 / 0.2]}
    derived = script.cold_rates(rates, 2)
    assert list(derived) == ["unpatched", work]
    assert derived[work] == pytest.approx([20.0, 5.0])


def test_the_share_eaten_is_the_paired_extra_time_over_the_paired_saving():
    """Per image: unpatched 10, 12 and 11 s, reduced 6, 8 and 7 s (4 s saved in every repeat);
    restored 7, 8.5 and 9.5 s (1, 0.5 and 2.5 s more: median 1 s, 25% of the saving, where
    the difference of separate medians would say 1.5 s); the work alone 0.2, 0.4 and 0.3 s
    (median 0.3 s, 7.5%)."""
    script = load_benchmark("dense_speed")
    rates = {"unpatched": [1 / 10, 1 / 12, 1 / 11], "EViT 0.7 reduced (no restoration)": [1 / 6, 1 / 8, 1 / 7],
             "EViT 0.7 restored (carry)": [1 / 7, 1 / 8.5, 1 / 9.5],
             "restoration work alone (carry)": [1 / 0.2, 1 / 0.4, 1 / 0.3]}
    rows = script.summary(rates)
    assert rows["EViT 0.7 restored (carry)"]["share_of_speedup_eaten"] == pytest.approx(0.25)
    assert rows["restoration work alone (carry)"]["share_of_speedup_eaten"] == pytest.approx(0.075)
    assert rows["EViT 0.7 restored (carry)"]["speedup"] == pytest.approx(12 / 8.5)
    assert rows["unpatched"]["share_of_speedup_eaten"] is None and rows["unpatched"]["speedup"] == 1.0


def test_op_latency_table_times_each_operation_both_ways(tmp_path):
    script = load_benchmark("op_latency")
    arguments = _arguments(OP_LATENCY, tmp_path / "latency") + ["--repeats", "2", "--model", "deit_tiny_patch16_224",
                                                                 "--model-kwargs", '{"img_size": 64}']
    rows = script.main(arguments)
    assert len(rows) == 5 and "row copy of the 17 x 192 grid (cat)" in rows  # 1 + 16 patches of 192 channels
    assert all(row["ratio"] == pytest.approx(row["after_a_block_us"] / row["back_to_back_us"]) for row in rows.values())
    written = json.loads((tmp_path / "latency.json").read_text())
    assert written["setup"]["kept_tokens"] == 1 + 12 + 1  # EViT at keep 0.7 keeps ceil(0.7 * 16) and fuses the rest
    assert "| one index gather |" in (tmp_path / "latency.md").read_text()


def test_op_latency_times_after_the_block_and_after_the_operation_itself():
    """Each repeat runs the block, then the timed operation, then the operation untimed, then timed."""
    script = load_benchmark("op_latency")
    calls = []

    class Block(torch.nn.Module):
        def forward(self, x):
            calls.append("block")
            return x

    times = script.latencies(Block(), torch.zeros(1), {"op": lambda: calls.append("op")}, repeats=1)
    assert calls[-4:] == ["block", "op", "op", "op"] and calls[:2] == ["block", "op"]
    assert len(times["op"]["after a block"]) == len(times["op"]["back to back"]) == 1


def test_op_latency_refuses_a_count_below_one():
    """One line, exit 2, before any model is built."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "op_latency.py"
    result = subprocess.run([sys.executable, str(script), "--repeats", "0"], capture_output=True, text=True)
    assert result.returncode == 2 and "--repeats: must be at least 1, got 0" in result.stderr
    assert "Traceback" not in result.stderr

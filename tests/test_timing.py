"""Interleaved timing: every variant runs the same number of calls, in rotating order, so
drift of the machine falls on all of them alike."""

import subprocess
import sys
from pathlib import Path

import torch

from evit_patch.tuning import timing


def test_repeats_rotate_and_time_each_call_the_asked_number_of_times(monkeypatch) -> None:
    calls: list[str] = []
    clock = iter(range(0, 10_000))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: float(next(clock)))

    def call(name: str):
        return lambda: calls.append(name)

    rates = timing.interleaved_rates({"a": call("a"), "b": call("b"), "c": call("c")}, items_per_call=8,
                                     device=torch.device("cpu"), repeats=4, warmup=1, calls_per_repeat=3)
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    timed = calls[3:]
    blocks = [timed[i] for i in range(0, len(timed), 3)]
    assert all(timed[i:i + 3] == [timed[i]] * 3 for i in range(0, len(timed), 3))  # a repeat: one variant 3 times
    assert blocks == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]  # the order rotates per repeat
    assert {name: len(values) for name, values in rates.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(value == 8 * 3 / 1.0 for values in rates.values() for value in values)  # 3 calls of 8 items per tick


def test_benchmark_refuses_counts_below_one() -> None:
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "throughput.py"
    result = subprocess.run([sys.executable, str(script), "--calls-per-repeat", "0"], capture_output=True, text=True)
    assert result.returncode == 2 and "--calls-per-repeat: must be at least 1, got 0" in result.stderr


def test_paired_speeds_take_the_median_of_per_repeat_ratios_and_time_an_architecture_once(monkeypatch) -> None:
    """The median of ratios, not the ratio of medians (here 2.0 against 1.6); a model sharing
    another's architecture is not timed and gets its figures."""
    timed: list[list[str]] = []

    def rates(models, images, repeats, dtype, calls_per_repeat=1, clock=None):
        timed.append(list(models))
        return {"base": [10.0, 20.0, 30.0], "patched": [20.0, 40.0, 30.0]}

    monkeypatch.setattr(timing, "interleaved_images_per_second", rates)
    models = {"base": torch.nn.Identity(), "patched": torch.nn.Identity(), "patched, fine-tuned": torch.nn.Identity()}
    speeds = timing.paired_speeds(models, torch.zeros(1), same_as={"patched, fine-tuned": "patched"})
    assert timed == [["base", "patched"]]
    assert speeds["patched"].speedup == 2.0 and speeds["patched"].images_per_second == 30.0
    assert speeds["patched, fine-tuned"] == speeds["patched"]
    assert speeds["base"].speedup == 1.0 and speeds["base"].spread == 0.0


def test_a_spread_that_cannot_be_trusted_is_said(monkeypatch) -> None:
    steady = {"base": [10.0] * 5, "patched": [15.0, 15.2, 14.9, 15.1, 15.0]}
    busy = {"base": [10.0] * 5, "patched": [7.6, 15.2, 11.0, 15.1, 9.0]}
    for measured, warned in ((steady, False), (busy, True)):
        monkeypatch.setattr(timing, "interleaved_images_per_second", lambda *args, m=measured, **kwargs: m)
        speeds = timing.paired_speeds({"base": torch.nn.Identity(), "patched": torch.nn.Identity()}, torch.zeros(1))
        warning = timing.spread_warning(speeds)
        assert (warning is not None) == warned
    assert warning.startswith("warning: the speed-ups scatter by up to +-")

"""Interleaved timing: every variant runs the same number of calls, in rotating order, so
drift of the machine falls on all of them alike."""

import subprocess
import sys
from pathlib import Path

import torch

from evit_patch.tools import timing


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

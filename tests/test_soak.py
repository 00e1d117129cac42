"""The soak benchmark runs, and on today's code every concurrent call is bitwise the reference."""

from __future__ import annotations

import pytest
from benchmark_scripts import load_benchmark

soak = load_benchmark("soak")
throughput = load_benchmark("throughput")


def test_a_short_soak_has_no_error_and_no_mismatch(tmp_path):
    out = tmp_path / "soak"
    results = soak.main(["--methods", "evit", "tome", "random", "evit-training-free", "dynamicvit", "--calls", "12",
                         "--threads", "3", "--max-batch", "4", "--model-kwargs",
                         '{"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2}',
                         "--layers", "1", "2", "--out", str(out)])
    assert [result.method for result in results] == ["evit", "tome", "random", "evit-training-free", "dynamicvit"]
    for result in results:
        assert (result.calls, result.images, result.errors, result.mismatches) == (12, 30, 0, 0)
        assert len(result.concurrent_calls_per_second) == len(result.rss_mb_after) == 2
        assert result.rss_mb_before > 0
    table = out.with_suffix(".md").read_text()
    assert table.count("| 0 | 0 |") == 5 and out.with_suffix(".json").is_file()


def test_with_eager_needs_compile():
    with pytest.raises(SystemExit) as exit_info:
        throughput.parse_args(["--with-eager"])
    assert exit_info.value.code == 2

"""The comparison against the fine-tuning budget: one complete run per method and budget,
of exactly that many steps, reused when the comparison is run again, never reused for
other settings."""

import json
import re
import sys
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark

TINY = ["model.checkpoint=null", "model.kwargs.embed_dim=16", "model.kwargs.patch_size=4", "model.kwargs.num_heads=2",
        "data.train_subset=256", "data.eval_subset=64", "train.batch_size=32", "train.benchmark_batch_size=4"]
STEPS_PER_EPOCH = 8  # 256 images in batches of 32


def run_compare(compare, monkeypatch, out: Path, *arguments: str) -> None:
    overrides = [part for o in TINY for part in ("--set", o)]
    monkeypatch.setattr(sys, "argv", ["compare.py", *overrides, "--methods", "unpatched", "evit", "--keep-rates", "0.5",
                                      "--repeats", "1", "--out", str(out), *arguments])
    compare.main()


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One comparison at budgets of 4 and 16 steps (16: two epochs of 8)."""
    compare = load_benchmark("compare")
    out = tmp_path_factory.mktemp("compare") / "table"
    with pytest.MonkeyPatch.context() as monkeypatch:
        run_compare(compare, monkeypatch, out, "--steps", "16", "4")
    return compare, out


def test_every_method_runs_each_budget_as_one_complete_run_of_that_many_steps(first_run) -> None:
    compare, out = first_run
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["setup"]["steps"] == [4, 16]
    assert [(row["method"], row["keep_rate"]) for row in saved["rows"]] == [("unpatched", None), ("evit", 0.5)]
    for tag in ("unpatched", "evit_0.5"):
        for steps, epochs in ((4, 1), (16, 2)):
            folder = out.parent / "table_runs" / tag / f"steps_{steps}"
            lines = (folder / "metrics.jsonl").read_text().splitlines()
            assert len(lines) == epochs
            recipe = compare.read_run_recipe(folder / "recipe.yaml")
            assert recipe.train.epochs * recipe.train.max_steps_per_epoch == steps
            assert recipe.train.max_steps_per_epoch <= STEPS_PER_EPOCH
    evit = saved["rows"][1]
    assert set(evit["top1_after"]) == {"4", "16"}
    table = out.with_suffix(".md").read_text()
    assert "| after 4 | after 16 | within 0.5 from |" in table
    assert out.with_suffix(".png").stat().st_size > 0


def test_a_second_call_reuses_finished_runs_and_trains_only_missing_budgets(first_run, monkeypatch) -> None:
    compare, out = first_run
    before = json.loads(out.with_suffix(".json").read_text())["rows"]
    trained: list[str] = []
    real_training = compare.run_training

    def counting_training(recipe, *args, **kwargs):
        trained.append(recipe.train.output_dir)
        return real_training(recipe, *args, **kwargs)

    monkeypatch.setattr(compare, "run_training", counting_training)
    run_compare(compare, monkeypatch, out, "--steps", "4", "8", "16")
    assert sorted(Path(folder).relative_to(out.parent).as_posix() for folder in trained) == [
        "table_runs/evit_0.5/steps_8", "table_runs/unpatched/steps_8"]
    after = json.loads(out.with_suffix(".json").read_text())["rows"]
    for old, new in zip(before, after):
        assert new["top1_before"] == old["top1_before"]
        assert {k: new["top1_after"][k] for k in ("4", "16")} == old["top1_after"]


def test_finished_runs_of_other_settings_are_refused_not_reused(first_run, monkeypatch, capsys) -> None:
    compare, out = first_run
    with pytest.raises(SystemExit) as exit_info:
        run_compare(compare, monkeypatch, out, "--steps", "4", "--set", "optimizer.lr=1e-3")
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in error and len(error.strip().splitlines()) == 1
    assert "holds a result of other settings (differing: overrides)" in error


def test_a_budget_that_does_not_split_into_equal_epochs_is_refused_before_training(monkeypatch, tmp_path,
                                                                                   capsys) -> None:
    compare = load_benchmark("compare")
    monkeypatch.setattr(compare, "run_training", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(SystemExit) as exit_info:
        run_compare(compare, monkeypatch, tmp_path / "table", "--steps", "4", "15")
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(error.strip().splitlines()) == 1
    assert re.search(r"--steps 15 does not split into 2 equal epochs.*use 14 or 16", error)
    assert not (tmp_path / "table_runs").exists()


def test_within_half_a_point_counts_from_the_budget_it_stays_within() -> None:
    compare = load_benchmark("compare")
    reference = compare.Row("unpatched", "unpatched", None, "", 1.0, 1, 80.0, {150: 80.0, 600: 82.0, 1800: 83.0})
    row = compare.Row("evit", "EViT", 0.7, "", 1.0, 1, 60.0, {150: 79.6, 600: 81.0, 1800: 82.5})
    assert compare.within_from(row, reference) == 1800  # close at 150, not at 600: from 1800
    row.top1_after[600] = 81.5
    assert compare.within_from(row, reference) == 150
    row.top1_after[1800] = 82.4
    assert compare.within_from(row, reference) is None

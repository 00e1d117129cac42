"""The tuner: settings as values, the search, and its command line. Tiny models, a few images,
and a fake clock that the models' own forwards advance, so speeds (and the choice) are exact."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import timm
import tomllib
import torch
import yaml
from finetune_helpers import TINY

import evit_patch
from evit_patch.core.token_patch import apply_token_reducer
from evit_patch.reducers import EvitReducer, ToMeMerge, TrainingFreeEvit
from evit_patch.tools import tune as tune_module
from evit_patch.tools.tune import fashion_mnist
from evit_patch.tools.tune import main as tune_main
from evit_patch.tools.tune_report import result_json
from evit_patch.train.assembly import prepare_model
from evit_patch.train.data import FashionMNIST
from evit_patch.train.methods import recipe_reducer
from evit_patch.train.recipe import RecipeError, recipe_from_dict
from evit_patch.train.schedule import keep_rate_at
from evit_patch.tuning.config import TokenConfig, apply_config, recipe_fragment
from evit_patch.tuning.front import UnreachableTarget
from evit_patch.tuning.result import TargetNotMet
from evit_patch.tuning.space import candidate_configs

ROOT = Path(__file__).resolve().parent.parent
TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2, "num_classes": 5,
            "global_pool": "avg"}
LAYERS = (1, 2)


def tiny_vit() -> torch.nn.Module:
    """Random weights large enough that the classes differ between images and settings."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **TINY_VIT).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.3)
    return model


def images(count: int, seed: int = 0) -> torch.Tensor:
    """Noise around a colour of each image's own, so that the images differ in more than noise."""
    generator = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(count, 3, 1, 1, generator=generator) + torch.randn(count, 3, 32, 32, generator=generator)


def config(method: str, *rates: float, **options) -> TokenConfig:
    return TokenConfig(method, LAYERS, rates, tuple(options.items()))


CANDIDATES = [config("evit", 0.9, 0.9), config("evit", 0.5, 0.5), config("tome", 0.7, 0.7),
              config("evit-training-free", 0.6, 0.6, pooling=("always", "never"))]


class FakeClock:
    """Seconds that only the model's forwards advance: ``seconds[(reducer class, keep rates)]``
    per forward of a patched model (1.0 unpatched). A forward hook on the model does it, which
    the tuner's copies carry."""

    def __init__(self, seconds: dict[tuple[str, tuple[float, ...]], float]) -> None:
        self.now, self.seconds = 0.0, seconds

    def __call__(self) -> float:
        return self.now

    def advance(self, model: torch.nn.Module, args: object, output: object) -> None:
        state = getattr(model, "evit_state", None)
        key = None if state is None else (type(state.reducer).__name__, tuple(state.keep_rates))
        self.now += self.seconds.get(key, 1.0)  # unpatched, or a patch's test forward

    def on(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` advancing this clock; a plain function as the hook, since a deep copy of
        the model would copy a bound method's clock with it."""
        model.register_forward_hook(lambda *args: self.advance(*args))
        return model


SPEEDUPS = {("EvitReducer", (0.9, 0.9)): 1.2, ("EvitReducer", (0.5, 0.5)): 1.7, ("ToMeMerge", (0.7, 0.7)): 1.5,
            ("TrainingFreeEvit", (0.6, 0.6)): 1.6}


def fake_clock(speedups: dict = SPEEDUPS) -> FakeClock:
    return FakeClock({key: 1.0 / speedup for key, speedup in speedups.items()})


def run_tune(clock: FakeClock, count: int = 16, candidates=CANDIDATES, **kwargs) -> evit_patch.TuneResult:
    kwargs.setdefault("quality_batch_size", 4)  # the fake clock's seconds are per forward
    return evit_patch.tune(clock.on(tiny_vit()), images(count), batch_size=4, repeats=3, candidates=candidates,
                           clock=clock, progress=False, **kwargs)


def non_dominated(trials) -> set:
    """Brute force, without the library's comparison: no other trial at least as fast and as
    agreeing, and better in one."""
    def beats(a, b) -> bool:
        fast, agree = (a.speed.speedup, b.speed.speedup), (a.calibration.agreement, b.calibration.agreement)
        return fast[0] >= fast[1] and agree[0] >= agree[1] and (fast[0] > fast[1] or agree[0] > agree[1])
    return {b.label for b in trials if not any(beats(a, b) for a in trials)}


def test_the_selection_with_an_injected_clock_is_deterministic_and_takes_the_most_agreeing_fast_enough() -> None:
    first, second = run_tune(fake_clock(), target_speedup=1.4), run_tune(fake_clock(), target_speedup=1.4)
    assert first == second
    timed = {trial.label: trial for trial in first.measured}
    assert len(timed) >= 3 and timed["unpatched"].speed.speedup == 1.0
    for trial in first.measured[1:]:  # the clock's speeds, exactly: paired ratios of fixed seconds
        assert trial.speed.speedup == pytest.approx(SPEEDUPS[(type_of(trial.config), trial.config.keep_rates)])
    fast_enough = [trial for trial in first.measured if trial.speed.speedup >= 1.4]
    expected = max(fast_enough, key=lambda trial: (trial.calibration.agreement, trial.speed.speedup))
    assert first.chosen == expected


def type_of(config: TokenConfig) -> str:
    return {"evit": "EvitReducer", "tome": "ToMeMerge", "evit-training-free": "TrainingFreeEvit"}[config.method]


def test_the_front_is_exactly_the_non_dominated_set_of_what_was_measured() -> None:
    result = run_tune(fake_clock())
    assert {trial.label for trial in result.front} == non_dominated(result.measured)
    assert len(result.front) >= 2 and result.chosen in result.front
    assert [trial.speed.speedup for trial in result.front] == sorted((t.speed.speedup for t in result.front), reverse=True)


def test_calibration_and_held_out_never_overlap_and_held_out_figures_are_measured_on_held_out_images() -> None:
    result = run_tune(fake_clock(), count=20, calibration=0.4)
    chosen_on, reported_on = set(result.calibration_images), set(result.held_out_images)
    assert not chosen_on & reported_on and chosen_on | reported_on == set(range(20)) and len(chosen_on) == 8
    model, data = tiny_vit(), images(20)
    trial = next(trial for trial in result.front if trial.config is not None)
    assert {t.label for t in result.trials[1:] if t.held_out is not None} == {t.label for t in result.front} - {"unpatched"}
    held_out = torch.tensor(result.held_out_images)
    with torch.no_grad():
        reference = model(data[held_out]).argmax(1)
        patched = apply_config(copy.deepcopy(model), trial.config)(data[held_out]).argmax(1)
    assert trial.held_out.agreement == float((patched == reference).double().mean())


def test_the_choice_is_made_on_the_calibration_images_not_the_held_out_ones() -> None:
    """Here keep 0.5 agrees fully on the calibration images and loses a quarter on the held-out
    ones: chosen on the held-out images, the answer would be another setting."""
    result = run_tune(fake_clock(), count=24, max_agreement_loss=0.1)

    def best(part):
        fits = [trial for trial in (*result.front, result.trials[0]) if 1 - getattr(trial, part).agreement <= 0.1]
        return max(fits, key=lambda trial: (trial.speed.speedup, getattr(trial, part).agreement))
    assert best("calibration") != best("held_out")  # the case means something
    assert result.chosen == best("calibration")


def test_agreement_equals_top1_when_the_labels_are_the_unpatched_predictions() -> None:
    data = images(16)
    with torch.no_grad():
        labels = tiny_vit()(data).argmax(1)
    clock = fake_clock()
    result = evit_patch.tune(clock.on(tiny_vit()), data, labels, batch_size=4, repeats=3, candidates=CANDIDATES,
                             clock=clock, progress=False)
    for trial in result.measured:
        assert trial.calibration.top1 == trial.calibration.agreement
    for trial in result.front:
        assert trial.held_out.top1 == trial.held_out.agreement


def test_speed_comes_from_timing_not_from_macs() -> None:
    """The clock makes ToMe-style merging at keep 0.7 (more MACs than EViT at 0.5) faster than
    its MACs would suggest, and than every other setting: it is chosen for a target only it meets."""
    speedups = {**SPEEDUPS, ("ToMeMerge", (0.7, 0.7)): 1.78}
    result = run_tune(fake_clock(speedups), target_speedup=1.75)
    merged, cheapest = (next(t for t in result.trials if t.config == item) for item in (CANDIDATES[2], CANDIDATES[1]))
    assert merged.mac_ratio < cheapest.mac_ratio < 1.75 and merged.mac_ratio < 1.75 / 1.25
    assert result.chosen == merged and merged.speed.speedup == pytest.approx(1.78)


def test_a_target_above_the_fastest_measured_names_the_fastest_and_keeps_what_was_measured() -> None:
    with pytest.raises(TargetNotMet, match="the fastest found runs 1.70x") as refused:
        run_tune(fake_clock(), target_speedup=1.75)  # within what the MACs allow (1.46x fewer, 1.82x)
    result = refused.value.result
    assert result.unmet == str(refused.value) and len(result.measured) == len(run_tune(fake_clock()).measured)
    assert result.chosen.speed.speedup == pytest.approx(1.7) == max(trial.speed.speedup for trial in result.measured)


def test_a_first_look_screens_out_only_settings_a_survivor_beats_on_macs_and_kl() -> None:
    """256 images: 128 calibration images, of which the first 32 give every candidate a first look
    and only the survivors a pass over the other 96; both figures equal passes run here by hand."""
    candidates = candidate_configs(len(LAYERS) + 2, ("evit", "tome"), (0.9, 0.7, 0.5))
    data = images(256)
    result = run_tune(fake_clock(), count=256, candidates=candidates, quality_batch_size=None)
    trials = result.trials[1:]
    out = [trial for trial in trials if trial.screened_out]
    kept = [trial for trial in trials if trial.calibration is not None]
    assert all(trial.first_look is not None for trial in trials) and not result.left
    assert out and len(kept) + len(out) == len(trials) and len(kept) >= len(trials) / 3
    assert all(trial.calibration is None and trial.speed is None for trial in out)
    for loser in out:
        assert any(winner.mac_ratio >= loser.mac_ratio and winner.first_look.mean_kl <= loser.first_look.mean_kl
                   and (winner.mac_ratio, winner.first_look.mean_kl) != (loser.mac_ratio, loser.first_look.mean_kl)
                   for winner in kept)
    calibration = torch.tensor(result.calibration_images)
    model, trial = tiny_vit(), kept[-1]
    with torch.no_grad():
        reference, patched = model(data[calibration]), apply_config(copy.deepcopy(model), trial.config)(data[calibration])
    same = (reference.argmax(1) == patched.argmax(1)).double()
    assert trial.first_look.agreement == float(same[:32].mean()) and trial.calibration.agreement == float(same.mean())
    assert trial.first_look.mean_kl == pytest.approx(float(torch.nn.functional.kl_div(
        patched[:32].double().log_softmax(1), reference[:32].double().log_softmax(1), log_target=True,
        reduction="batchmean")), rel=1e-9)


def test_a_target_no_setting_can_reach_is_refused_before_the_clock_is_read() -> None:
    with pytest.raises(UnreachableTarget, match="no setting can run 50.0x fast"):
        evit_patch.tune(tiny_vit(), images(8), candidates=CANDIDATES, target_speedup=50.0, clock=refusing_clock,
                        progress=False)


def test_the_time_budget_ends_the_search_and_what_was_measured_is_reported() -> None:
    clock = fake_clock()
    result = run_tune(clock, time_budget_s=12.0)  # the reference pass and a few quality passes (4 batches each)
    assert result.out_of_time and 1 <= len(result.measured) < len(CANDIDATES) + 1
    assert result.chosen in result.front


def test_a_budget_the_quality_passes_alone_would_outlast_is_warned_of_at_once() -> None:
    # the reference pass: 16 images in 4 batches of 1 s; each quality pass takes the 8 calibration
    # images, at the unpatched cost over its MAC ratio (counted here on copies patched by hand)
    base = evit_patch.count_macs(tiny_vit())
    expected = 4.0 * 0.5 * sum(evit_patch.count_macs(apply_config(tiny_vit(), candidate)) / base
                               for candidate in CANDIDATES)
    with pytest.warns(UserWarning, match=r"quality passes of 4 settings need about \d+ s of the 3 s budget") as caught:
        run_tune(fake_clock(), time_budget_s=3.0)
    assert f"need about {expected:.0f} s" in str(caught[0].message) and "took 4.0 s" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_tune(fake_clock(), time_budget_s=12.0)


def refusing_clock() -> float:
    raise AssertionError("the clock was read: timing started")


@pytest.mark.parametrize("method, reducer, options", [
    ("evit", lambda: EvitReducer(), {}),
    ("tome", lambda: ToMeMerge(), {}),
    ("evit-training-free", lambda: TrainingFreeEvit(pooling=("always", "never")), {"pooling": ("always", "never")}),
])
def test_apply_config_equals_the_same_reducer_applied_by_hand(method, reducer, options) -> None:
    data = images(3)
    by_config = apply_config(tiny_vit(), config(method, 0.6, 0.5, **options))
    by_hand = apply_token_reducer(tiny_vit(), list(LAYERS), [0.6, 0.5], reducer())
    with torch.no_grad():
        assert torch.equal(by_config(data), by_hand(data))


@pytest.mark.parametrize("depth, in_a_row", [(12, (2, 3, 4, 5)), (6, (0, 1, 2, 3)), (4, (0, 1, 2, 3))])
def test_the_space_reduces_one_block_more_in_a_row_leaving_the_papers_tokens(depth, in_a_row) -> None:
    """Besides the paper's blocks, one earlier, one later and every other, the space has one block
    more than the paper's in a row from the earlier placement's first, each at the rate that leaves
    as many tokens at the end as the paper's blocks do at the nominal rate."""
    found = [c.keep_rates for c in candidate_configs(depth, ("evit",), (0.7, 0.5)) if c.layers == in_a_row]
    assert found == [(round(0.7 ** 0.75, 4),) * 4, (round(0.5 ** 0.75, 4),) * 4]  # 4 blocks leave what 3 leave


def test_prune_or_pool_is_chosen_per_layer() -> None:
    data = images(3)
    with torch.no_grad():
        outputs = {choice: apply_config(tiny_vit(), config("evit-training-free", 0.6, 0.6, pooling=choice))(data)
                   for choice in ("always", "never", ("always", "never"), ("never", "always"))}
    assert len({tuple(output.flatten().tolist()) for output in outputs.values()}) == 4


def test_a_config_round_trips_through_json_and_refuses_what_does_not_fit() -> None:
    for item in CANDIDATES:
        assert TokenConfig.from_dict(json.loads(json.dumps(item.to_dict()))) == item
    with pytest.raises(ValueError, match="did you mean 'tome'"):
        TokenConfig("tomme", LAYERS, (0.7, 0.7))
    with pytest.raises(ValueError, match="no option 'fuse'"):
        config("tome", 0.7, 0.7, fuse=False)
    with pytest.raises(ValueError, match="gives 3 values for 2 layers"):
        config("evit-training-free", 0.7, 0.7, pooling=("always",) * 3)
    with pytest.raises(ValueError, match="one keep rate each"):
        TokenConfig("evit", LAYERS, (0.7,))


def test_the_whole_result_is_json() -> None:
    values = json.loads(json.dumps(result_json(run_tune(fake_clock()))))
    assert sum(trial["chosen"] for trial in values["trials"]) == 1 and values["trials"][0]["label"] == "unpatched"


@pytest.mark.parametrize("chosen", [config("evit-training-free", 0.7, 0.7, pooling=("always", "never")),
                                    config("tome", 0.7, 0.7), config("evit", 0.8, 0.6), None])
def test_the_recipe_fragment_loads_through_the_recipe_schema_and_fine_tunes_that_setting(chosen) -> None:
    fragment = yaml.safe_load(yaml.safe_dump(recipe_fragment(chosen)))
    recipe = recipe_from_dict({**yaml.safe_load(yaml.safe_dump(TINY)), **fragment})
    assert recipe.reduction.enabled == (chosen is not None)
    if chosen is not None:
        rates = list(chosen.keep_rates)
        assert recipe.reduction.layers == list(chosen.layers)
        assert recipe.reduction.keep_rate == (rates[0] if len(set(rates)) == 1 else rates)
        assert recipe_reducer(recipe).describe() == token_reducer_of(chosen).describe()
        assert prepare_model(recipe).evit_state.keep_rates == rates


def test_a_recipe_with_a_keep_rate_per_layer_needs_one_for_each() -> None:
    with pytest.raises(RecipeError, match="reduction.keep_rate: got 3 rates for 2 layers"):
        recipe_from_dict({**TINY, "reduction": {"layers": [1, 2], "keep_rate": [0.9, 0.8, 0.7]}})
    assert keep_rate_at(0.5, [0.5, 0.7], "cosine", 0.0, 1.0) == [0.75, 0.85]


def token_reducer_of(item: TokenConfig):
    return evit_patch.reducers.token_method(item.method).build(item.option_values)


# the command line

TINY_ARGS = ["vit_tiny_patch16_224", *[f"--model-arg={key}={value}" for key, value in TINY_VIT.items()]]


def write_images(folder: Path, count: int) -> Path:
    from PIL import Image

    folder.mkdir()
    for index in range(count):
        Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()).save(folder / f"{index}.png")
    return folder


def bad_run(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as stopped:
        tune_main(argv, clock=refusing_clock)
    err = capsys.readouterr().err
    assert stopped.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("extra, fragment", [
    (["--batch-size", "0"], "batch size"), (["--images", "1"], "at least 2 images"),
    (["--target-speedup", "-1"], "positive number"), (["--target-speedup", "nan"], "positive number"),
    (["--max-agreement-loss", "2"], "in [0, 1]"), (["--time-budget", "0"], "time budget"),
    (["--keep-rates", "1.5"], "keep_rate"), (["--device", "gpu7"], "not a device"),
])
def test_nonsense_numbers_are_one_line_before_any_timing(extra, fragment, tmp_path, capsys) -> None:
    assert fragment in bad_run([*TINY_ARGS, "--folder", str(write_images(tmp_path / "in", 4)), *extra], capsys)


def test_bad_image_folders_are_one_line_before_any_timing(tmp_path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert "holds no images" in bad_run([*TINY_ARGS, "--folder", str(tmp_path / "empty")], capsys)
    broken = write_images(tmp_path / "broken", 3)
    (broken / "2.png").write_bytes(b"not a png")
    assert "2.png' is not an image" in bad_run([*TINY_ARGS, "--folder", str(broken)], capsys)
    assert "is not a folder" in bad_run([*TINY_ARGS, "--folder", str(broken / "0.png")], capsys)
    assert "does not exist" in bad_run([*TINY_ARGS, "--folder", str(broken), "--out", str(tmp_path / "no" / "x")], capsys)


def test_models_it_cannot_build_or_patch_and_unreachable_targets_are_one_line_before_any_timing(tmp_path, capsys) -> None:
    folder = str(write_images(tmp_path / "in", 4))
    assert "not a timm model name" in bad_run(["vit_tinyy_patch16_224", "--folder", folder], capsys)
    cnn = ["resnet10t", "--model-arg=num_classes=5", "--folder", folder]
    assert "cannot patch" in bad_run(cnn, capsys)
    small = [*TINY_ARGS, "--folder", folder, "--methods", "evit", "--keep-rates", "0.5"]
    assert "no setting can run 40.0x fast" in bad_run([*small, "--target-speedup", "40"], capsys)


def test_the_command_line_writes_its_four_files(tmp_path, capsys) -> None:
    prefix = tmp_path / "out" / "tuned"
    prefix.parent.mkdir()
    tune_main([*TINY_ARGS, "--folder", str(write_images(tmp_path / "in", 8)), "--methods", "evit", "tome",
               "--keep-rates", "0.7", "--batch-size", "4", "--time-budget", "120", "--out", str(prefix)])
    assert "chosen: " in capsys.readouterr().out
    for suffix in (".md", ".json", ".png", ".recipe.yaml"):
        assert prefix.with_name("tuned" + suffix).stat().st_size > 0
    fragment = yaml.safe_load(prefix.with_name("tuned.recipe.yaml").read_text())
    recipe_from_dict({**yaml.safe_load(yaml.safe_dump(TINY)), **fragment})
    assert "## The front" in prefix.with_name("tuned.md").read_text()


def test_a_target_unmet_after_timing_writes_the_files_then_is_one_line(tmp_path, capsys, monkeypatch) -> None:
    clock = fake_clock()  # every setting the command line makes runs as fast as the unpatched model
    monkeypatch.setattr(tune_module, "_model", lambda args: clock.on(tiny_vit()))
    prefix = tmp_path / "tuned"
    with pytest.raises(SystemExit) as stopped:
        tune_main([*TINY_ARGS, "--folder", str(write_images(tmp_path / "in", 8)), "--methods", "evit", "--keep-rates",
                   "0.5", "--batch-size", "4", "--target-speedup", "1.1", "--out", str(prefix)], clock=clock)
    captured = capsys.readouterr()
    assert stopped.value.code == 2 and captured.err.count("\n") == 1, captured.err
    assert "no measured setting is 1.1x fast: the fastest found runs 1.00x" in captured.err
    assert f"wrote {prefix}.json" in captured.out
    written = json.loads(prefix.with_name("tuned.json").read_text())
    assert written["target_not_met"] in captured.err and len(written["trials"]) > 1
    assert "**Target not met:**" in prefix.with_name("tuned.md").read_text()


@pytest.mark.parametrize("kwargs, shape", [({"img_size": 32}, (3, 32, 32)),
                                           ({"img_size": 28, "patch_size": 4, "in_chans": 1}, (1, 28, 28))])
def test_fashion_mnist_comes_at_the_models_size_and_channels(kwargs, shape) -> None:
    model = timm.create_model("deit_tiny_patch16_224", depth=1, **kwargs)
    images, labels = fashion_mnist(3, model)
    raw = FashionMNIST("test")
    assert images.shape == (3, *shape) and torch.equal(labels, raw.labels[:3])
    assert torch.equal(images[:, :1], torch.nn.functional.interpolate(raw.images[:3], size=shape[1:], mode="bilinear")
                       if shape[1] != 28 else raw.images[:3])
    assert all(torch.equal(images[:, channel], images[:, 0]) for channel in range(shape[0]))
    model(images)  # the model takes them


def test_the_command_is_a_console_script_and_a_module() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["evit-tune"] == "evit_patch.tools.tune:main"
    result = subprocess.run([sys.executable, "-m", "evit_patch.tools.tune", "--help"], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0 and "--target-speedup" in result.stdout, result.stderr

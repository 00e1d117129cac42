"""Every bad input to the command lines is one line and an exit status, found before any
data is loaded or any file is written: recipe values, YAML, checkpoints, run folders."""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import pytest
import timm
import torch
import yaml
from finetune_helpers import TINY, write_recipe
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import evit_patch.train.loop as loop
from evit_patch.cost import count_macs
from evit_patch.tools.evaluate import main as evaluate_main
from evit_patch.tools.finetune import main as finetune_main
from evit_patch.train.recipe import Recipe, RecipeError, load_recipe, reduces_tokens


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with a hash of its bytes."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def run_cli(main, argv: list[str], capsys) -> tuple[int, str]:
    """Exit status and stderr of a command line run in-process."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    return stopped.value.code, capsys.readouterr().err


def assert_one_line(err: str, *fragments: str) -> None:
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err and "weights_only" not in err  # never the advice to load unsafely
    for fragment in fragments:
        assert fragment in err, (fragment, err)


BAD_VALUES = [
    ("reduction.keep_rate=0", "reduction.keep_rate: must be in (0, 1]"),
    ("reduction.keep_rate=1.5", "reduction.keep_rate: must be in (0, 1]"),
    ("reduction.keep_rate=-0.1", "reduction.keep_rate: must be in (0, 1]"),
    ("reduction.keep_rate=.nan", "reduction.keep_rate: must be in (0, 1]"),
    ("reduction.layers=[3]", "reduction.layers: block index 3 is out of range; the model has blocks 0..2"),  # depth 3
    ("reduction.layers=[1, 1]", "reduction.layers: must not repeat a block index"),
    ("reduction.layers=[]", "reduction.layers: must name at least one block index in [0, 3)"),
    ("optimizer.lr=-1e-3", "optimizer.lr: must be a positive learning rate, got -0.001"),
    ("optimizer.lr=.inf", "optimizer.lr: must be a positive learning rate"),
    ("optimizer.min_lr=1.0", "optimizer.min_lr: must be at most optimizer.lr"),
    ("train.batch_size=0", "train.batch_size: must be at least 1, got 0"),
    ("train.epochs=0", "train.epochs: must be at least 1"),
    ("train.epochs=-2", "train.epochs: must be at least 1"),
    ("train.max_steps_per_epoch=0", "train.max_steps_per_epoch: must be at least 1"),
    ("train.ema_decay=1.0", "train.ema_decay: must be in (0, 1)"),
    ("data.label_smoothing=1.0", "data.label_smoothing: must be in [0, 1)"),
    ("model.name=vit_tiny_patch16_22", "model.name: timm has no model 'vit_tiny_patch16_22'; did you mean "
                                       "'vit_tiny_patch16_224'?"),
    ("model.kwargs.dept=3", "model.kwargs: timm cannot build 'vit_tiny_patch16_224'"),
    ("optimizer.name=adamx", "optimizer.name: timm has no optimizer 'adamx'; did you mean 'adamax'?"),
    ("dynamicvit.enabled=true", "dynamicvit.enabled and reduction.enabled are both true"),
]


@pytest.mark.parametrize("override,message", BAD_VALUES, ids=[case[0] for case in BAD_VALUES])
def test_a_bad_recipe_value_is_one_line_naming_the_key_before_any_work(tmp_path, capsys, no_work, override,
                                                                       message) -> None:
    recipe = write_recipe(tmp_path)
    before = snapshot(tmp_path)
    code, err = run_cli(finetune_main, [str(recipe), "--set", override, "--no-report"], capsys)
    assert code == 2
    assert_one_line(err, message)
    assert snapshot(tmp_path) == before


def test_dynamicvit_layers_and_keep_rate_are_checked_against_the_model(tmp_path) -> None:
    switch = ["reduction.enabled=false", "dynamicvit.enabled=true"]
    with pytest.raises(RecipeError, match=r"^dynamicvit.layers: block index 3 is out of range; the model has blocks 0..2"):
        load_recipe(write_recipe(tmp_path), switch)  # default layers [3, 6, 9] on a 3-block model
    with pytest.raises(RecipeError, match=r"^dynamicvit.keep_rate: must be in \(0, 1\]"):
        load_recipe(write_recipe(tmp_path), [*switch, "dynamicvit.layers=[1]", "dynamicvit.keep_rate=0"])
    assert load_recipe(write_recipe(tmp_path), [*switch, "dynamicvit.layers=[1, 2]"]).dynamicvit.layers == [1, 2]


def test_unused_method_settings_are_not_held_against_the_recipe(tmp_path) -> None:
    """EViT's default layers [3, 6, 9] do not fit the 3-block model, but are not used when EViT is off."""
    recipe = load_recipe(write_recipe(tmp_path), ["reduction.enabled=false", "reduction.layers=[3, 6, 9]"])
    assert recipe.reduction.enabled is False


def test_layers_are_checked_against_the_depth_the_kwargs_give(tmp_path) -> None:
    assert load_recipe(write_recipe(tmp_path), ["model.kwargs.depth=5", "reduction.layers=[4]"]).reduction.layers == [4]
    with pytest.raises(RecipeError, match=r"^reduction.layers: block index 4 is out of range; the model has blocks 0..3"):
        load_recipe(write_recipe(tmp_path), ["model.kwargs.depth=4", "reduction.layers=[4]"])


def test_teacher_and_oracle_models_are_checked_too(tmp_path) -> None:
    with pytest.raises(RecipeError, match=r"^teacher.name: timm has no model 'deit_tiny_patch16'; did you mean"):
        load_recipe(write_recipe(tmp_path), ["teacher.name=deit_tiny_patch16"])
    with pytest.raises(RecipeError, match=r"^teacher.kwargs: timm cannot build 'deit_tiny_patch16_224' .*'dept'"):
        load_recipe(write_recipe(tmp_path), ["teacher.name=deit_tiny_patch16_224", "teacher.kwargs.dept=3"])
    oracle = ["reduction.method=oracle", f"oracle.name={TINY['model']['name']}", "model.kwargs.depth=5", "reduction.layers=[4]",
              *(f"oracle.kwargs.{key}={value}" for key, value in TINY["model"]["kwargs"].items())]
    with pytest.raises(RecipeError, match=r"^reduction.layers: the oracle is read at the same blocks, and oracle.name "
                                          r"'vit_tiny_patch16_224' has blocks 0..2, not 4"):
        load_recipe(write_recipe(tmp_path), oracle)  # the oracle is read at the student's layers


def test_output_dir_that_is_a_file_is_refused(tmp_path, capsys, no_work) -> None:
    (tmp_path / "taken").write_text("a file")
    for output in (tmp_path / "taken", tmp_path / "taken" / "run"):
        code, err = run_cli(finetune_main, [str(write_recipe(tmp_path)), "--set", f"train.output_dir={output}"], capsys)
        assert code == 2
        assert_one_line(err, "train.output_dir:", "which is a file" if output.name == "run" else "is a file")
    assert (tmp_path / "taken").read_text() == "a file"


def test_unreadable_recipes_are_one_line(tmp_path, capsys, no_work) -> None:
    cases = {
        "broken.yaml": ("model: {name: [vit\n".encode(), "is not valid YAML", "line 2, column 1"),
        "latin1.yaml": ("model: {name: caf\xe9}\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9 at offset 17)"),
        "list.yaml": (b"- 1\n- 2\n", "--set needs a recipe that is a mapping of sections; this one is a list"),
    }
    for name, (content, *fragments) in cases.items():
        (tmp_path / name).write_bytes(content)
        code, err = run_cli(finetune_main, [str(tmp_path / name), "--set", "train.epochs=1"], capsys)
        assert code == 2
        assert_one_line(err, repr(str(tmp_path / name)) if name != "list.yaml" else "", *fragments)
    code, err = run_cli(finetune_main, [str(tmp_path)], capsys)
    assert code == 2
    assert_one_line(err, f"recipe path {str(tmp_path)!r} is a folder")


@pytest.mark.parametrize("override,fragment", [
    ("train.epochs=[1", "--set train.epochs: the value '[1' is not valid YAML"),
    ("train.epochs={", "--set train.epochs: the value '{' is not valid YAML"),
    ("train.epochs=2001-13-01", "--set train.epochs: the value '2001-13-01' is not valid YAML: month must be in"),
    ("train.epochs", "--set expects key.sub=value, got 'train.epochs'"),
    ("train.epochs.x=1", "'epochs' is not a section"),
])
def test_unparsable_overrides_are_one_line(tmp_path, capsys, no_work, override, fragment) -> None:
    code, err = run_cli(finetune_main, [str(write_recipe(tmp_path)), "--set", override], capsys)
    assert code == 2
    assert_one_line(err, fragment)


def test_an_empty_section_takes_overrides(tmp_path) -> None:
    path = write_recipe(tmp_path)
    values = yaml.safe_load(path.read_text())
    values["keep_rate_schedule"] = None
    path.write_text(yaml.safe_dump(values))
    recipe = load_recipe(path, ["keep_rate_schedule.kind=cosine"])
    assert recipe.keep_rate_schedule.kind == "cosine"


# ---- checkpoints given to --resume, and runs given to evaluate ----


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A one-epoch, two-step run of the tiny recipe."""
    folder = tmp_path_factory.mktemp("finished")
    recipe = load_recipe(write_recipe(folder, {"train": {"epochs": 1, "max_steps_per_epoch": 2,
                                                         "benchmark_batch_size": 4}}))
    return loop.train(recipe, show_progress=False)


def copy_run(run: Path, destination: Path) -> Path:
    shutil.copytree(run, destination)
    return destination


def resume_cli(tmp_path: Path, checkpoint: Path, capsys, *overrides: str) -> tuple[int, str]:
    """Resume the tiny recipe (one more epoch, into a fresh folder) from ``checkpoint``."""
    recipe = write_recipe(tmp_path, {"train": {"epochs": 2, "max_steps_per_epoch": 2, "output_dir": str(tmp_path / "new")}},
                          name="resume.yaml")
    sets = [arg for override in overrides for arg in ("--set", override)]
    return run_cli(finetune_main, [str(recipe), "--resume", str(checkpoint), "--no-report", *sets], capsys)


def test_resuming_a_checkpoint_of_another_width_names_the_key(finished_run, tmp_path, capsys, no_work) -> None:
    code, err = resume_cli(tmp_path, finished_run / "checkpoint.pth", capsys, "model.kwargs.embed_dim=48",
                           "model.kwargs.num_heads=2")
    assert code == 2
    assert_one_line(err, "is a training checkpoint of vit_tiny_patch16_224", "model.kwargs.embed_dim (32 there, 48 here)")
    assert not (tmp_path / "new").exists()


def test_a_checkpoint_without_its_recipe_that_does_not_fit_is_one_line(finished_run, tmp_path, capsys) -> None:
    state = torch.load(finished_run / "checkpoint.pth", weights_only=True)
    del state["recipe"]
    torch.save(state, tmp_path / "no_recipe.pth")
    code, err = resume_cli(tmp_path, tmp_path / "no_recipe.pth", capsys, "model.kwargs.embed_dim=48")
    assert code == 1
    warning, error = err.splitlines(keepends=True)
    assert warning.startswith("warning: ") and "stores no recipe to compare with" in warning
    assert_one_line(error, "holds weights of another model:",
                    "cls_token is [1, 1, 32] there and [1, 1, 48] in this recipe's model")
    assert not (tmp_path / "new" / "checkpoint.pth").exists()


def test_weights_alone_are_not_a_checkpoint_to_resume(finished_run, tmp_path, capsys, no_work) -> None:
    torch.save(load_file(str(finished_run / "model.safetensors")), tmp_path / "state_dict.pth")
    for path, kind in ((finished_run / "model.safetensors", "is a safetensors weights file"),
                       (tmp_path / "state_dict.pth", "is a bare state_dict")):
        code, err = resume_cli(tmp_path, path, capsys)
        assert code == 1
        assert_one_line(err, f"--resume {str(path)!r} {kind}", "not a training checkpoint",
                        f"set model.checkpoint: {str(path)!r}")
    assert not (tmp_path / "new").exists()


class RunsACommand:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_random_bytes_and_foreign_pickles_are_one_line_and_never_unpickled(tmp_path, capsys, no_work,
                                                                          monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "random.pth").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "pickle.pth").write_bytes(pickle.dumps({"model": RunsACommand()}))
    torch.save({"model": RunsACommand()}, tmp_path / "torch_pickle.pth")
    expected = {"random.pth": "is corrupt or truncated, or not a PyTorch checkpoint",
                "empty.pth": "is corrupt or truncated (empty)",
                "pickle.pth": "is corrupt or truncated, or not a PyTorch checkpoint",
                "torch_pickle.pth": "holds Python objects (posix.system) besides tensors, which are never loaded"}
    for name, fragment in expected.items():
        code, err = resume_cli(tmp_path, tmp_path / name, capsys)
        assert code == 1
        assert_one_line(err, repr(str(tmp_path / name)), fragment)
    assert not (tmp_path / "pwned").exists()


def test_evaluate_on_an_incomplete_or_damaged_run_is_one_line(finished_run, tmp_path, capsys) -> None:
    missing = copy_run(finished_run, tmp_path / "missing")
    (missing / "model.safetensors").unlink()
    garbage = copy_run(finished_run, tmp_path / "garbage")
    (garbage / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    wider = copy_run(finished_run, tmp_path / "wider")
    values = yaml.safe_load((wider / "recipe.yaml").read_text())
    values["model"]["kwargs"].update(embed_dim=48)
    (wider / "recipe.yaml").write_text(yaml.safe_dump(values))
    broken = copy_run(finished_run, tmp_path / "broken")
    (broken / "recipe.yaml").write_text("model: [\n")
    not_mapping = copy_run(finished_run, tmp_path / "not_mapping")
    (not_mapping / "recipe.yaml").write_text("[1, 2]\n")
    bad_value = copy_run(finished_run, tmp_path / "bad_value")
    values = yaml.safe_load((bad_value / "recipe.yaml").read_text())
    values["reduction"]["keep_rate"] = 2.0
    (bad_value / "recipe.yaml").write_text(yaml.safe_dump(values))
    cases = [
        (missing, 2, "model.safetensors' not found: a run writes it when its last epoch ends", "--resume"),
        (garbage, 1, "is not a readable safetensors file"),
        (wider, 1, "holds weights of another model: cls_token is [1, 1, 32] there and [1, 1, 48]"),
        (broken, 2, "recipe.yaml' is not a valid run recipe: it is not valid YAML"),
        (not_mapping, 2, "is not a valid run recipe: recipe: expected a mapping of keys"),
        (bad_value, 2, "is not a valid run recipe: reduction.keep_rate: must be in (0, 1]"),
        (tmp_path / "absent", 2, "is not a folder; pass the output folder of a fine-tuning run"),
    ]
    for run, status, *fragments in cases:
        code, err = run_cli(evaluate_main, [str(run)], capsys)
        assert code == status, (run, err)
        assert_one_line(err, *fragments)


def test_count_macs_refuses_a_model_on_the_meta_device() -> None:
    kwargs = TINY["model"]["kwargs"]
    with torch.device("meta"):
        meta = timm.create_model(TINY["model"]["name"], **kwargs)
    with pytest.raises(ValueError, match=r"^count_macs: .* is on the meta device .* model.to_empty\(device='cpu'\)"):
        count_macs(meta)
    real = timm.create_model(TINY["model"]["name"], **kwargs)
    assert count_macs(meta.to_empty(device="cpu")) == count_macs(real) > 0  # the advice works


# ---- the recipe loader under random documents and overrides ----

SCHEMA_KEYS = sorted(
    f"{section}.{key}" for section, keys in {
        "reduction": ["enabled", "layers", "keep_rate", "fuse", "method", "seed", "proportional_attention", "pooling"],
        "dynamicvit": ["enabled", "layers", "keep_rate", "freeze_epochs", "ratio_weight"],
        "keep_rate_schedule": ["kind", "start_epoch", "epochs"],
        "data": ["dataset", "root", "download", "train_subset", "workers", "random_erasing", "mixup",
                 "label_smoothing", "train_split"],
        "optimizer": ["name", "lr", "min_lr", "weight_decay", "warmup_epochs", "clip_grad"],
        "train": ["epochs", "batch_size", "max_steps_per_epoch", "amp", "ema_decay", "seed", "output_dir"],
        "teacher": ["name", "kind", "alpha", "tau", "checkpoint"],
        "structural": ["enabled", "target_macs", "match_evit", "shape"],
        "token_labeling": ["enabled", "dense_weight"],
        "model": ["name", "pretrained", "checkpoint"],  # not kwargs: a random depth of 10**9 is not the point
    }.items() for key in keys) + ["reduction", "train", "teacher", "oracle", "structural", "data"]

TRICKY_YAML = ["2001-13-01", "0x_", "!!int x", "!!float abc", "!!binary x", "[1", "{", "'", "&a [*a]", "? [1]\n: 2",
               "[" * 1000, "1e999", "-.inf", ".nan", "~", "{a: 1, a: 2}", "!!python/object:os.system x"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10), st.integers(-2**70, 2**70),
                    st.sampled_from([10**400, -10**400]),
                    st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1.5), st.text(max_size=12),
                    st.sampled_from(["evit", "tome", "cosine", "bf16", "adamw", "imagefolder", "deit_tiny_patch16_224",
                                     "", ".", "/", "README.md", "2001-13-01", "\x00"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
keys = st.one_of(st.sampled_from(SCHEMA_KEYS), st.text(max_size=15).filter(lambda key: not key.startswith("model")))


def put(document: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    node = document
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[last] = value


@st.composite
def recipe_files(draw) -> bytes:
    """Mostly the tiny recipe with random keys set to random values; sometimes any text or bytes."""
    kind = draw(st.sampled_from(["mutated", "mutated", "mutated", "text", "bytes", "tricky"]))
    if kind == "text":
        return draw(st.text(max_size=80)).encode()
    if kind == "tricky":
        return f"model: {draw(st.sampled_from(TRICKY_YAML))}\n".encode()
    if kind == "bytes":
        return draw(st.binary(max_size=80))
    document = yaml.safe_load(yaml.safe_dump(TINY))
    for key, value in draw(st.lists(st.tuples(keys, values), max_size=4)):
        put(document, key, value)
    return yaml.safe_dump(document, allow_unicode=draw(st.booleans())).encode()


raw_values = st.one_of(st.text(max_size=20), st.sampled_from(TRICKY_YAML), values.map(
    lambda value: yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()))
overrides = st.lists(st.tuples(keys, raw_values).map(lambda pair: f"{pair[0]}={pair[1]}") | st.text(max_size=20),
                     max_size=3)


TINY_YAML = yaml.safe_dump(TINY).encode()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=recipe_files(), sets=overrides)
@example(content=TINY_YAML, sets=[f"optimizer.lr={10**400}"])  # too large for a float
@example(content=TINY_YAML, sets=["train.epochs=" + "[" * 1000])  # nested past the recursion limit
@example(content=TINY_YAML, sets=["train.epochs=2001-13-01"])  # YAML's timestamp with month 13
@example(content=TINY_YAML, sets=["train.output_dir=" + "x" * 300])  # a file name too long for the OS
def test_the_recipe_loader_returns_a_valid_recipe_or_one_recipe_error(content: bytes, sets: list[str]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "recipe.yaml"
        path.write_bytes(content)
        before = sorted(os.listdir(folder))
        try:
            recipe = load_recipe(path, sets)
        except RecipeError as error:
            assert str(error) and "\n" not in str(error)
            return
        finally:
            assert sorted(os.listdir(folder)) == before  # loading writes nothing
    assert isinstance(recipe, Recipe)
    train, optimizer = recipe.train, recipe.optimizer
    assert train.epochs >= 1 and train.batch_size >= 1 and train.eval_batch_size >= 1
    assert train.max_steps_per_epoch is None or train.max_steps_per_epoch >= 1
    assert math.isfinite(optimizer.lr) and 0 < optimizer.lr and 0 <= optimizer.min_lr <= optimizer.lr
    assert not Path(train.output_dir).is_file()
    assert timm.is_model(recipe.model.name)
    if reduces_tokens(recipe):
        assert 0 < recipe.reduction.keep_rate <= 1
        depth = recipe.model.kwargs.get("depth", 3)
        assert recipe.reduction.layers and len(set(recipe.reduction.layers)) == len(recipe.reduction.layers)
        assert all(0 <= layer < depth for layer in recipe.reduction.layers)

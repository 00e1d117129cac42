"""The install contract: ``import evit_patch``, ``apply_evit`` and a forward need only torch
and timm; every call that needs an optional package raises one ``ImportError`` naming the
extra that installs it. Checked in a fresh interpreter in which the optional packages
cannot be imported, whether they are installed or not (dev installs them all)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL = ("fvcore", "torch_pruning", "matplotlib", "onnx", "onnxscript", "onnxruntime", "transformers", "open_clip")

# None in sys.modules: `import` raises ModuleNotFoundError and importlib.util.find_spec (which
# torch uses to probe for onnx) answers "not installed", whether the package is installed or not
BLOCKED = f"""
import sys
sys.modules.update(dict.fromkeys({OPTIONAL!r}))
"""

CORE = """
import timm, torch
import evit_patch
model = evit_patch.apply_evit(timm.create_model("vit_tiny_patch16_224", img_size=64, depth=4), [1, 2], 0.5).eval()
with torch.no_grad():
    logits = model(torch.randn(2, 3, 64, 64))
macs = evit_patch.count_macs(model)
import evit_patch.tools.export, evit_patch.tools.finetune, evit_patch.width_pruning  # lazy: import without extras
results = {"logits": list(logits.shape), "macs": macs}
"""

# each call that needs an extra, on the model CORE built, and the extra its error must name
NEEDS_EXTRA = {
    "count_macs_fvcore": ('evit_patch.count_macs(model, engine="fvcore")', "fvcore"),
    "prune_to_macs": ("evit_patch.width_pruning.prune_to_macs(timm.create_model('vit_tiny_patch16_224', img_size=64, "
                      "depth=2), 1e6)", "prune"),
    "apply_pruned_shape": ("evit_patch.width_pruning.apply_pruned_shape(timm.create_model('vit_tiny_patch16_224', "
                           "img_size=64, depth=1), {'heads': [1], 'mlp_hidden': [8]})", "prune"),
    "export_onnx": ("evit_patch.tools.export.export_onnx(model, 'unused.onnx')", "export"),
    "transformers_source": ("__import__('evit_patch.train.transformers_source').train.transformers_source"
                            ".build_transformers_model('vit', {})", "transformers"),
    "plot": ("__import__('benchmark_scripts').load_benchmark('training_curves').plot({'a': {1: 1.0}}, "
             "__import__('pathlib').Path('unused.png'))", "plot"),
}


def guarded(case: str, call: str) -> str:
    """``call`` as code that records in ``results[case]`` the error it raised (or none)."""
    return (f"try:\n    {call}\nexcept ImportError as error:\n    results[{case!r}] = [type(error).__name__, str(error)]\n"
            f"else:\n    results[{case!r}] = ['no error', '']\n")


CALLS = "".join(guarded(case, call) for case, (call, _) in NEEDS_EXTRA.items())


def run_blocked(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (in ``cwd``, tests/ importable) without the optional packages."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(ROOT / "tests")]))
    return subprocess.run([sys.executable, "-c", f"import json\n{BLOCKED}\n{code}"], capture_output=True, text=True,
                          cwd=cwd, env=env)


@pytest.fixture(scope="module")
def without_extras(tmp_path_factory) -> dict:
    """What the core did and what each call that needs an extra raised, all in one interpreter."""
    result = run_blocked(CORE + CALLS + "print(json.dumps(results))", tmp_path_factory.mktemp("blocked"))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_import_patch_forward_and_count_need_only_torch_and_timm(without_extras) -> None:
    assert without_extras["logits"] == [2, 1000] and without_extras["macs"] > 0


def test_the_blocker_really_blocks(tmp_path) -> None:
    """The contract can fail: a top-level import of an optional package is refused."""
    result = run_blocked("import evit_patch\nimport fvcore", tmp_path)
    assert result.returncode != 0 and "import of fvcore halted" in result.stderr


@pytest.mark.parametrize("case", list(NEEDS_EXTRA))
def test_a_call_that_needs_an_extra_names_it(without_extras, case: str) -> None:
    kind, message = without_extras[case]
    assert kind == "ImportError" and f'pip install "evit_patch[{NEEDS_EXTRA[case][1]}]"' in message, message


def test_every_named_extra_is_declared_and_dev_pulls_them_all() -> None:
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {extra for _, extra in NEEDS_EXTRA.values()} <= set(extras)
    dev = next(entry for entry in extras["dev"] if entry.startswith("evit_patch["))
    assert set(dev[len("evit_patch["):-1].split(",")) == set(extras) - {"dev"}

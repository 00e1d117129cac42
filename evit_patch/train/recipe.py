"""Fine-tuning recipes: YAML validated into typed dataclasses before any work starts.

An unknown key names the closest valid one; a wrong type names the expected one; a file
the recipe points at must exist. ``--set a.b=c`` overrides are applied before checking.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from evit_patch.models import DEFAULT_EVIT_LAYERS


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the key and the fix."""


@dataclass
class ModelConfig:
    name: str
    pretrained: bool = False  # timm's published weights from the hub
    pretrained_file: Optional[str] = None  # the same from a local file, through timm's loader (resizes pos-embed)
    checkpoint: Optional[str] = None  # this exact architecture's state_dict (.safetensors / .pth), loaded weights-only
    kwargs: dict = field(default_factory=dict)  # timm.create_model keywords (img_size, depth, ...)


@dataclass
class EvitConfig:
    enabled: bool = True
    layers: list[int] = field(default_factory=lambda: [3, 6, 9])
    keep_rate: float = 0.7
    fuse: bool = True  # reducer evit: fuse the unkept tokens (false: "EViT w/o fusion")
    reducer: Literal["evit", "random", "tome", "oracle"] = "evit"  # the method at these layers and counts
    seed: int = 0  # reducer random: its generator's seed
    proportional_attention: bool = True  # reducer tome: keys weighted by the patches each token holds
    oracle_at_eval: bool = True  # reducer oracle: the oracle decides at evaluation too (else the model's own attention)


@dataclass
class PrunedShapeConfig:
    heads: list[int]  # attention heads kept, per block
    mlp_hidden: list[int]  # MLP hidden channels kept, per block


@dataclass
class StructuralConfig:
    """Width pruning (heads, MLP channels) in place of EViT, to the same MACs; turns EViT off."""
    enabled: bool = False
    target_macs: Optional[float] = None  # MACs of one image; null: EViT's cost (match_evit)
    match_evit: bool = True  # budget = the model's cost with EViT at evit.layers / evit.keep_rate (only read for that)
    importance: Literal["magnitude", "random"] = "magnitude"
    shape: Optional[PrunedShapeConfig] = None  # the widths to prune to; a run records the ones it found here


@dataclass
class DynamicViTConfig:
    enabled: bool = False  # learned pruning (DynamicViT) instead of EViT; needs evit.enabled: false
    layers: list[int] = field(default_factory=lambda: [3, 6, 9])
    keep_ratio: float = 0.7  # stage s keeps keep_ratio**s of the image tokens
    backbone_lr_scale: float = 0.01  # backbone lr = optimizer lr x this; predictors get the full lr
    freeze_epochs: int = 5  # backbone frozen for the first epochs
    ratio_weight: float = 2.0
    distill_weight: float = 0.5  # KL to the unpruned teacher's logits
    token_distill_weight: float = 0.5  # MSE to its final tokens at the kept ones


@dataclass
class KeepRateScheduleConfig:
    kind: Literal["constant", "cosine"] = "constant"
    start_epoch: float = 0.0  # keep rate 1.0 before this epoch
    epochs: float = 0.0  # then cosine from 1.0 to the target over this many epochs


@dataclass
class DataConfig:
    dataset: Literal["fashion_mnist", "imagefolder"] = "fashion_mnist"
    root: Optional[str] = None  # fashion_mnist: folder of IDX files; imagefolder: folder with train/ and val/
    download: bool = False  # fashion_mnist only: allowed to fetch it when absent
    train_split: str = "train"
    eval_split: str = "val"
    train_subset: Optional[int] = None  # first N training images (quick runs)
    eval_subset: Optional[int] = None
    workers: int = 0
    auto_augment: Optional[str] = None  # timm's name, e.g. "rand-m9-mstd0.5-inc1"
    random_erasing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    label_smoothing: float = 0.0


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 2e-5  # per 512 images of batch (linear scaling)
    min_lr: float = 2e-6
    weight_decay: float = 1e-6
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-7
    clip_grad: Optional[float] = None


@dataclass
class TeacherConfig:
    name: str
    pretrained: bool = False
    pretrained_file: Optional[str] = None
    checkpoint: Optional[str] = None
    kwargs: dict = field(default_factory=dict)
    kind: Literal["soft", "hard"] = "soft"
    alpha: float = 0.5  # weight of the distillation term (unused when token labeling is on)
    tau: float = 1.0


@dataclass
class TokenLabelingConfig:
    """LV-ViT token labeling: the recipe's teacher (an unpatched LV-ViT) labels every patch."""

    enabled: bool = False
    dense_weight: float = 0.5  # weight of the kept tokens' loss against their patches' labels
    cls_weight: float = 1.0  # weight of the class token's loss against the image label


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 256
    max_steps_per_epoch: Optional[int] = None
    amp: Literal["none", "bf16", "fp16"] = "none"
    ema_decay: Optional[float] = None
    seed: int = 0
    output_dir: str = "runs/evit"
    eval_batch_size: int = 256
    benchmark_batch_size: int = 32


@dataclass
class Recipe:
    model: ModelConfig
    evit: EvitConfig = field(default_factory=EvitConfig)
    dynamicvit: DynamicViTConfig = field(default_factory=DynamicViTConfig)
    keep_rate_schedule: KeepRateScheduleConfig = field(default_factory=KeepRateScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    teacher: Optional[TeacherConfig] = None
    oracle: Optional[ModelConfig] = None  # reducer oracle: the trained model that scores tokens (default: `model`)
    structural: StructuralConfig = field(default_factory=StructuralConfig)
    token_labeling: TokenLabelingConfig = field(default_factory=TokenLabelingConfig)


def _check_type(value: Any, hint: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _check_type(value, next(a for a in args if a is not type(None)), key)
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise RecipeError(f"{key}: {value!r} is not one of {list(args)}{hint}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{key}: expected a list, got {value!r}")
        return [_check_type(item, args[0], f"{key}[{i}]") for i, item in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    expected = dict if origin is dict else hint
    if not isinstance(value, expected) or (expected in (int, float) and isinstance(value, bool)):
        raise RecipeError(f"{key}: expected {getattr(expected, '__name__', expected)}, got {value!r}")
    return value


def _build(cls: type, values: Any, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise RecipeError(f"{prefix.rstrip('.') or 'recipe'}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys here: {names}"
            raise RecipeError(f"unknown recipe key '{prefix}{key}'{hint}")
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise RecipeError(f"recipe is missing required key(s) {[prefix + m for m in missing]}")
    return cls(**{key: _check_type(value, hints[key], f"{prefix}{key}") for key, value in values.items()})


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """``a.b=c`` pairs into the nested mapping; values are read as YAML scalars."""
    for override in overrides:
        path, separator, raw = override.partition("=")
        if not separator:
            raise RecipeError(f"--set expects key.sub=value, got {override!r}")
        *parents, last = path.split(".")
        node = values
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"--set {override!r}: {part!r} is not a section")
        node[last] = yaml.safe_load(raw)
    return values


def _resolve_files(recipe: Recipe, base: Path) -> None:
    """Make weight paths absolute and check that the files exist."""
    for section_name in ("model", "teacher", "oracle"):
        section = getattr(recipe, section_name)
        for key in ("checkpoint", "pretrained_file"):
            path = section and getattr(section, key)
            if path:
                resolved = _resolve(path, base)
                if not resolved.is_file():
                    raise RecipeError(f"{section_name}.{key}: file {path!r} does not exist")
                setattr(section, key, str(resolved))
    _check_data_folders(recipe.data, base)
    _check_oracle(recipe)


def _check_oracle(recipe: Recipe) -> None:
    """An oracle must know which tokens matter: trained weights, not a random start."""
    if not (recipe.evit.enabled and recipe.evit.reducer == "oracle") or recipe.oracle is not None:
        return
    model = recipe.model
    if not (model.pretrained or model.pretrained_file or model.checkpoint):
        raise RecipeError("evit.reducer: oracle needs a trained oracle: add an `oracle:` section (name and "
                          "checkpoint / pretrained_file), or start `model` from trained weights, which then "
                          "serve as the oracle")


def _check_structural(recipe: Recipe) -> None:
    """A structurally pruned run needs a budget, and runs without EViT."""
    structural = recipe.structural
    if structural.enabled and structural.shape is None and structural.target_macs is None and not structural.match_evit:
        raise RecipeError("structural: enabled without a budget; set structural.target_macs, "
                          "or structural.match_evit: true to take the cost of the evit settings")
    if structural.enabled:
        recipe.evit.enabled = False


def _check_data_folders(data: DataConfig, base: Path) -> None:
    """The data folders a recipe names must exist (Fashion-MNIST may be downloaded if allowed)."""
    if data.dataset == "imagefolder":
        if not data.root:
            raise RecipeError("data.root: an imagefolder dataset needs the folder holding its train/ and val/ splits")
        root = _resolve(data.root, base)
        for key in ("train_split", "eval_split"):
            if not (root / getattr(data, key)).is_dir():
                raise RecipeError(f"data.{key}: folder {str(root / getattr(data, key))!r} does not exist "
                                  f"(data.root={data.root!r}; set data.root, or --set data.{key}=NAME)")
        data.root = str(root)
    elif data.root and not data.download:
        root = _resolve(data.root, base)
        if not root.is_dir():
            raise RecipeError(f"data.root: folder {data.root!r} does not exist; point it at the Fashion-MNIST IDX "
                              "files, drop it to use /usr/share/datasets/fashion-mnist, or set data.download: true")
        data.root = str(root)


def _check_token_labeling(recipe: Recipe) -> None:
    """Token labeling needs LV-ViTs on both sides and a teacher with trained weights: its
    per-token predictions are the labels, so a missing or untrained one is refused here."""
    if not recipe.token_labeling.enabled:
        return
    lvvits = sorted(DEFAULT_EVIT_LAYERS)  # one entry per LV-ViT variant
    teacher = recipe.teacher
    if recipe.model.name.split(".")[0] not in lvvits:
        raise RecipeError(f"token_labeling: model.name {recipe.model.name!r} has no token-labeling head; "
                          f"use an LV-ViT ({', '.join(lvvits)}) or set token_labeling.enabled: false")
    if teacher is None:
        raise RecipeError("token_labeling: token labels come from a teacher, and the recipe has none; add a "
                          f"'teacher' section: an unpatched LV-ViT ({', '.join(lvvits)}) with trained weights")
    if teacher.name.split(".")[0] not in lvvits:
        raise RecipeError(f"token_labeling: teacher.name {teacher.name!r} gives no per-token predictions; "
                          f"use an LV-ViT ({', '.join(lvvits)})")
    if not (teacher.pretrained or teacher.pretrained_file or teacher.checkpoint):
        raise RecipeError("token_labeling: the teacher has no trained weights, so its token labels would be "
                          "noise; set teacher.checkpoint or teacher.pretrained_file")
    for key in ("dense_weight", "cls_weight"):
        if getattr(recipe.token_labeling, key) < 0:
            raise RecipeError(f"token_labeling.{key}: a loss weight must be >= 0, "
                              f"got {getattr(recipe.token_labeling, key)}")


def _resolve(path: str, base: Path) -> Path:
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() or candidate.exists() else base / candidate


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; relative file paths are taken from the
    current folder, else from the project root the recipe lives under."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} does not exist")
    values = yaml.safe_load(path.read_text()) or {}
    recipe = _build(Recipe, apply_overrides(values, overrides or []), "")
    if recipe.dynamicvit.enabled and recipe.evit.enabled:
        raise RecipeError("dynamicvit.enabled and evit.enabled are both true; a run prunes with one method: "
                          "set evit.enabled: false (or dynamicvit.enabled: false)")
    _resolve_files(recipe, path.resolve().parent.parent)
    _check_structural(recipe)
    _check_token_labeling(recipe)
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def recipe_from_dict(values: dict) -> Recipe:
    return _build(Recipe, values, "")

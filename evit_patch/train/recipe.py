"""Fine-tuning recipes: YAML validated into typed dataclasses before any work starts.

An unknown key names the closest valid one; a wrong type names the expected one; a file
the recipe points at must exist; every value is checked against its range (keep rates,
layers against the model's depth, learning rates, batch sizes, the timm model name)
before any data or model is built. ``--set a.b=c`` overrides are applied before checking.
Every problem is one :class:`RecipeError` of one line naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import timm
import timm.optim
import torch
import yaml
from torch import nn

from evit_patch.core.arguments import validated_keep_rates, validated_layers
from evit_patch.models import DEFAULT_EVIT_LAYERS
from evit_patch.reducers.registry import option_defaults, token_method


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the key and the fix."""


@dataclass
class ModelConfig:
    name: str
    pretrained: bool = False  # timm's published weights from the hub
    pretrained_file: Optional[str] = None  # the same from a local file, through timm's loader (resizes pos-embed)
    checkpoint: Optional[str] = None  # this exact architecture's state_dict (.safetensors / .pth), loaded weights-only
    kwargs: dict = field(default_factory=dict)  # timm.create_model keywords (img_size, depth, ...)
    source: Literal["timm", "transformers"] = "timm"  # transformers: name is a checkpoint folder or a model type


@dataclass
class ReductionConfig:
    """The token method at these layers and counts. Its options (``fuse``, ``seed``, ...) are
    fields that :func:`reduction_config` adds, one per option of a registered method."""

    enabled: bool = True
    layers: list[int] = field(default_factory=lambda: [3, 6, 9])
    keep_rate: float = 0.7
    method: str = "evit"  # a registered token method (evit_patch.reducers.registry)


_REDUCTION_CONFIGS: dict[str, type] = {}


def reduction_config() -> type:
    """:class:`ReductionConfig` with a field for every option of every registered token method."""
    options = option_defaults()
    key = repr(options)
    if key not in _REDUCTION_CONFIGS:
        fields = [(name, hint, field(default=default)) for name, (hint, default) in options.items()]
        _REDUCTION_CONFIGS[key] = dataclasses.make_dataclass("ReductionConfig", fields, bases=(ReductionConfig,))
    return _REDUCTION_CONFIGS[key]


@dataclass
class PrunedShapeConfig:
    heads: list[int]  # attention heads kept, per block
    mlp_hidden: list[int]  # MLP hidden channels kept, per block


@dataclass
class StructuralConfig:
    """Width pruning (heads, MLP channels) in place of EViT, to the same MACs; turns EViT off."""
    enabled: bool = False
    target_macs: Optional[float] = None  # MACs of one image; null: EViT's cost (match_evit)
    match_evit: bool = True  # budget: the model's cost with EViT at reduction.layers / keep_rate (only read for that)
    importance: Literal["magnitude", "random"] = "magnitude"
    shape: Optional[PrunedShapeConfig] = None  # the widths to prune to; a run records the ones it found here


@dataclass
class DynamicViTConfig:
    enabled: bool = False  # learned pruning (DynamicViT) instead of EViT; needs reduction.enabled: false
    layers: list[int] = field(default_factory=lambda: [3, 6, 9])
    keep_rate: float = 0.7  # per stage, compounding: stage s keeps keep_rate**s of the image tokens
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
    random_erasing_mode: Literal["const", "rand", "pixel"] = "const"  # timm's RandomErasing fill (DeiT: pixel)
    repeated_augmentation: bool = False  # timm's RepeatAugSampler: each image 3x per epoch on different processes
    crop_pct: Optional[float] = None  # evaluation centre crop as a fraction of the resize; null: the model's own
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
    warmup_lr: float = 1e-7  # not scaled by the batch
    clip_grad: Optional[float] = None
    schedule_step: Literal["update", "epoch"] = "update"  # cosine per update, or per epoch as DeiT's loop steps it
    scale_min_lr: bool = True  # min_lr scaled with the batch like lr (false: used as given)
    warmup_prefix: bool = False  # the cosine spans the steps after warm-up (timm's warmup_prefix), not the whole run


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
    reduction: ReductionConfig = field(default_factory=lambda: reduction_config()())
    dynamicvit: DynamicViTConfig = field(default_factory=DynamicViTConfig)
    keep_rate_schedule: KeepRateScheduleConfig = field(default_factory=KeepRateScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    teacher: Optional[TeacherConfig] = None
    oracle: Optional[ModelConfig] = None  # method oracle: the trained model that scores tokens (default: `model`)
    structural: StructuralConfig = field(default_factory=StructuralConfig)
    token_labeling: TokenLabelingConfig = field(default_factory=TokenLabelingConfig)

    @property
    def evit(self) -> ReductionConfig:
        """The former name of :attr:`reduction` (deprecated; warns)."""
        warnings.warn("Recipe.evit is now Recipe.reduction (it configures any token method); evit goes in the next "
                      "release", DeprecationWarning, stacklevel=2)
        return self.reduction


def reduces_tokens(recipe: Recipe) -> bool:
    """Whether the recipe runs its ``reduction`` section's token method: enabled, and not
    replaced by width pruning (``structural.enabled``), which runs without it."""
    return recipe.reduction.enabled and not recipe.structural.enabled


RENAMED: dict[str, str] = {"evit": "reduction", "reduction.reducer": "reduction.method",
                           "dynamicvit.keep_ratio": "dynamicvit.keep_rate"}
"""Keys of earlier versions -> their names now. A recipe that still uses one is refused,
naming the new key; a recipe a run stored (checkpoint, run folder) is read with the new names."""


def with_current_names(values: Any) -> Any:
    """A copy of a stored recipe's mapping with the keys of :data:`RENAMED` under their names now."""
    values = copy.deepcopy(values)
    for old, new in RENAMED.items():  # a section first, then the keys inside it
        *parents, last = old.split(".")
        node = values
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and last in node and new.split(".")[-1] not in node:
            node[new.split(".")[-1]] = node.pop(last)
    return values


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
            raise RecipeError(f"{key}: {_short(value)} is not one of {list(args)}{hint}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{key}: expected a list, got {_short(value)}")
        return [_check_type(item, args[0], f"{key}[{i}]") for i, item in enumerate(value)]
    if hint is ReductionConfig:
        return _build(reduction_config(), value, f"{key}.")
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise RecipeError(f"{key}: {_short(value)} is too large for a float") from None
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    expected = dict if origin is dict else hint
    if not isinstance(value, expected) or (expected in (int, float) and isinstance(value, bool)):
        raise RecipeError(f"{key}: expected {getattr(expected, '__name__', expected)}, got {_short(value)}")
    return value


def _build(cls: type, values: Any, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise RecipeError(f"{prefix.rstrip('.') or 'recipe'}: expected a mapping of keys, got {_short(values)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if f"{prefix}{key}" in RENAMED:
            raise RecipeError(f"recipe key '{prefix}{key}' is now '{RENAMED[prefix + key]}': rename it in the recipe "
                              f"(or the --set)")
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys here: {names}"
            raise RecipeError(f"unknown recipe key '{prefix}{_short(key, quote=False)}'{hint}")
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise RecipeError(f"recipe is missing required key(s) {[prefix + m for m in missing]}")
    return cls(**{key: _check_type(value, hints[key], f"{prefix}{key}") for key, value in values.items()})


def apply_overrides(values: Any, overrides: list[str]) -> dict:
    """``a.b=c`` pairs into the nested mapping; values are read as YAML scalars."""
    if overrides and not isinstance(values, dict):
        raise RecipeError(f"--set needs a recipe that is a mapping of sections; this one is a "
                          f"{type(values).__name__}: {_short(values)}")
    for override in overrides:
        path, separator, raw = override.partition("=")
        if not separator:
            raise RecipeError(f"--set expects key.sub=value, got {_short(override)}")
        *parents, last = path.split(".")
        node = values
        for part in parents:
            if node.get(part) is None:  # an empty section (`teacher:`) takes keys like a missing one
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise RecipeError(f"--set {_short(override)}: {part!r} is not a section")
        node[last] = parse_yaml(raw, f"--set {_short(path, quote=False)}: the value {_short(raw)}")
    return values


def parse_yaml(text: str, what: str) -> Any:
    """``yaml.safe_load`` whose every failure is a one-line :class:`RecipeError` about ``what``."""
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise RecipeError(f"{what} is not valid YAML: {_one_line(error.problem or error.context)}{where}") from None
    except (yaml.YAMLError, ValueError, OverflowError) as error:  # bad dates, `!!int x`, `0x_`
        raise RecipeError(f"{what} is not valid YAML: {_one_line(error)}") from None
    except RecursionError:
        raise RecipeError(f"{what} is not valid YAML: nested too deeply") from None


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _short(value: Any, limit: int = 80, quote: bool = True) -> str:
    """A value as one line of at most ``limit`` characters (its repr, or str for keys)."""
    text = repr(value) if quote else str(value)
    text = _one_line(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _resolve_files(recipe: Recipe, base: Path, missing: Optional[list[str]] = None) -> None:
    """Make weight paths absolute and check that the files exist (or, given ``missing``,
    list the absent ones there)."""
    for section_name in ("model", "teacher", "oracle"):
        section = getattr(recipe, section_name)
        for key in ("checkpoint", "pretrained_file"):
            path = section and getattr(section, key)
            if path:
                resolved = _resolve(path, base)
                problem = _unreadable(resolved, path)
                if problem:
                    _absent(f"{section_name}.{key}: {problem}", missing)
                    continue
                setattr(section, key, str(resolved))
    _check_data_folders(recipe.data, base, missing)
    _check_oracle(recipe)


def _unreadable(path: Path, shown: str) -> Optional[str]:
    """Why the weights file at ``path`` (``shown`` as the recipe gives it) cannot be read,
    in words, or None when it can."""
    if path.is_dir():
        return f"{shown!r} is a folder, not a weights file; pass the .safetensors or .pth file in it"
    try:
        with open(path, "rb"):
            return None
    except FileNotFoundError:
        return f"file {shown!r} does not exist"
    except OSError as error:
        return f"file {shown!r} cannot be read: {error.strerror or error}"


def _absent(message: str, missing: Optional[list[str]]) -> None:
    """A file or folder the recipe names is not there: refused, or listed in ``missing``."""
    if missing is None:
        raise RecipeError(message)
    missing.append(message)


def _check_oracle(recipe: Recipe) -> None:
    """An oracle must know which tokens matter: trained weights, not a random start."""
    if not (reduces_tokens(recipe) and recipe.reduction.method == "oracle") or recipe.oracle is not None:
        return
    model = recipe.model
    if not (model.pretrained or model.pretrained_file or model.checkpoint):
        raise RecipeError("reduction.method: oracle needs a trained oracle: add an `oracle:` section (name and "
                          "checkpoint / pretrained_file), or start `model` from trained weights, which then "
                          "serve as the oracle")


def _check_variant(reduction: ReductionConfig) -> None:
    """``reduction.variant`` chooses between EViT's own forms; the training-free one always merges."""
    try:
        token_method(reduction.method)
    except ValueError as error:
        raise RecipeError(f"reduction.method: {error}") from None
    if reduction.variant == "paper":
        return
    if reduction.method != "evit":
        raise RecipeError(f"reduction.variant: {reduction.variant!r} is a form of reducer evit, not of {reduction.method!r}; "
                          "set reduction.method: evit, or drop reduction.variant")
    if not reduction.fuse:
        raise RecipeError(f"reduction.variant: {reduction.variant!r} merges every unkept token into a kept one and has "
                          "no no-fusion form; drop reduction.fuse: false, or use reduction.variant: paper")


def _check_structural(recipe: Recipe) -> None:
    """A structurally pruned run needs a budget (it runs without the token method: :func:`reduces_tokens`)."""
    structural = recipe.structural
    if structural.enabled and structural.shape is None and structural.target_macs is None and not structural.match_evit:
        raise RecipeError("structural: enabled without a budget; set structural.target_macs, "
                          "or structural.match_evit: true to take the cost of the reduction settings")


def _check_data_folders(data: DataConfig, base: Path, missing: Optional[list[str]] = None) -> None:
    """The data folders a recipe names must exist (Fashion-MNIST may be downloaded if allowed)."""
    if data.dataset == "imagefolder":
        if not data.root:
            raise RecipeError("data.root: an imagefolder dataset needs the folder holding its train/ and val/ splits")
        root = _resolve(data.root, base)
        absent = [key for key in ("train_split", "eval_split") if not (root / getattr(data, key)).is_dir()]
        for key in absent:
            _absent(f"data.{key}: folder {str(root / getattr(data, key))!r} does not exist "
                    f"(data.root={data.root!r}; set data.root, or --set data.{key}=NAME)", missing)
        if not absent:
            data.root = str(root)
    elif data.root and not data.download:
        root = _resolve(data.root, base)
        if not root.is_dir():
            _absent(f"data.root: folder {data.root!r} does not exist; point it at the Fashion-MNIST IDX "
                    "files, drop it to use /usr/share/datasets/fashion-mnist, or set data.download: true", missing)
            return
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
        if not getattr(recipe.token_labeling, key) >= 0:
            raise RecipeError(f"token_labeling.{key}: a loss weight must be >= 0, "
                              f"got {getattr(recipe.token_labeling, key)}")


def _finite_at_least(low: float) -> Callable[[Any], bool]:
    return lambda value: math.isfinite(value) and value >= low


def _finite_above(low: float) -> Callable[[Any], bool]:
    return lambda value: math.isfinite(value) and value > low


_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    # key: (test, what the value must be); None values of optional keys are not tested
    "train.epochs": (lambda v: v >= 1, "at least 1 (the number of epochs to train)"),
    "train.batch_size": (lambda v: v >= 1, "at least 1"),
    "train.max_steps_per_epoch": (lambda v: v >= 1, "at least 1 (or null: the whole training set)"),
    "train.eval_batch_size": (lambda v: v >= 1, "at least 1"),
    "train.benchmark_batch_size": (lambda v: v >= 1, "at least 1"),
    "train.ema_decay": (lambda v: 0 < v < 1, "in (0, 1) (or null: no EMA)"),
    "train.seed": (lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"),
    "optimizer.lr": (_finite_above(0.0), "a positive learning rate"),
    "optimizer.min_lr": (_finite_at_least(0.0), "a learning rate >= 0"),
    "optimizer.weight_decay": (_finite_at_least(0.0), ">= 0"),
    "optimizer.warmup_epochs": (_finite_at_least(0.0), ">= 0"),
    "optimizer.warmup_lr": (_finite_at_least(0.0), "a learning rate >= 0"),
    "optimizer.clip_grad": (_finite_above(0.0), "a positive gradient norm (or null: no clipping)"),
    "keep_rate_schedule.start_epoch": (_finite_at_least(0.0), ">= 0"),
    "keep_rate_schedule.epochs": (_finite_at_least(0.0), ">= 0"),
    "reduction.seed": (lambda v: 0 <= v < 2**63, "an integer in [0, 2**63)"),
    "data.train_subset": (lambda v: v >= 1, "at least 1 (or null: all images)"),
    "data.eval_subset": (lambda v: v >= 1, "at least 1 (or null: all images)"),
    "data.workers": (lambda v: v >= 0, ">= 0"),
    "data.random_erasing": (lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    "data.crop_pct": (lambda v: 0 < v <= 1, "a fraction in (0, 1] (or null: the model's own)"),
    "data.mixup": (_finite_at_least(0.0), ">= 0 (0: off)"),
    "data.cutmix": (_finite_at_least(0.0), ">= 0 (0: off)"),
    "data.label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "dynamicvit.backbone_lr_scale": (_finite_at_least(0.0), ">= 0"),
    "dynamicvit.freeze_epochs": (lambda v: v >= 0, ">= 0"),
    "dynamicvit.ratio_weight": (_finite_at_least(0.0), "a loss weight >= 0"),
    "dynamicvit.distill_weight": (_finite_at_least(0.0), "a loss weight >= 0"),
    "dynamicvit.token_distill_weight": (_finite_at_least(0.0), "a loss weight >= 0"),
    "teacher.alpha": (lambda v: 0 <= v <= 1, "a weight in [0, 1]"),
    "teacher.tau": (_finite_above(0.0), "a positive temperature"),
    "token_labeling.dense_weight": (_finite_at_least(0.0), "a loss weight >= 0"),
    "token_labeling.cls_weight": (_finite_at_least(0.0), "a loss weight >= 0"),
    "structural.target_macs": (_finite_above(0.0), "a positive number of MACs (or null: EViT's cost)"),
}

_DEPTHS: dict[tuple[str, str], Optional[int]] = {}  # (timm name, repr of kwargs) -> number of blocks


def check_values(recipe: Recipe) -> None:
    """Every value in its range, the model names known to timm, and the method's layers
    and keep rates as the methods themselves check them, against the model's depth: all
    before any data or model is built."""
    for key, (test, requirement) in _RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(recipe, section), name) if getattr(recipe, section) is not None else None
        if value is not None and not test(value):
            raise RecipeError(f"{key}: must be {requirement}, got {_short(value)}")
    if recipe.optimizer.min_lr > recipe.optimizer.lr:
        raise RecipeError(f"optimizer.min_lr: must be at most optimizer.lr ({recipe.optimizer.lr}), "
                          f"got {recipe.optimizer.min_lr}")
    _check_optimizer_name(recipe.optimizer.name)
    _check_variant(recipe.reduction)
    _check_output_dir(recipe.train.output_dir)
    for section in ("model", "teacher", "oracle"):
        config = getattr(recipe, section)
        if config is not None:
            _check_model_name(section, config.name, getattr(config, "source", "timm"))
    depth = _model_depth("model", recipe.model)
    if recipe.teacher is not None:
        _model_depth("teacher", recipe.teacher)  # its kwargs, before data is loaded for it
    oracle_depth = _model_depth("oracle", recipe.oracle) if recipe.oracle is not None else None
    structural = recipe.structural
    if reduces_tokens(recipe) or (structural.enabled and structural.shape is None and structural.target_macs is None):
        _check_method_arguments("reduction", recipe.reduction.layers, recipe.reduction.keep_rate, depth)
        reads_oracle = reduces_tokens(recipe) and recipe.reduction.method == "oracle" and oracle_depth is not None
        if reads_oracle and max(recipe.reduction.layers) >= oracle_depth:
            raise RecipeError(f"reduction.layers: the oracle is read at the same blocks, and oracle.name "
                              f"{recipe.oracle.name!r} has blocks 0..{oracle_depth - 1}, not {max(recipe.reduction.layers)}")
    if recipe.dynamicvit.enabled:
        _check_method_arguments("dynamicvit", recipe.dynamicvit.layers, recipe.dynamicvit.keep_rate, depth)
    if structural.shape is not None and depth is not None:
        for key in ("heads", "mlp_hidden"):
            widths = getattr(structural.shape, key)
            if len(widths) != depth or not all(width >= 1 for width in widths):
                raise RecipeError(f"structural.shape.{key}: must list one width >= 1 per block ({depth} blocks), "
                                  f"got {_short(widths)}")


def _check_method_arguments(section: str, layers: list[int], rate: float, depth: Optional[int]) -> None:
    """The layer and keep-rate checks ``apply_evit`` and ``apply_dynamicvit`` make."""
    try:
        validated_keep_rates(rate, 1)
    except (TypeError, ValueError) as error:
        raise RecipeError(f"{section}.keep_rate: {_without_subject(error, 'keep_rate')}") from None
    if depth is None:  # not a ViT with `blocks`: applying the method names the reason
        return
    try:
        validated_layers(layers, depth)
    except (TypeError, ValueError) as error:
        raise RecipeError(f"{section}.layers: {_without_subject(error, 'layers')}") from None


def _without_subject(error: Exception, subject: str) -> str:
    """``keep_rate must be ...`` as ``must be ...``, for a message that names the key first."""
    text = _one_line(error)
    for prefix in (f"{subject}: ", f"{subject} "):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


def _check_optimizer_name(name: str) -> None:
    """timm's optimizer names, with its optional ``lookahead_`` prefix."""
    base = name.lower().split("_")[-1]
    known = timm.optim.list_optimizers()
    if base not in known:
        close = difflib.get_close_matches(base, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "; see timm.optim.list_optimizers()"
        raise RecipeError(f"optimizer.name: timm has no optimizer {_short(name)}{hint}")


def _check_model_name(section: str, name: str, source: str = "timm") -> None:
    if source == "transformers" or timm.is_model(name):  # a transformers name is checked with its config
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else "; see timm.list_models()"
    raise RecipeError(f"{section}.name: timm has no model {_short(name)}{hint}")


def _model_depth(section: str, config: ModelConfig | TeacherConfig) -> Optional[int]:
    """How many transformer blocks the section's model has (None: no ``blocks``).

    The model is built on the meta device, so no memory is allocated and nothing is
    downloaded; a constructor that cannot run there is built on the CPU instead. Bad
    ``kwargs`` show here, before any data is loaded.
    """
    if getattr(config, "source", "timm") == "transformers":
        return _transformers_depth(section, config)
    key = (config.name, repr(config.kwargs))
    if key not in _DEPTHS:
        if not all(isinstance(name, str) for name in config.kwargs):
            raise RecipeError(f"{section}.kwargs: keys must be keyword names, got {_short(list(config.kwargs))}")
        try:
            with torch.device("meta"):
                model = timm.create_model(config.name, **config.kwargs)
        except Exception:  # a constructor that needs real tensors; the CPU build says what is wrong
            try:
                model = timm.create_model(config.name, **config.kwargs)
            except Exception as error:  # timm and model constructors raise anything on bad kwargs
                raise RecipeError(f"{section}.kwargs: timm cannot build {config.name!r} with {_short(config.kwargs)} "
                                  f"({type(error).__name__}: {_short(str(error), 160, quote=False)})") from None
        blocks = getattr(model, "blocks", None)
        _DEPTHS[key] = len(blocks) if isinstance(blocks, (nn.Sequential, nn.ModuleList)) else None
    return _DEPTHS[key]


def _transformers_depth(section: str, config: ModelConfig) -> int:
    """The layer count of a transformers model, from its config alone (no weights are read)."""
    from evit_patch.train.transformers_source import transformers_config

    if config.pretrained or config.pretrained_file:
        raise RecipeError(f"{section}.pretrained: a transformers model's weights come from its checkpoint folder; "
                          f"set {section}.name to the folder (save_pretrained) and drop pretrained / pretrained_file")
    try:
        return int(transformers_config(config.name, config.kwargs).num_hidden_layers)
    except ValueError as error:
        raise RecipeError(f"{section}.{_one_line(error)}") from None


def _check_output_dir(output_dir: str) -> None:
    """The output folder, or the nearest part of its path that exists, must be a folder."""
    if not output_dir.strip():
        raise RecipeError("train.output_dir: must name a folder, got ''")
    try:
        path = Path(output_dir).expanduser()
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        is_folder = existing is None or existing.is_dir()
    except (OSError, ValueError, RuntimeError) as error:  # too long a name, a NUL byte, an unknown ~user
        raise RecipeError(f"train.output_dir: {_short(output_dir)} cannot be used: {_one_line(error)}") from None
    if not is_folder:
        where = "is a file" if existing == path else f"lies under {str(existing)!r}, which is a file"
        raise RecipeError(f"train.output_dir: {output_dir!r} {where}, not a folder; set train.output_dir "
                          "to a folder (new or holding a run)")


def _resolve(path: str, base: Path) -> Path:
    try:
        candidate = Path(path).expanduser()
        return candidate if candidate.is_absolute() or candidate.exists() else base / candidate
    except (OSError, ValueError, RuntimeError) as error:  # too long a name, a NUL byte, an unknown ~user
        raise RecipeError(f"path {_short(path)} cannot be used: {_one_line(error)}") from None


def _read_recipe_file(path: Path) -> Any:
    """The YAML document of a recipe file (an empty file: no keys)."""
    if path.is_dir():
        raise RecipeError(f"recipe path {str(path)!r} is a folder; pass a YAML recipe file (see recipes/)")
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise RecipeError(f"recipe file {str(path)!r} is not UTF-8 text (byte {error.object[error.start]:#04x} at "
                          f"offset {error.start}); save it as UTF-8") from None
    except OSError as error:
        raise RecipeError(f"recipe file {str(path)!r} cannot be read: {error.strerror}") from None
    values = parse_yaml(text, f"recipe file {str(path)!r}")
    return {} if values is None else values


def load_recipe(path: str | Path, overrides: list[str] | None = None, missing: Optional[list[str]] = None) -> Recipe:
    """Read, override and validate a recipe; relative file paths are taken from the
    current folder, else from the project root the recipe lives under. Given ``missing``
    (a dry run), absent data folders and weight files are listed there, not refused."""
    path = Path(path)
    values = _read_recipe_file(path)
    recipe = _build(Recipe, apply_overrides(values, overrides or []), "")
    if recipe.dynamicvit.enabled and recipe.reduction.enabled:
        raise RecipeError("dynamicvit.enabled and reduction.enabled are both true; a run prunes with one method: "
                          "set reduction.enabled: false (or dynamicvit.enabled: false)")
    _resolve_files(recipe, path.resolve().parent.parent, missing)
    _check_structural(recipe)
    _check_token_labeling(recipe)
    check_values(recipe)
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def recipe_from_dict(values: dict) -> Recipe:
    """A recipe a run stored (earlier versions' key names read as now)."""
    return _build(Recipe, with_current_names(values), "")

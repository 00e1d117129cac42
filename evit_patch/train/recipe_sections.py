"""The recipe's sections: pydantic models whose fields carry their types, ranges and resume policy.

Every section forbids unknown keys and takes values as YAML gives them, strictly (``"3"`` is
not an int, ``true`` is not 1); a float field also takes an int or a YAML 1.1 string such as
``1e-3``. A field's range is a constraint on it, with ``must`` (what the value must be, in
words) for the error; ``may_change`` says what a resumed run may change and what that does
(:mod:`evit_patch.train.resume`). Rules across fields are the models' validators; the whole
recipe is :mod:`evit_patch.train.recipe_schema`'s.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

_SCHEDULE = "the lr schedule follows the new recipe: from update {update} on the lr is what a fresh run of it has there"
_FROM_NOW = "applies from update {update} on"
_PLACE = "taken to be the same weights, moved"
_STARTING = "starting weights only: the checkpoint's weights are used"


def _as_float(value: Any) -> Any:
    """An int (not a bool) or a YAML 1.1 float string (``1e-3``, read as text) as a float."""
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise PydanticCustomError("too_large", "is too large for a float") from None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


Real = Annotated[float, BeforeValidator(_as_float)]


def _keep_rates(value: Any) -> Any:
    """A keep rate, or a list with one per layer, each taken as a float as :data:`Real` is."""
    rates = [_as_float(item) for item in (value if isinstance(value, list) else [value])]
    if not all(isinstance(rate, float) for rate in rates):
        raise PydanticCustomError("keyed", f"must be a number in (0, 1] or a list of them, one per layer; got {value!r}")
    return rates if isinstance(value, list) else rates[0]


KeepRates = Annotated[Union[float, list[float]], BeforeValidator(_keep_rates)]


def ranged(default: Any, must: str, may_change: Optional[str] = None, say: Optional[str] = None,
           **constraints: Any) -> Any:
    """A field whose value must satisfy ``constraints`` (``ge``, ``gt``, ``lt``, ``le``,
    ``allow_inf_nan``): the error says ``must be <must>`` (or ``say``, a whole phrase)."""
    return Field(default, json_schema_extra={"must": must, "may_change": may_change, "say": say}, **constraints)


def changeable(default: Any, may_change: str | dict[str, str]) -> Any:
    """A field a resumed run may change (``may_change``: what that does; per section, by name)."""
    return Field(default, json_schema_extra={"may_change": may_change})


class Section(BaseModel):
    """A recipe section: unknown keys are refused, values are taken strictly."""

    model_config = ConfigDict(extra="forbid", strict=True)


def refuse(message: str) -> PydanticCustomError:
    """A rule across fields that fails: ``message`` is printed as it is (it names the key)."""
    return PydanticCustomError("recipe", message)


class WeightsSource(Section):
    name: str
    pretrained: bool = changeable(False, {"model": _STARTING})  # timm's published weights from the hub
    pretrained_file: Optional[str] = changeable(None, {"model": _STARTING, "teacher": _PLACE, "oracle": _PLACE})
    checkpoint: Optional[str] = changeable(None, {"model": _STARTING, "teacher": _PLACE, "oracle": _PLACE})
    kwargs: dict = Field(default_factory=dict)  # timm.create_model keywords (img_size, depth, ...)

    def has_trained_weights(self) -> bool:
        return bool(self.pretrained or self.pretrained_file or self.checkpoint)


class ModelConfig(WeightsSource):
    """The model to fine-tune (``pretrained_file``: timm's loader, resizing pos-embed; ``checkpoint``:
    this exact architecture's state_dict, weights-only)."""

    source: Literal["timm", "transformers"] = "timm"  # transformers: name is a checkpoint folder or a model type


class TeacherConfig(WeightsSource):
    """A distillation teacher: a model, and how its outputs are learned from."""

    kind: Literal["soft", "hard"] = "soft"
    alpha: Real = ranged(0.5, "a weight in [0, 1]", ge=0, le=1)  # unused when token labeling is on
    tau: Real = ranged(1.0, "a positive temperature", gt=0, allow_inf_nan=False)


class PrunedShapeConfig(Section):
    heads: list[int]  # attention heads kept, per block
    mlp_hidden: list[int]  # MLP hidden channels kept, per block


class StructuralConfig(Section):
    """Width pruning (heads, MLP channels) in place of the token method, to the same MACs."""

    enabled: bool = False
    target_macs: Optional[Real] = ranged(None, "a positive number of MACs (or null: EViT's cost)", gt=0,
                                         allow_inf_nan=False)
    match_evit: bool = True  # budget: the cost with EViT at reduction.layers / keep_rate (only read for that)
    importance: Literal["magnitude", "random"] = "magnitude"
    shape: Optional[PrunedShapeConfig] = None  # the widths to prune to; a run records the ones it found here

    @model_validator(mode="after")
    def _has_budget(self) -> "StructuralConfig":
        if self.enabled and self.shape is None and self.target_macs is None and not self.match_evit:
            raise refuse("structural: enabled without a budget; set structural.target_macs, "
                         "or structural.match_evit: true to take the cost of the reduction settings")
        return self


_LOSS_WEIGHT = "a loss weight >= 0"


class DynamicViTConfig(Section):
    enabled: bool = False  # learned pruning (DynamicViT) instead of the token method; needs reduction.enabled: false
    layers: list[int] = Field(default_factory=lambda: [3, 6, 9])
    keep_rate: Real = 0.7  # per stage, compounding: stage s keeps keep_rate**s of the image tokens
    backbone_lr_scale: Real = ranged(0.01, ">= 0", ge=0, allow_inf_nan=False)  # backbone lr = optimizer lr x this
    freeze_epochs: int = ranged(5, ">= 0", ge=0)  # backbone frozen for the first epochs
    ratio_weight: Real = ranged(2.0, _LOSS_WEIGHT, ge=0, allow_inf_nan=False)
    distill_weight: Real = ranged(0.5, _LOSS_WEIGHT, ge=0, allow_inf_nan=False)  # KL to the unpruned teacher's logits
    token_distill_weight: Real = ranged(0.5, _LOSS_WEIGHT, ge=0, allow_inf_nan=False)  # MSE to its final tokens


class KeepRateScheduleConfig(Section):
    kind: Literal["constant", "cosine"] = "constant"
    start_epoch: Real = ranged(0.0, ">= 0", ge=0, allow_inf_nan=False)  # keep rate 1.0 before this epoch
    epochs: Real = ranged(0.0, ">= 0", ge=0, allow_inf_nan=False)  # then cosine from 1.0 to the target


_ALL_IMAGES = "at least 1 (or null: all images)"


class DataConfig(Section):
    dataset: Literal["fashion_mnist", "imagefolder"] = "fashion_mnist"
    root: Optional[str] = changeable(None, "taken to hold the same images")  # IDX files, or train/ and val/
    download: bool = changeable(False, "taken to hold the same images")  # fashion_mnist: may fetch it
    train_split: str = "train"
    eval_split: str = changeable("val", "evaluation only: earlier metrics lines were measured on the old split")
    train_subset: Optional[int] = ranged(None, _ALL_IMAGES, ge=1)  # first N training images (quick runs)
    eval_subset: Optional[int] = ranged(None, _ALL_IMAGES, "evaluation only: earlier metrics lines were measured on "
                                        "the old subset", ge=1)
    workers: int = ranged(0, ">= 0", "loading only", ge=0)
    auto_augment: Optional[str] = None  # timm's name, e.g. "rand-m9-mstd0.5-inc1"
    random_erasing: Real = ranged(0.0, "a probability in [0, 1]", ge=0, le=1)
    random_erasing_mode: Literal["const", "rand", "pixel"] = "const"  # timm's RandomErasing fill (DeiT: pixel)
    repeated_augmentation: bool = False  # timm's RepeatAugSampler: each image 3x per epoch on different processes
    crop_pct: Optional[Real] = ranged(None, "a fraction in (0, 1] (or null: the model's own)", "evaluation only: "
                                      "earlier metrics lines were measured with the old crop", gt=0, le=1)
    mixup: Real = ranged(0.0, ">= 0 (0: off)", ge=0, allow_inf_nan=False)
    cutmix: Real = ranged(0.0, ">= 0 (0: off)", ge=0, allow_inf_nan=False)
    label_smoothing: Real = ranged(0.0, "in [0, 1)", ge=0, lt=1)


_LR = "a learning rate >= 0"


class OptimizerConfig(Section):
    name: str = "adamw"
    lr: Real = ranged(2e-5, "a positive learning rate", _SCHEDULE, gt=0, allow_inf_nan=False)  # per 512 images
    min_lr: Real = ranged(2e-6, _LR, _SCHEDULE, ge=0, allow_inf_nan=False)
    weight_decay: Real = ranged(1e-6, ">= 0", _FROM_NOW, ge=0, allow_inf_nan=False)
    warmup_epochs: Real = ranged(0.0, ">= 0", _SCHEDULE, ge=0, allow_inf_nan=False)
    warmup_lr: Real = ranged(1e-7, _LR, _SCHEDULE, ge=0, allow_inf_nan=False)  # not scaled by the batch
    clip_grad: Optional[Real] = ranged(None, "a positive gradient norm (or null: no clipping)", _FROM_NOW, gt=0,
                                       allow_inf_nan=False)
    schedule_step: Literal["update", "epoch"] = changeable("update", _SCHEDULE)  # cosine per update, or per epoch
    scale_min_lr: bool = changeable(True, _SCHEDULE)  # min_lr scaled with the batch like lr (false: as given)
    warmup_prefix: bool = changeable(False, _SCHEDULE)  # the cosine spans the steps after warm-up (timm's)

    @model_validator(mode="after")
    def _min_lr_below_lr(self) -> "OptimizerConfig":
        if self.min_lr > self.lr:
            raise refuse(f"optimizer.min_lr: must be at most optimizer.lr ({self.lr}), got {self.min_lr}")
        return self


class TokenLabelingConfig(Section):
    """LV-ViT token labeling: the recipe's teacher (an unpatched LV-ViT) labels every patch."""

    enabled: bool = False
    dense_weight: Real = ranged(0.5, _LOSS_WEIGHT, say="a loss weight must be >= 0", ge=0,
                                allow_inf_nan=False)  # the kept tokens' loss against their patches' labels
    cls_weight: Real = ranged(1.0, _LOSS_WEIGHT, say="a loss weight must be >= 0", ge=0,
                              allow_inf_nan=False)  # the class token's loss against the image label


_AT_LEAST_1 = "at least 1"


class TrainConfig(Section):
    epochs: int = ranged(30, "at least 1 (the number of epochs to train)", _SCHEDULE, ge=1)
    batch_size: int = ranged(256, _AT_LEAST_1, ge=1)
    max_steps_per_epoch: Optional[int] = ranged(None, "at least 1 (or null: the whole training set)", ge=1)
    amp: Literal["none", "bf16", "fp16"] = changeable("none", _FROM_NOW + " (with a fresh loss scaler)")
    ema_decay: Optional[Real] = ranged(None, "in (0, 1) (or null: no EMA)", gt=0, lt=1)
    seed: int = ranged(0, "an integer in [0, 2**32)", ge=0, lt=2**32)
    output_dir: str = changeable("runs/evit", "the resumed run writes there")
    eval_batch_size: int = ranged(256, _AT_LEAST_1, "evaluation only", ge=1)
    benchmark_batch_size: int = ranged(32, _AT_LEAST_1, "evaluation only", ge=1)

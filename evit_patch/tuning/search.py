"""``tune``: measure token-reduction settings on the user's model, images and device, and hand
back every setting measured, the Pareto front of speed-up against agreement, and the one a
target asks for.

The search is cheap where it can be and measures where it must:

1. MACs (:func:`~evit_patch.cost.count_macs`) of every candidate, before anything is timed:
   the filter below, and a target no candidate could reach is refused at once.
2. The unpatched model's outputs, once; then a first look at every candidate on a few of the
   calibration images (:mod:`~evit_patch.tuning.screen`), and a pass of the promising share
   over the rest of them gives its agreement and mean KL (top-1 with labels). Quality passes
   run at :data:`QUALITY_BATCH` images or the timing batch if larger: answers do not depend
   on the batch, and a batch of 1 would make them the slowest part of the tune.
3. Speed, paired repeat by repeat with the unpatched model (:func:`~evit_patch.tuning.timing.paired_speeds`)
   on the given device and batch size, only for candidates that can still reach the front
   (:func:`could_reach_front`).
4. Held-out quality of the settings on the front (the others are beaten on what the choice
   reads, so a pass over the held-out images would only cost time).

The choice is made on the calibration images; every figure reported beside it is also given on
the held-out images, which the choice never saw.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections import OrderedDict
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from evit_patch.core.model_info import transformer_blocks
from evit_patch.core.token_patch import set_keep_rate
from evit_patch.cost import count_macs
from evit_patch.tuning.config import TokenConfig, apply_config
from evit_patch.tuning.front import Measured, UnreachableTarget, choose, dominates, pareto_front
from evit_patch.tuning.quality import agreement, calibration_split, mean_kl, top1
from evit_patch.tuning.result import Quality, TargetNotMet, Trial, TuneResult
from evit_patch.tuning.screen import SURVIVING_SHARE, screening_size, survivors
from evit_patch.tuning.space import candidate_configs
from evit_patch.tuning.timing import Clock, PairedSpeed, paired_speeds, spread_warning

MAC_SLACK = 1.25
"""How far above its MAC ratio a setting's speed-up is allowed to be before the search stops
considering it: fewer tokens rarely run faster than their MACs say (every reduction adds its
own small operations), but a shorter sequence can fit a cache the full one does not, so the
bound is loose by a quarter."""
QUALITY_BATCH = 32
"""Images per forward of the quality passes (the timing batch where that is larger)."""


def check_numbers(count: int, target_speedup: Optional[float], max_agreement_loss: Optional[float], batch_size: int,
                  time_budget_s: float, calibration: float) -> None:
    """A ValueError naming the first number of a tune request that makes no sense (``count``:
    how many images), before any work."""
    if count < 2:
        raise ValueError(f"tuning needs at least 2 images, some to choose on and some to report on; got {count}")
    if target_speedup is not None and not (math.isfinite(target_speedup) and target_speedup > 0):
        raise ValueError(f"the target speed-up must be a positive number, got {target_speedup}")
    if max_agreement_loss is not None and not 0 <= max_agreement_loss <= 1:
        raise ValueError(f"the largest allowed loss of agreement must be in [0, 1], got {max_agreement_loss}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"the batch size must be a whole number of at least 1, got {batch_size}")
    if not (math.isfinite(time_budget_s) and time_budget_s > 0):
        raise ValueError(f"the time budget must be a positive number of seconds, got {time_budget_s}")
    chosen = round(calibration * count) if 0 < calibration < 1 else 0
    if not 0 < chosen < count:
        raise ValueError(f"the calibration fraction must leave images on both sides: {calibration} of {count}")


def check_images(images: Tensor, labels: Optional[Tensor]) -> None:
    """A ValueError when ``images`` is not a batch of images or ``labels`` not one class each."""
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a (N, C, H, W) tensor, got {getattr(images, 'shape', type(images).__name__)}")
    if labels is not None and (labels.dim() != 1 or labels.shape[0] != images.shape[0]):
        raise ValueError(f"labels must hold one class per image ({images.shape[0]}), got shape {tuple(labels.shape)}")


def could_reach_front(candidate: TokenConfig, mac_ratio: float, calibration: Quality, measured: Sequence[Measured]) -> bool:
    """Whether timing ``candidate`` could change the front. Its speed-up is taken to be at
    most ``MAC_SLACK`` times its MAC ratio; if a setting already timed is at least that fast
    and at least as agreeing (better in one), it dominates the candidate whatever its timing
    says, so the candidate is not timed. The unpatched model (1.0x, full agreement) is one
    such setting: a candidate whose MACs promise no speed-up is never timed."""
    optimistic = Measured(candidate, MAC_SLACK * mac_ratio, calibration.agreement)
    return not any(dominates(point, optimistic) for point in measured)


def _logits(output: object) -> Tensor:
    """A classifier's logits: the tensor itself, or a transformers output's ``logits``."""
    return output if isinstance(output, Tensor) else output.logits


@torch.inference_mode()
def outputs(model: nn.Module, images: Tensor, batch_size: int, device: torch.device) -> Tensor:
    """``model``'s logits for ``images``, in batches on ``device``, as float32 on the CPU."""
    return torch.cat([_logits(model(images[start:start + batch_size].to(device))).float().cpu()
                      for start in range(0, images.shape[0], batch_size)])


def quality(reference: Tensor, logits: Tensor, labels: Optional[Tensor]) -> Quality:
    """Agreement and mean KL to the unpatched ``reference`` logits, top-1 with ``labels``."""
    return Quality(agreement(reference, logits), mean_kl(reference, logits),
                   None if labels is None else top1(logits, labels))


class Search:
    """The measuring half of :func:`tune`: one model's reference outputs, its image split, and
    the time budget (``out_of_time``)."""

    def __init__(self, patched: PatchedCopies, images: Tensor, labels: Optional[Tensor], reference: Tensor,
                 chosen_on: Tensor, reported_on: Tensor, batch_size: int, device: torch.device, progress: bool,
                 out_of_time: Callable[[], bool]) -> None:
        self.patched, self.images, self.labels, self.reference = patched, images, labels, reference
        self.chosen_on, self.reported_on = chosen_on, reported_on
        self.batch_size, self.device, self.progress, self.out_of_time = batch_size, device, progress, out_of_time
        self.beaten: set[TokenConfig] = set()  # not timed: a timed setting beats what their MACs allow
        self.screened: dict[TokenConfig, Quality] = {}  # the first look's quality, when there was a screen
        self.screened_out: set[TokenConfig] = set()  # looked at, and not among the survivors
        self.unpatched_speed: Optional[PairedSpeed] = None

    def full_quality(self, part: Tensor) -> Quality:
        """The unpatched model's own quality on ``part`` of the images."""
        return Quality(1.0, 0.0, None if self.labels is None else top1(self.reference[part], self.labels[part]))

    def logits_of(self, model: nn.Module, part: Tensor) -> Tensor:
        """``model``'s logits on ``part`` of the images (one pass)."""
        return outputs(model, self.images[part], self.batch_size, self.device)

    def quality_on(self, part: Tensor, logits: Tensor) -> Quality:
        """The quality of ``logits`` given for ``part`` of the images."""
        return quality(self.reference[part], logits, None if self.labels is None else self.labels[part])

    def quality_of(self, model: nn.Module, part: Tensor) -> Quality:
        """``model``'s quality on ``part`` of the images (one pass)."""
        return self.quality_on(part, self.logits_of(model, part))

    def calibrate(self, candidates: Sequence[TokenConfig], ratios: dict[TokenConfig, float]) -> dict[TokenConfig, Quality]:
        """Each promising candidate's quality on the calibration images, until the budget ends:
        every candidate is first looked at on a few of them (kept in ``screened``), and the
        :func:`~evit_patch.tuning.screen.survivors` of that look on the rest (no screen: every
        candidate on all of them)."""
        size = screening_size(len(self.chosen_on))
        first, rest = self.chosen_on[:size], self.chosen_on[size:]
        first_logits: dict[TokenConfig, Tensor] = {}
        for config in tqdm(candidates, desc="quality" if not len(rest) else "quality, first look",
                           disable=None if self.progress else True):
            if self.out_of_time():
                break
            first_logits[config] = self.logits_of(self.patched(config), first)
        if not len(rest):
            return {config: self.quality_on(first, logits) for config, logits in first_logits.items()}
        self.screened = {config: self.quality_on(first, logits) for config, logits in first_logits.items()}
        found: dict[TokenConfig, Quality] = {}
        promising = survivors({config: (ratios[config], seen.mean_kl) for config, seen in self.screened.items()})
        self.screened_out = set(self.screened) - set(promising)
        for config in tqdm(promising, desc="quality", disable=None if self.progress else True):
            if self.out_of_time():
                break
            logits = torch.cat([first_logits[config], self.logits_of(self.patched(config), rest)])
            found[config] = self.quality_on(self.chosen_on, logits)
        return found

    def time_front(self, calibrated: dict[TokenConfig, Quality], ratios: dict[TokenConfig, float],
                   speed: Callable[[Optional[TokenConfig]], dict[str, PairedSpeed]]) -> dict[TokenConfig, PairedSpeed]:
        """The speed (``speed(config)``: paired with the unpatched model) of each candidate that
        :func:`could_reach_front`, the most agreeing first (they make the bound bite soonest),
        until the budget ends. The unpatched model is the first point."""
        measured: list[Measured] = [Measured(None, 1.0, 1.0)]
        timed: dict[TokenConfig, PairedSpeed] = {}
        order = sorted(calibrated, key=lambda config: (-calibrated[config].agreement, calibrated[config].mean_kl))
        for config in tqdm(order, desc="speed", disable=None if self.progress else True):
            if not could_reach_front(config, ratios[config], calibrated[config], measured):
                self.beaten.add(config)
                continue
            if self.out_of_time():
                break
            pair = speed(config)
            self.unpatched_speed = self.unpatched_speed or pair["unpatched"]
            timed[config] = pair["candidate"]
            measured.append(Measured(config, pair["candidate"].speedup, calibrated[config].agreement))
        if self.unpatched_speed is None:
            self.unpatched_speed = speed(None)["unpatched"]
        return timed


class PatchedCopies:
    """Patched copies of one model, one per method, options and layers, with a config's keep
    rates set when it is asked for: patching traces blocks and runs a test forward, setting
    keep rates costs nothing. The ``keep`` most recently used copies are held (candidates
    that differ only in their rates come one after another)."""

    def __init__(self, model: nn.Module, keep: int = 3) -> None:
        self.model, self.keep = model, keep
        self.copies: OrderedDict[tuple, nn.Module] = OrderedDict()

    def __call__(self, config: TokenConfig) -> nn.Module:
        key = (config.method, config.layers, config.options)
        patched = self.copies.pop(key, None)
        if patched is None:
            patched = apply_config(copy.deepcopy(self.model), config).eval()
        self.copies[key] = patched
        while len(self.copies) > self.keep:
            self.copies.popitem(last=False)
        set_keep_rate(patched, list(config.keep_rates))
        return patched


def mac_ratios(patched: PatchedCopies, candidates: Sequence[TokenConfig], progress: bool) -> dict[TokenConfig, float]:
    """Each candidate's MAC ratio: the unpatched model's MACs over the candidate's."""
    base = count_macs(patched.model)
    return {config: base / count_macs(patched(config))
            for config in tqdm(candidates, desc="MACs", disable=None if progress else True)}


def check_reachable(target_speedup: Optional[float], ratios: dict[TokenConfig, float]) -> None:
    """:class:`UnreachableTarget` when no candidate could be ``target_speedup`` fast, even at
    ``MAC_SLACK`` times its MAC ratio: refused before anything is timed."""
    if target_speedup is None or target_speedup <= MAC_SLACK * max(ratios.values(), default=1.0):
        return
    best = max(ratios, key=ratios.get)
    raise UnreachableTarget(f"no setting can run {target_speedup}x fast: the cheapest, {best.describe()}, has "
                            f"{ratios[best]:.2f}x fewer MACs, and speed-ups stay below about {MAC_SLACK}x that")


def warn_if_over_budget(reference_s: float, calibration: int, count: int, ratios: dict[TokenConfig, float],
                        time_budget_s: float) -> None:
    """Warn at once when the quality passes alone would outlast the budget, so nothing would be
    timed: each candidate's pass is taken to cost the unpatched pass (``reference_s``, over all
    ``count`` images) over its MAC ratio, on the first look's share of the images, and the
    surviving share of the candidates on the rest of the ``calibration`` images."""
    first = screening_size(calibration)
    share = (first + (calibration - first) * SURVIVING_SHARE) / count
    needed = reference_s * share * sum(1 / ratio for ratio in ratios.values())
    if needed > time_budget_s:
        warnings.warn(f"the quality passes of {len(ratios)} settings need about {needed:.0f} s of the "
                      f"{time_budget_s:.0f} s budget (the unpatched pass took {reference_s:.1f} s): the search will "
                      "end before the settings are timed; try fewer methods or keep rates, fewer images, or a larger "
                      "time budget", stacklevel=3)


def tune(model: nn.Module, images: Tensor, labels: Optional[Tensor] = None, *, target_speedup: Optional[float] = None,
         max_agreement_loss: Optional[float] = None, batch_size: int = 64, device: str | torch.device = "cpu",
         compile: bool = False, time_budget_s: float = 600.0, calibration: float = 0.5, seed: int = 0,
         repeats: int = 7, candidates: Optional[Sequence[TokenConfig]] = None, clock: Clock = time.perf_counter,
         progress: bool = True, quality_batch_size: Optional[int] = None) -> TuneResult:
    """Measure token-reduction settings of ``model`` on ``images`` and choose one.

    Args:
        model: an unpatched model evit_patch can patch (left as it is: settings go on copies).
        images: ``(N, C, H, W)`` inputs as the model takes them; a ``calibration`` share of
            them, drawn with ``seed``, chooses, the rest reports.
        labels: classes of the images, for top-1 beside the label-free agreement.
        target_speedup / max_agreement_loss: the target (:func:`~evit_patch.tuning.front.choose`);
            neither: the fastest setting of the front.
        batch_size, device, compile: how speed is measured (the model's deployment).
        time_budget_s: seconds of measuring (quality passes and timing; counting MACs comes
            first and is not included); when it ends, what was measured is reported.
        repeats: paired repeats per timing.
        candidates: the settings to try (default :func:`~evit_patch.tuning.space.candidate_configs`).
        clock: the seconds that timing and the budget read (``time.perf_counter``); nothing
            reads it before the arguments, the model and the target have been checked.
        progress: show progress bars (where stderr is a terminal).
        quality_batch_size: images per forward of the quality passes (default: the larger of
            :data:`QUALITY_BATCH` and ``batch_size``).

    Raises ValueError for arguments that make no sense, ``UnsupportedModelError`` for a model
    that cannot be patched, :class:`~evit_patch.tuning.front.UnreachableTarget` for a target
    no candidate's MACs allow (before any timing), and its subclass
    :class:`~evit_patch.tuning.result.TargetNotMet`, which carries the result, for one that no
    measured setting meets.
    """
    check_images(images, labels)
    check_numbers(images.shape[0], target_speedup, max_agreement_loss, batch_size, time_budget_s, calibration)
    device = torch.device(device)
    unpatched = copy.deepcopy(model).eval().to(device)
    candidates = list(candidates) if candidates is not None else candidate_configs(len(transformer_blocks(model)))
    patched = PatchedCopies(unpatched)
    ratios = mac_ratios(patched, candidates, progress)
    check_reachable(target_speedup, ratios)

    start = clock()
    chosen_on, reported_on = calibration_split(images.shape[0], round(calibration * images.shape[0]), seed)
    quality_batch_size = quality_batch_size or max(QUALITY_BATCH, batch_size)
    reference = outputs(unpatched, images, quality_batch_size, device)
    warn_if_over_budget(clock() - start, len(chosen_on), images.shape[0], ratios, time_budget_s)
    search = Search(patched, images, labels, reference, chosen_on, reported_on, quality_batch_size, device, progress,
                    lambda: clock() - start > time_budget_s)
    calibrated = search.calibrate(candidates, ratios)
    timed_reference = torch.compile(unpatched) if compile else unpatched
    timing_images = images[chosen_on][torch.arange(batch_size) % len(chosen_on)].to(device)

    def speed(config: Optional[TokenConfig]) -> dict[str, PairedSpeed]:
        models = {"unpatched": timed_reference}
        if config is not None:
            candidate = patched(config)
            models["candidate"] = torch.compile(candidate) if compile else candidate
        return paired_speeds(models, timing_images, repeats, clock=clock)

    timed = search.time_front(calibrated, ratios, speed)
    front = pareto_front([Measured(None, 1.0, 1.0)] + [Measured(config, pair.speedup, calibrated[config].agreement)
                                                       for config, pair in timed.items()])
    held_out = {point.setting: search.quality_of(patched(point.setting), reported_on)
                for point in front if point.setting is not None}
    base = Trial(None, 1.0, search.full_quality(chosen_on), search.full_quality(reported_on), search.unpatched_speed)
    trials = {config: Trial(config, ratios[config], calibrated.get(config), held_out.get(config), timed.get(config),
                            beaten=config in search.beaten, first_look=search.screened.get(config),
                            screened_out=config in search.screened_out) for config in candidates}
    try:
        chosen, unmet = choose(front, target_speedup, max_agreement_loss).setting, None
    except UnreachableTarget as error:
        chosen, unmet = choose(front).setting, str(error)
    speeds = {"unpatched": base.speed, **{trial.label: trial.speed for trial in trials.values() if trial.speed}}
    trial_of = {None: base, **trials}
    result = TuneResult((base, *trials.values()), tuple(trial_of[point.setting] for point in front),
                        trial_of[chosen], str(device), batch_size, compile, tuple(chosen_on.tolist()),
                        tuple(reported_on.tolist()), spread_warning(speeds), unmet)
    if unmet is not None:
        raise TargetNotMet(unmet, result)
    return result

"""What a tune hands back: each setting tried with what was measured of it, the front, the choice."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from evit_patch.tuning.config import TokenConfig
from evit_patch.tuning.front import UnreachableTarget
from evit_patch.tuning.timing import PairedSpeed


@dataclass(frozen=True)
class Quality:
    """How far a setting's answers are from the unpatched model's on a set of images."""

    agreement: float  # share of images with the unpatched model's top-1 class
    mean_kl: float  # KL(unpatched || patched) of the softmax outputs, averaged over images
    top1: Optional[float] = None  # accuracy, when labels were given


@dataclass(frozen=True)
class Trial:
    """One setting (None: the unpatched model) and what was measured of it."""

    config: Optional[TokenConfig]
    mac_ratio: float  # the unpatched model's MACs over this setting's
    calibration: Optional[Quality] = None  # None: screened out, or the time budget ran out before its pass
    held_out: Optional[Quality] = None  # measured for the settings on the front only
    speed: Optional[PairedSpeed] = None  # None: not timed (it could not reach the front, or no time was left)
    beaten: bool = False  # not timed because a timed setting beats what its MACs allow (search.could_reach_front)
    first_look: Optional[Quality] = None  # on the screening images (tuning.screen), when there was a screen
    screened_out: bool = False  # the first look found settings cheaper and closer to the unpatched answers

    @property
    def label(self) -> str:
        return "unpatched" if self.config is None else self.config.describe()


@dataclass(frozen=True)
class TuneResult:
    """Every setting tried, the front of the timed ones (fastest first), and the chosen one."""

    trials: tuple[Trial, ...]
    front: tuple[Trial, ...]
    chosen: Trial
    device: str
    batch_size: int
    compiled: bool
    calibration_images: tuple[int, ...]
    held_out_images: tuple[int, ...]
    warning: Optional[str] = None  # the speed-ups scatter too much to be trusted
    unmet: Optional[str] = None  # the target no measured setting meets; then ``chosen`` is the fastest

    @property
    def out_of_time(self) -> bool:
        """Whether the time budget ended the search before every candidate was settled."""
        return bool(self.left)

    @property
    def left(self) -> tuple[Trial, ...]:
        """The settings the time budget left without a quality pass or a timing."""
        return tuple(trial for trial in self.trials if trial.speed is None and not trial.beaten and not trial.screened_out)

    @property
    def measured(self) -> tuple[Trial, ...]:
        """The settings that were timed (the unpatched model first)."""
        return tuple(trial for trial in self.trials if trial.speed is not None)


class TargetNotMet(UnreachableTarget):
    """A target that no measured setting meets, found after timing: ``result`` keeps everything
    measured (its ``chosen`` the fastest setting), so the minutes spent are not lost."""

    def __init__(self, message: str, result: TuneResult) -> None:
        super().__init__(message)
        self.result = result

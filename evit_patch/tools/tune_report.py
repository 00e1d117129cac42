"""A tune's result as files: a Markdown table, JSON, a plot of speed-up against agreement with
the front highlighted, and the chosen setting as a recipe fragment for fine-tuning."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import yaml

from evit_patch.extras import require
from evit_patch.tuning.config import recipe_fragment
from evit_patch.tuning.result import Quality, Trial, TuneResult


def _quality(quality: Optional[Quality]) -> Optional[dict[str, Any]]:
    return None if quality is None else {"agreement": quality.agreement, "mean_kl": quality.mean_kl, "top1": quality.top1}


def result_json(result: TuneResult) -> dict[str, Any]:
    """Everything measured, each setting marked when it is on the front or chosen."""
    def trial(item: Trial) -> dict[str, Any]:
        speed = item.speed
        return {"setting": None if item.config is None else item.config.to_dict(), "label": item.label,
                "mac_ratio": item.mac_ratio, "calibration": _quality(item.calibration), "held_out": _quality(item.held_out),
                "speed": None if speed is None else {"images_per_second": speed.images_per_second,
                                                     "speedup": speed.speedup, "quartiles": list(speed.quartiles)},
                "first_look": _quality(item.first_look), "screened_out": item.screened_out,
                "beaten": item.beaten, "on_front": item in result.front, "chosen": item == result.chosen}

    return {"device": result.device, "batch_size": result.batch_size, "compiled": result.compiled,
            "calibration_images": list(result.calibration_images), "held_out_images": list(result.held_out_images),
            "out_of_time": result.out_of_time, "warning": result.warning, "target_not_met": result.unmet,
            "trials": [trial(item) for item in result.trials]}


def _percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _row(item: Trial) -> str:
    speed, chosen_on, held_out = item.speed, item.calibration, item.held_out
    return (f"| {item.label} | {speed.speedup:.2f}x ({speed.quartiles[0]:.2f}-{speed.quartiles[1]:.2f}) | "
            f"{item.mac_ratio:.2f}x | {_percent(chosen_on.agreement)} | "
            + ("- | - | - |" if held_out is None else
               f"{_percent(held_out.agreement)} | {held_out.mean_kl:.4f} | {_percent(held_out.top1)} |"))


def result_markdown(result: TuneResult, title: str) -> str:
    """The chosen setting, the front and every timed setting as tables."""
    chosen = result.chosen
    header = ["| setting | speed-up (quartiles) | fewer MACs | agreement % (calibration) | agreement % (held-out) | "
              "mean KL (held-out) | top-1 % (held-out) |", "|---|---|---|---|---|---|---|"]
    tried, beaten = len(result.trials) - 1, sum(item.beaten for item in result.trials)
    screened_out = sum(item.screened_out for item in result.trials)
    looked = next((item for item in result.trials if item.first_look is not None), None)
    lines = [f"# {title}", "",
             f"{result.device}, batch {result.batch_size}, {'compiled' if result.compiled else 'eager'}; chosen on "
             f"{len(result.calibration_images)} calibration images, reported on {len(result.held_out_images)} held-out ones.",
             "", f"**{'Fastest (target not met)' if result.unmet else 'Chosen'}:** {chosen.label}: "
             f"{chosen.speed.speedup:.2f}x, held-out agreement {_percent(chosen.held_out.agreement)}% (calibration "
             f"{_percent(chosen.calibration.agreement)}%).", "",
             f"{tried} settings tried: {len(result.measured) - 1} timed, {beaten} not timed (a timed setting beats "
             f"what their MACs allow), {screened_out} screened out by a first look"
             + ("" if looked is None else " (a setting with at least their MAC ratio moved the answers less)")
             + f", {len(result.left)} left when the time budget ended."]
    if result.unmet:
        lines += ["", f"**Target not met:** {result.unmet}."]
    if result.warning:
        lines += ["", result.warning]
    lines += ["", "## The front (fastest first)", "", *header, *map(_row, result.front),
              "", "## Every timed setting (held-out figures for the front only)", "", *header,
              *map(_row, result.measured)]
    return "\n".join(lines) + "\n"


def plot(result: TuneResult, path: Path, title: str) -> None:
    """Speed-up against calibration agreement of every timed setting, the front joined, the
    chosen one starred."""
    pyplot = require("matplotlib.pyplot", "plot")
    figure, axes = pyplot.subplots(figsize=(6.4, 4.4))
    timed = result.measured
    axes.scatter([100 * item.calibration.agreement for item in timed], [item.speed.speedup for item in timed],
                 color="0.6", s=14, label="measured")
    front = sorted(result.front, key=lambda item: item.calibration.agreement)
    axes.plot([100 * item.calibration.agreement for item in front], [item.speed.speedup for item in front],
              "o-", color="tab:blue", label="front")
    axes.scatter([100 * result.chosen.calibration.agreement], [result.chosen.speed.speedup], marker="*", s=180,
                 color="tab:red", zorder=3, label=f"chosen: {result.chosen.label}")
    axes.set_xlabel("agreement with the unpatched model (%, calibration images)")
    axes.set_ylabel(f"speed-up ({result.device}, batch {result.batch_size})")
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def write_report(result: TuneResult, prefix: Path, title: str) -> list[Path]:
    """``prefix``.md, .json, .png and .recipe.yaml; the paths written."""
    paths = [prefix.with_name(prefix.name + suffix) for suffix in (".md", ".json", ".png", ".recipe.yaml")]
    paths[0].write_text(result_markdown(result, title), encoding="utf-8")
    paths[1].write_text(json.dumps(result_json(result), indent=1) + "\n", encoding="utf-8")
    plot(result, paths[2], title)
    fragment = yaml.safe_dump(recipe_fragment(result.chosen.config), sort_keys=False)
    why = "the fastest measured: no setting met the target" if result.unmet else "the setting evit-tune chose"
    paths[3].write_text(f"# {why} ({result.chosen.label}); merge into a recipe\n{fragment}",
                        encoding="utf-8")
    return paths

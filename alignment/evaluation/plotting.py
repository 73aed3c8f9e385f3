"""PNG figures of a training run, drawn from the HF Trainer's ``trainer_state.json``.

The Trainer writes that file at the end of training and into every ``checkpoint-N/`` folder, so a run can be
plotted without wandb or TensorBoard, even one that stopped after its first checkpoint.

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas rather than through ``pyplot``:
that never opens a window, never changes the process-wide backend of whoever imports this module (a notebook,
say), and leaves no figure registered in pyplot to leak memory when many runs are plotted.

`main` is scripts/plot.py's command line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..training.checkpoints import TRAINER_STATE as STATE_FILE
from ..training.checkpoints import checkpoint_folders

__all__ = ["STATE_FILE", "find_trainer_state", "load_log_history", "main", "plot_run"]


FIGSIZE = (7.0, 4.5)
DPI = 120
MIN_POINTS_TO_SMOOTH = 5  # below this an average hides more than it shows; draw the points themselves
TRAIN_COLOR, EVAL_COLOR = "tab:blue", "tab:orange"
METRIC_COLORS = ("tab:green", "tab:blue", "tab:red", "tab:purple")


@dataclass(frozen=True)
class _FigureSpec:
    """One figure: which logged metrics it shows, each as a train curve and, if logged, an eval curve."""

    filename: str
    title: str
    ylabel: str
    metrics: tuple[tuple[str, str], ...]  # (train log key, name in the legend); eval key is "eval_" + key
    smooth: bool = True
    ylim: tuple[float, float] | None = None
    reference: tuple[float, str | None] | None = None  # a level worth reading the curves against, and its label
    scientific_y: bool = False  # tiny numbers (learning rates) read best as 1e-6 multiples
    y_from_zero: bool = False  # a schedule is read against zero; also keeps a constant one from a 1e-9-wide axis


_LEARNING_RATE = _FigureSpec(
    "learning_rate.png",
    "Learning rate schedule",
    "learning rate",
    (("learning_rate", "learning rate"),),
    smooth=False,  # the schedule is exact, not noisy: an average would only blur warmup and decay
    scientific_y=True,
    y_from_zero=True,
)
SFT_FIGURES = (
    _FigureSpec("sft_loss.png", "SFT loss", "loss (cross-entropy, nats/token)", (("loss", "loss"),)),
    _LEARNING_RATE,
)
DPO_FIGURES = (
    _FigureSpec("dpo_loss.png", "DPO loss", "loss", (("loss", "loss"),), reference=(math.log(2), "ln 2 (start)")),
    _FigureSpec(
        "dpo_accuracy.png",
        "DPO reward accuracy",
        "reward accuracy (chosen > rejected)",
        (("rewards/accuracies", "accuracy"),),
        ylim=(-0.03, 1.03),
        reference=(0.5, "chance"),
    ),
    _FigureSpec(
        "dpo_rewards.png",
        "DPO implicit rewards",
        "reward (β · log-ratio to reference)",
        (("rewards/margins", "margin"), ("rewards/chosen", "chosen"), ("rewards/rejected", "rejected")),
        reference=(0.0, None),
    ),
    _LEARNING_RATE,
)


def find_trainer_state(run_dir: str | Path) -> Path:
    """The run's ``trainer_state.json``: the final one, else the newest checkpoint's, so a crashed run still plots."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    if (run_dir / STATE_FILE).is_file():
        return run_dir / STATE_FILE
    # Highest N with the file: a checkpoint interrupted while saving may lack it.
    for checkpoint in checkpoint_folders(run_dir):  # newest first
        if (checkpoint / STATE_FILE).is_file():
            return checkpoint / STATE_FILE
    raise FileNotFoundError(f"no {STATE_FILE} in {run_dir} or in any of its checkpoint-N folders")


def load_log_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The Trainer's ``log_history`` of a run folder (see :func:`find_trainer_state` for where it is looked for)."""
    path = find_trainer_state(run_dir)
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise ValueError(f"{path} has no log_history list")
    return [entry for entry in history if isinstance(entry, dict)]


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the figures the run's metrics allow into ``out_dir`` (default ``run_dir/plots``); return their paths.

    A DPO run is told from an SFT run by its ``rewards/*`` metrics; a figure whose metrics were never logged is
    skipped, so an empty history writes nothing.
    """
    run_dir = Path(run_dir)
    history = load_log_history(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "plots"
    is_dpo = any(key.startswith(("rewards/", "eval_rewards/")) for entry in history for key in entry)
    written = []
    for spec in DPO_FIGURES if is_dpo else SFT_FIGURES:
        figure = _draw(spec, history, run_name=run_dir.resolve().name)
        if figure is None:
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / spec.filename
        figure.savefig(path)
        written.append(path)
    return written


def _to_float(value: Any) -> float | None:
    """A finite float from a logged value (some transformers versions log strings), else None."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _series(history: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """Steps and values of one metric, by step; the last value wins when a resumed run logged a step twice."""
    by_step: dict[float, float] = {}
    for entry in history:
        step, value = _to_float(entry.get("step")), _to_float(entry.get(key))
        if step is not None and value is not None:
            by_step[step] = value
    steps = sorted(by_step)
    return steps, [by_step[step] for step in steps]


def _ema(values: list[float]) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard's), heavier the more points there are.

    The bias correction makes the curve start at the first value instead of rising from zero.
    """
    weight = min(0.9, max(0.6, 1.0 - 10.0 / len(values)))
    smoothed, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1.0 - weight) * value
        smoothed.append(average / (1.0 - weight**i))
    return smoothed


def _draw(spec: _FigureSpec, history: list[dict[str, Any]], run_name: str) -> Figure | None:
    """One figure, or None when none of its metrics has a value.

    With one metric, train and eval differ by colour; with several, colour is the metric and eval is dashed.
    Legend entries say "train"/"eval" only when the figure has eval points to tell apart.
    """
    curves = [(name, _series(history, key), _series(history, "eval_" + key)) for key, name in spec.metrics]
    if not any(train[0] or evaluation[0] for _, train, evaluation in curves):
        return None
    has_eval = any(evaluation[0] for _, _, evaluation in curves)
    single = len(curves) == 1

    figure = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    smoothed_any = False
    for i, (name, (steps, values), (eval_steps, eval_values)) in enumerate(curves):
        color = METRIC_COLORS[i % len(METRIC_COLORS)]
        if steps:
            label = ("train" if single else f"{name} (train)") if has_eval else name
            smoothed_any |= _draw_train(ax, steps, values, TRAIN_COLOR if single else color, label, spec.smooth)
        if eval_steps:
            # Few points, each already an average over the eval set: draw them all, never smoothed.
            ax.plot(
                eval_steps,
                eval_values,
                color=EVAL_COLOR if single else color,
                linestyle="--",
                marker="o",
                markersize=5,
                linewidth=1.2,
                label="eval" if single else f"{name} (eval)",
                zorder=3,
            )

    if spec.reference is not None:
        level, label = spec.reference
        ax.axhline(level, color="0.5", linewidth=0.8, linestyle=":", label=label, zorder=1)
    if spec.ylim is not None:
        ax.set_ylim(*spec.ylim)
    elif spec.y_from_zero:
        top = max((v for _, (_, values), _ in curves for v in values), default=0.0)
        ax.set_ylim(0.0, 1.08 * top if top > 0 else 1.0)
    left, right = ax.get_xlim()
    if right - left < 2:  # a single step: widen, or the integer tick locator falls back to 0.005 steps
        middle = (left + right) / 2
        ax.set_xlim(middle - 1, middle + 1)
    if spec.scientific_y:
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"{spec.title} — {_shorten(run_name)}")
    ax.set_xlabel("step")
    ax.set_ylabel(spec.ylabel)
    ax.grid(True, alpha=0.3)
    # Beside the axes, not inside: noisy raw values fill the whole plot, so any spot inside covers some.
    ax.legend(
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        borderaxespad=0.0,
        fontsize="small",
        frameon=False,
        title="thin: raw values" if smoothed_any else None,
        title_fontsize="x-small",
    )
    figure.tight_layout()
    return figure


def _draw_train(ax, steps, values, color, label, smooth) -> bool:
    """Raw values thin and faint, their moving average solid; True when an average was drawn."""
    if not smooth or len(values) < MIN_POINTS_TO_SMOOTH:
        ax.plot(
            steps,
            values,
            color=color,
            linewidth=1.6,
            label=label,
            zorder=2,
            marker="o" if len(values) < MIN_POINTS_TO_SMOOTH else None,
            markersize=4,
        )
        return False
    ax.plot(steps, values, color=color, linewidth=0.8, alpha=0.3, zorder=2)
    ax.plot(steps, _ema(values), color=color, linewidth=1.8, label=label, zorder=2.5)
    return True


def _shorten(name: str, limit: int = 40) -> str:
    """A run name that fits beside the title."""
    return name if len(name) <= limit else name[: limit - 1] + "…"


def main(argv: list[str] | None = None) -> int:
    """scripts/plot.py: one line per written file; exit code 1 and one `error:` line on stderr when nothing can be
    plotted (a traceback would only bury the one thing the user needs to fix)."""
    parser = argparse.ArgumentParser(description="Draw PNG figures of a training run from its trainer_state.json.")
    parser.add_argument("run_dir", help="the run's output folder (with trainer_state.json or checkpoint-N/)")
    parser.add_argument("--out", default=None, help="where to write the PNGs (default: RUN_DIR/plots)")
    args = parser.parse_args(argv)
    try:
        paths = plot_run(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if not paths:
        print(f"error: no metrics to plot in the log history of {args.run_dir}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0

"""How much SFT does DPO need? SFT for a share of its budget, DPO from each, then the demo's evaluation; and the DPO
step with full fine-tuning against LoRA.

    python examples/arithmetic/ablate_sft.py [--fractions 0,0.5,1] [--output_dir outputs/ablation] [--skip_lora]
                                             [--quick]

On the offline demo task (`demo.py` beside it: a tiny GPT-2 from random weights, single-digit arithmetic, noisy SFT
data, (correct, wrong) preference pairs, 60 held-out problems), with the demo's recipes:

* The SFT budget: a fraction f of the demo recipe's epochs (`num_train_epochs` = f × 10, the cosine schedule fitted
  to the shorter run). f = 0 is no SFT at all: the SFT pipeline run for zero steps saves the random initialisation,
  and DPO starts (and takes its reference) from there.
* DPO from each SFT model with the demo's DPO recipe. Each model, before and after DPO, gets the demo's numbers:
  held-out preference accuracy (reference-free; and DPO's implicit-reward accuracy against its start), and correct
  greedy answers on the training and on the held-out problems.
* Full fine-tuning against LoRA (r 8, α 16, on c_attn, c_proj and c_fc; learning rate `--lora_learning_rate`) for
  the DPO step from the 100% SFT model: the same numbers, trainable parameters, peak memory (the peak resident set
  size of the run's own process) and time.

Every training run has its own process (`alignment.run.measure`) and folder (`sft-<percent>`,
`dpo-from-sft-<percent>`, `dpo-lora-from-sft-100`, each with train.log; a second study into the same folder replaces
them). The results: results.json and results.md (the SFT-budget table), sft_fraction.png, and lora.json and lora.md.
`--quick` trains a few steps only (for tests; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # the repo root: `examples` is a folder, not installed

from alignment import AlignmentGPT2ForCausalLM  # noqa: E402
from alignment.modeling.tokenizer import load_tokenizer  # noqa: E402
from alignment.run.cli import run_cli  # noqa: E402
from examples.arithmetic import task as arithmetic  # noqa: E402
from examples.arithmetic.studies import (  # noqa: E402
    ArithmeticEval,
    evaluate_policy,
    idle_worker_rss_mib,
    run_stage,
    trainable_parameters,
)

RECIPES = Path(__file__).resolve().parent / "recipes"
SFT_RECIPE, DPO_RECIPE = RECIPES / "arithmetic_sft.yaml", RECIPES / "arithmetic_dpo.yaml"
LORA = {"lora_r": 8, "lora_alpha": 16}
LORA_LEARNING_RATE = 1e-2  # 10x full fine-tuning's; of 3e-3, 1e-2, 3e-2 and 1e-1 the best (3e-2 and up diverge)
# --quick: a tenth of the data, the whole SFT budget one epoch (about 7 steps), 4 DPO steps, no evaluation during
# training; the evaluation afterwards is the same
QUICK_DATA = {"n_sft": arithmetic.N_SFT // 10, "n_pairs": arithmetic.N_PAIRS // 10}
QUICK_SFT_EPOCHS = 1.0
QUICK_DPO_STEPS = 4

METRICS = (  # key, label; the same keys as the demo's results.json
    ("held_out_preference_accuracy", "held-out preference accuracy"),
    ("held_out_reward_accuracy_vs_sft", "DPO implicit-reward accuracy vs its start"),
    ("greedy_correct_train_problems", "correct greedy answers, training problems"),
    ("greedy_correct_held_out_problems", "correct greedy answers, held-out problems"),
)


def parse_fractions(text: str) -> list[float]:
    """ "0,0.5,1" -> [0.0, 0.5, 1.0] (sorted, each once); argparse turns the error into its usage message."""
    message = f"--fractions takes comma-separated numbers in [0, 1], e.g. 0,0.5,1; got {text!r}"
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(message) from None
    if not values or any(not 0 <= value <= 1 for value in values):
        raise argparse.ArgumentTypeError(message)
    return sorted(set(values))


def percent(fraction: float) -> str:
    return f"{fraction * 100:.4g}"


def sft_name(fraction: float) -> str:
    return f"sft-{percent(fraction)}"


def dpo_name(fraction: float, lora: bool = False) -> str:
    return f"dpo-{'lora-' if lora else ''}from-{sft_name(fraction)}"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--fractions",
        type=parse_fractions,
        default=[0.0, 0.5, 1.0],
        help="shares of the SFT budget, comma-separated (default 0,0.5,1)",
    )
    parser.add_argument("--output_dir", default="outputs/ablation")
    parser.add_argument("--skip_lora", action="store_true", help="leave out the full fine-tuning vs LoRA comparison")
    parser.add_argument("--lora_learning_rate", type=float, default=LORA_LEARNING_RATE)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per run and for the evaluation; default torch's own (one per core), as "
        "`make demo`, whose numbers the 100%% row then repeats exactly. On a busy machine 1 can be "
        "much faster, but changes the float sums, so the numbers differ a little",
    )
    parser.add_argument("--quick", action="store_true", help="a few training steps only (for tests)")
    options = parser.parse_args(argv)
    if options.threads is not None and options.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {options.threads}")
    threads = torch.get_num_threads()
    try:
        study(options)
    finally:
        torch.set_num_threads(threads)  # the evaluation may change it; leave the caller's setting as it was


def study(options: argparse.Namespace) -> None:
    out = Path(options.output_dir)
    start = time.time()

    files = arithmetic.write_task(out / "data", **(QUICK_DATA if options.quick else {}))
    sft_recipe, dpo_recipe = (yaml.safe_load(path.read_text()) for path in (SFT_RECIPE, DPO_RECIPE))
    full_epochs = QUICK_SFT_EPOCHS if options.quick else float(sft_recipe["num_train_epochs"])
    sft_argv = [str(SFT_RECIPE), f"--dataset_name={files['sft_train']}"]
    dpo_argv = [str(DPO_RECIPE), f"--dataset_name={files['dpo_train']}"]
    if options.quick:
        sft_argv.append("--eval_strategy=no")
        dpo_argv += [f"--max_steps={QUICK_DPO_STEPS}", "--eval_strategy=no"]
    lora = not options.skip_lora

    # --- training, one process per run
    runs: dict[str, Any] = {}

    def train(stage: str, name: str, argv: list[str]) -> None:
        if (out / name).exists():  # from an earlier run of the study: replaced, as the pipeline never overwrites
            shutil.rmtree(out / name)
        stats = run_stage(stage, argv, out / name, threads=options.threads)
        runs[name] = stats
        print(
            f"{name:<26} {stats.global_step:>5} steps {stats.wall_seconds:>7.1f} s   peak RSS "
            f"{stats.peak_rss_mib:>6.0f} MiB",
            flush=True,
        )

    sft_fractions = sorted(set(options.fractions) | ({1.0} if lora else set()))
    for fraction in sft_fractions:
        stage = "sft" if fraction > 0 else "start"  # 0%: the starting model itself, saved as a 0-step run
        train(stage, sft_name(fraction), [*sft_argv, f"--num_train_epochs={fraction * full_epochs:.6g}"])
    for fraction in sft_fractions:
        train("dpo", dpo_name(fraction), [*dpo_argv, f"--model_name_or_path={out / sft_name(fraction)}"])
    if lora:
        lora_argv = [f"--{key}={value}" for key, value in LORA.items()]
        train(
            "dpo",
            dpo_name(1.0, lora=True),
            [
                *dpo_argv,
                f"--model_name_or_path={out / sft_name(1.0)}",
                "--use_peft=true",
                *lora_argv,
                f"--learning_rate={options.lora_learning_rate:g}",
                "--merge_adapter_on_save=true",
            ],
        )
    training_seconds = time.time() - start

    # --- evaluation, as the demo's
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars, one per model
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    task = ArithmeticEval.from_files(files)
    tokenizer = load_tokenizer(str(out / sft_name(sft_fractions[0])))
    models: dict[str, AlignmentGPT2ForCausalLM] = {}
    evaluated: dict[tuple[str, str | None], dict[str, float | None]] = {}

    def model(name: str) -> AlignmentGPT2ForCausalLM:
        if name not in models:
            folder = out / name / "merged" if (out / name / "merged").is_dir() else out / name
            models[name] = AlignmentGPT2ForCausalLM.from_pretrained(folder).eval()
        return models[name]

    def scores(name: str, reference: str | None) -> dict[str, float | None]:
        if (name, reference) not in evaluated:
            reference_model = model(reference) if reference else None
            evaluated[name, reference] = evaluate_policy(model(name), reference_model, tokenizer, task)[0]
        return evaluated[name, reference]

    rows = []
    for fraction in options.fractions:
        sft, dpo = sft_name(fraction), dpo_name(fraction)
        rows.append(
            {
                "sft_fraction": fraction,
                "sft_epochs": round(fraction * full_epochs, 6),
                "sft_steps": runs[sft].global_step,
                "sft": scores(sft, None),
                "dpo": scores(dpo, sft),
                "runs": {"sft": runs[sft].as_dict(), "dpo": runs[dpo].as_dict()},
            }
        )
    results = {
        "task": "offline demo: tiny GPT-2 (random init), single-digit arithmetic; demo recipes, seed 0",
        "settings": {
            "fractions": options.fractions,
            "full_sft_epochs": full_epochs,
            "quick": options.quick,
            "torch_threads": options.threads,
            "sft_recipe": str(SFT_RECIPE.relative_to(REPO)),
            "dpo_recipe": str(DPO_RECIPE.relative_to(REPO)),
        },
        "rows": rows,
    }

    comparison = None
    if lora:
        full_name, lora_name = dpo_name(1.0), dpo_name(1.0, lora=True)
        total = trainable_parameters(out / full_name)
        idle = idle_worker_rss_mib(out / "logs")
        comparison = {
            "task": "DPO from the 100% SFT model with the demo's DPO recipe",
            "idle_worker_peak_rss_mib": idle,
            "runs": [
                {
                    "method": "full fine-tuning",
                    "learning_rate": dpo_recipe["learning_rate"],
                    "trainable_parameters": total,
                    **scores(full_name, sft_name(1.0)),
                    **runs[full_name].as_dict(),
                },
                {
                    "method": f"LoRA r={LORA['lora_r']}, alpha={LORA['lora_alpha']}",
                    "learning_rate": options.lora_learning_rate,
                    "trainable_parameters": trainable_parameters(out / lora_name),
                    **scores(lora_name, sft_name(1.0)),
                    **runs[lora_name].as_dict(),
                },
            ],
            "total_parameters": total,
        }
    seconds = {"training": round(training_seconds, 1), "total": round(time.time() - start, 1)}
    results["seconds"] = seconds

    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(fraction_table(results))
    plot_fractions(results, out / "sft_fraction.png")
    if comparison is not None:
        comparison["seconds"] = seconds
        (out / "lora.json").write_text(json.dumps(comparison, indent=2) + "\n")
        (out / "lora.md").write_text(lora_table(comparison))
    else:  # an earlier study's comparison would read as this one's
        for name in ("lora.json", "lora.md"):
            (out / name).unlink(missing_ok=True)
    print("\n" + fraction_table(results))
    if comparison is not None:
        print(lora_table(comparison))
    print(f"took {seconds['total']:.0f} s ({seconds['training']:.0f} s training); everything in {out}/")


# --- tables and the figure ------------------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:.1%}"


def fraction_table(results: dict[str, Any]) -> str:
    """The SFT-budget table: one row per fraction, each number as "SFT model → DPO model"."""
    lines = [
        "| SFT budget | SFT steps | held-out preference accuracy, SFT → DPO | DPO implicit-reward accuracy vs its start "
        "| correct greedy answers, training problems, SFT → DPO | correct greedy answers, held-out problems, "
        "SFT → DPO |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["rows"]:
        sft, dpo = row["sft"], row["dpo"]
        cells = [f"{row['sft_fraction']:.0%}", str(row["sft_steps"])]
        for key, _ in METRICS:
            if key == "held_out_reward_accuracy_vs_sft":
                cells.append(_pct(dpo[key]))
            else:
                cells.append(f"{_pct(sft[key])} → {_pct(dpo[key])}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def lora_table(comparison: dict[str, Any]) -> str:
    idle, total = comparison["idle_worker_peak_rss_mib"], comparison["total_parameters"]
    lines = [
        "| DPO from the 100% SFT model | learning rate | trainable parameters | held-out preference accuracy "
        "| implicit-reward accuracy vs SFT | correct greedy, training problems | correct greedy, held-out problems "
        "| peak RSS (above an idle worker) | training time | wall time |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in comparison["runs"]:
        train = "" if run["train_seconds"] is None else f"{run['train_seconds']:.0f} s"
        lines.append(
            "| "
            + " | ".join(
                [
                    run["method"].replace("alpha", "α"),
                    f"{run['learning_rate']:g}",
                    f"{run['trainable_parameters']:,} ({run['trainable_parameters'] / total:.2%})",
                    *(_pct(run[key]) for key, _ in METRICS),
                    f"{run['peak_rss_mib']:.0f} MiB (+{run['peak_rss_mib'] - idle:.0f})",
                    train,
                    f"{run['wall_seconds']:.0f} s",
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def plot_fractions(results: dict[str, Any], path: Path) -> Path:
    """Two panels against the SFT budget: held-out preference accuracy, and correct greedy answers; the SFT model
    dashed, the DPO model solid."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    rows = results["rows"]
    x = [row["sft_fraction"] for row in rows]
    figure = Figure(figsize=(11.0, 5.4), dpi=120)
    FigureCanvasAgg(figure)
    preference, greedy = figure.subplots(1, 2, sharey=True)
    colors = {"sft": "tab:blue", "dpo": "tab:red"}
    names = {"sft": "SFT model (DPO's start)", "dpo": "after DPO"}

    for model in ("sft", "dpo"):
        style = dict(color=colors[model], linestyle="--" if model == "sft" else "-", linewidth=2, markersize=7)
        preference.plot(
            x, [row[model]["held_out_preference_accuracy"] for row in rows], marker="o", label=names[model], **style
        )
        greedy.plot(
            x,
            [row[model]["greedy_correct_held_out_problems"] for row in rows],
            marker="o",
            label=f"{names[model]}, held-out problems",
            **style,
        )
        greedy.plot(
            x,
            [row[model]["greedy_correct_train_problems"] for row in rows],
            marker="s",
            alpha=0.45,
            label=f"{names[model]}, training problems",
            **style,
        )
    preference.plot(
        x,
        [row["dpo"]["held_out_reward_accuracy_vs_sft"] for row in rows],
        marker="^",
        color="tab:purple",
        linestyle=":",
        linewidth=2,
        markersize=7,
        label="after DPO, implicit reward vs its start",
    )
    preference.axhline(0.5, color="0.5", linewidth=0.9, linestyle=":", label="chance")

    for ax, title in ((preference, "Held-out preference accuracy"), (greedy, "Correct greedy answers")):
        ax.set_title(title)
        epochs = results["settings"]["full_sft_epochs"]
        ax.set_xlabel(
            f"SFT budget (share of {epochs:g} SFT epochs{', --quick' if results['settings']['quick'] else ''})"
        )
        ax.set_xticks(x)
        ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        margin = 0.05 * (max(x) - min(x) or 1)
        ax.set_xlim(min(x) - margin, max(x) + margin)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(True, alpha=0.3)
        # below the axes: inside, some corner always holds a point
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize="small", frameon=False)
    preference.set_ylabel("share of held-out pairs / problems")
    figure.suptitle("Offline demo task: DPO after different amounts of SFT (SFT model dashed, after DPO solid)")
    figure.tight_layout()
    figure.savefig(path)
    return path


if __name__ == "__main__":
    run_cli(main)

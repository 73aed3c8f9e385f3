"""Pieces shared by the demo (`demo.py`) and the study built on it (`ablate_sft.py`).

* `evaluate_policy`: the demo's evaluation of one policy on the arithmetic task: held-out preference accuracy
  (reference-free, and implicit-reward against a reference when one is given) and the share of correct greedy
  answers on the training and on the held-out problems.
* `run_stage`: one training run (`run_sft` / `run_dpo` with a recipe and overrides) in a fresh worker process
  (`alignment.run.measure`), so its peak memory (the worker's peak resident set size) and wall time belong to that
  run alone.
* `trainable_parameters`: what a finished run trained: every weight of a full fine-tuning, the adapter of a LoRA run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from transformers import set_seed

from alignment.evaluation import generate, preference_scores
from alignment.modeling.loading import load_model_and_tokenizer
from alignment.run.arguments import DataArguments, ModelArguments
from alignment.run.measure import idle_child_peak_rss_mib, run_in_child
from alignment.run.pipeline import model_loading, run_dpo, run_sft
from alignment.run.recipe import parse_recipe, save_resolved_recipe
from alignment.training import SFTConfig

from . import task as arithmetic

__all__ = [
    "ArithmeticEval",
    "RunStats",
    "evaluate_policy",
    "greedy_accuracy",
    "idle_worker_rss_mib",
    "run_stage",
    "trainable_parameters",
]

STAGES = {"sft": run_sft, "dpo": run_dpo, "start": lambda argv: save_starting_model(argv)}
WORKER_PRELOAD = (__name__, "peft")  # what the worker server imports once: this module (torch, transformers, TRL), peft


# --- evaluation on the arithmetic task ------------------------------------------------------------------------------


def greedy_accuracy(model, tokenizer, prompts: Sequence[str]) -> tuple[float, list[str]]:
    """The share of correct greedy answers to arithmetic prompts, and the replies."""
    replies = [r[0] for r in generate(model, tokenizer, list(prompts), max_new_tokens=4)]
    return arithmetic.accuracy(prompts, replies), replies


@dataclass
class ArithmeticEval:
    """What the demo measures on the arithmetic task: held-out pairs and the train and held-out problems."""

    held_out_pairs: list[dict[str, str]]
    train_prompts: list[str]
    held_out_prompts: list[str]

    @classmethod
    def from_files(cls, files: dict[str, Path]) -> ArithmeticEval:
        """From `arithmetic.write_task`'s files (the held-out pairs) and the task's problem split."""
        pairs = [json.loads(line) for line in Path(files["dpo_test"]).read_text(encoding="utf-8").splitlines()]
        return cls(
            held_out_pairs=pairs,
            train_prompts=list(arithmetic.prompts_dataset("train")["prompt"]),
            held_out_prompts=list(arithmetic.prompts_dataset("test")["prompt"]),
        )


def evaluate_policy(model, reference, tokenizer, task: ArithmeticEval) -> tuple[dict[str, float | None], list[str]]:
    """The demo's numbers for one policy, and its greedy replies to the held-out problems.

    `held_out_reward_accuracy_vs_sft` (DPO's implicit reward β·log π/π_ref higher for the chosen reply) needs a
    reference, the model DPO started from; without one it is None.
    """
    scores = preference_scores(model, reference, tokenizer, task.held_out_pairs)
    train_acc, _ = greedy_accuracy(model, tokenizer, task.train_prompts)
    held_out_acc, replies = greedy_accuracy(model, tokenizer, task.held_out_prompts)
    results = {
        "held_out_preference_accuracy": scores.reference_free_accuracy,
        "held_out_reward_accuracy_vs_sft": scores.accuracy if reference is not None else None,
        "greedy_correct_train_problems": train_acc,
        "greedy_correct_held_out_problems": held_out_acc,
    }
    return results, replies


# --- one training run per worker process ----------------------------------------------------------------------------


@dataclass
class RunStats:
    """A finished run: where, how long (wall, and the trainer's own training time), how much memory at peak."""

    output_dir: str
    wall_seconds: float
    train_seconds: float | None
    peak_rss_mib: float
    global_step: int | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def save_starting_model(argv: list[str]) -> Path:
    """The model an SFT run would start from (same seed, same loading), saved as a run folder that trained 0 steps:
    the 0% point of the SFT-budget study. It is built here because the pipeline refuses to "train" zero steps."""
    model_args, data_args, args = parse_recipe((ModelArguments, DataArguments, SFTConfig), list(argv))
    set_seed(args.seed)  # as the pipeline does before it loads the model
    model, tokenizer = load_model_and_tokenizer(
        model_args.model_name_or_path, tokenizer_name_or_path=model_args.tokenizer_name_or_path,
        max_length=args.max_length, **model_loading(model_args, args.trust_remote_code),
    )  # fmt: skip
    output_dir = Path(args.output_dir)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    save_resolved_recipe(output_dir, model_args, data_args, args)
    (output_dir / "trainer_state.json").write_text(json.dumps({"global_step": 0, "log_history": []}))
    return output_dir


def _train(stage: str, argv: list[str]) -> None:
    """In the worker: the run itself (a module-level function, so the worker can find it)."""
    STAGES[stage](list(argv))


def run_stage(
    stage: str, argv: Sequence[str], output_dir: str | os.PathLike, *, threads: int | None = None
) -> RunStats:
    """`run_sft` or `run_dpo` (by `stage`) with `argv` (recipe path and `--key=value` overrides) into `output_dir`,
    in a worker process; its output goes to `<output_dir>/train.log`. `threads`: torch's intra-op threads in the
    worker (default: torch's own choice, one per core). A failed run raises with the log's last lines."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {sorted(STAGES)}, got {stage!r}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    run = run_in_child(
        _train,
        stage,
        [*argv, f"--output_dir={output_dir}"],
        log_path=output_dir / "train.log",
        what=f"the {stage} run",
        threads=threads,
        preload=WORKER_PRELOAD,
    )
    train_seconds = global_step = None
    if (output_dir / "train_results.json").is_file():
        train_seconds = json.loads((output_dir / "train_results.json").read_text()).get("train_runtime")
    if (output_dir / "trainer_state.json").is_file():
        global_step = json.loads((output_dir / "trainer_state.json").read_text()).get("global_step")
    return RunStats(str(output_dir), round(run.seconds, 1), train_seconds, round(run.peak_rss_mib, 1), global_step)


def idle_worker_rss_mib(folder: str | os.PathLike) -> float:
    """Peak RSS of a worker that trains nothing: what every run's peak includes before it loads anything (Python,
    torch, transformers, TRL)."""
    return round(idle_child_peak_rss_mib(Path(folder) / "idle_worker.log", preload=WORKER_PRELOAD), 1)


# --- what a run trained ---------------------------------------------------------------------------------------------


def trainable_parameters(run_dir: str | os.PathLike) -> int:
    """Parameters a finished run trained: the LoRA adapter's weights if the folder holds an adapter, else every
    weight of the model (tied input and output embeddings counted once)."""
    run_dir = Path(run_dir)
    adapter = run_dir / "adapter_model.safetensors"
    if adapter.is_file():
        from safetensors import safe_open

        with safe_open(str(adapter), framework="pt") as f:
            names = f.keys()  # a safe_open file has keys() but no iteration
            return sum(_numel(f.get_slice(name).get_shape()) for name in names)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir)
    return sum(p.numel() for p in model.parameters())


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count

"""Our trainers against stock TRL on the same work: throughput, peak memory and the first losses (behind
`scripts/benchmark.py`).

Each side runs in its own process (`alignment.run.measure`), so its peak resident memory is its own, on the same data
and the same weights: a random GPT-2 saved once and loaded by both sides (ours converts it into our class, stock TRL
uses transformers' GPT2LMHeadModel on sdpa), with the same batch size, max length and number of steps, after warm-up
steps that are not timed. Gradient checkpointing is off on every side (TRL turns it on by default; it trades speed
for memory and would only slow the stock side down).
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from alignment.run.measure import peak_rss_mib, run_in_child

MODELS = {  # name -> GPT-2 config fields
    "tiny": {"n_layer": 2, "n_head": 2, "n_embd": 64},  # for smoke tests
    "small": {"n_layer": 4, "n_head": 4, "n_embd": 256},
    "gpt2": {"n_layer": 12, "n_head": 12, "n_embd": 768},
}
DPO_SIDES = ("ours", "trl", "trl-precompute", "ours-precompute")
SFT_SIDES = ("ours", "trl")
# the words of generated pairs (a sentence, split, reads better than 25 quoted words)
WORDS = "the a to of and is in that it you for what can be this have with are not on your do as but they".split()  # noqa: SIM905
# Set for the side processes, before their fork server imports the Hugging Face libraries (which read them then).
SIDE_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
SIDE_PRELOAD = ("datasets", "transformers", "trl", "alignment.training")  # imported once by the fork server


@dataclass(frozen=True)
class Settings:
    """One comparison: the task, the model preset, and the work every side does."""

    task: str  # "dpo" or "sft"
    model: str = "small"  # a key of MODELS
    dtype: str = "fp32"  # or "bf16"
    batch_size: int = 8
    max_length: int = 512
    warmup: int = 2  # untimed steps first
    steps: int = 5  # timed steps
    data: str | None = None  # HH-RLHF-shaped jsonl(.gz); None: generated pairs

    def __post_init__(self):
        if self.task not in ("dpo", "sft"):
            raise ValueError(f"task must be dpo or sft, got {self.task!r}")
        if self.warmup < 1 or self.steps < 1:
            raise ValueError("--warmup and --steps must be at least 1")

    @property
    def sides(self) -> tuple[str, ...]:
        return DPO_SIDES if self.task == "dpo" else SFT_SIDES


# --- the data ---------------------------------------------------------------------------------------------------


def synthetic_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """HH-RLHF-shaped pairs: multi-turn prompts of ~85 words (median ~62, long tail), replies of ~30-40 words."""
    rng = random.Random(seed)

    def text(words: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(max(1, words)))

    rows = []
    for _ in range(n):
        prompt_words = min(int(rng.lognormvariate(4.1, 0.6)), 670)
        turns = max(1, prompt_words // 40)
        prompt = (
            "".join(
                f"\n\nHuman: {text(prompt_words // (2 * turns))}\n\nAssistant: {text(prompt_words // (2 * turns))}"
                for _ in range(turns - 1)
            )
            + f"\n\nHuman: {text(prompt_words // (2 * turns))}\n\nAssistant:"
        )
        rows.append(
            {
                "prompt": prompt,
                "chosen": " " + text(int(rng.gauss(31, 12))),
                "rejected": " " + text(int(rng.gauss(39, 15))),
            }
        )
    return rows


def load_pairs(path: str | None, n: int) -> list[dict[str, str]]:
    """The first n preference pairs of a file (any format the library reads), or n generated ones without a path."""
    if path is None:
        return synthetic_pairs(n)
    from datasets import load_dataset

    from alignment.data import normalize_dataset

    data, _ = normalize_dataset(load_dataset("json", data_files=path, split="train"), "preference", source=path)
    return [data[i] for i in range(min(n, len(data)))]


def training_rows(settings: Settings) -> list[dict[str, str]]:
    """Every side's training rows: pairs for DPO; for SFT, prompt + chosen texts (4x, as packing needs more rows)."""
    pairs = load_pairs(settings.data, settings.batch_size * (settings.warmup + settings.steps))
    return pairs if settings.task == "dpo" else [{"text": p["prompt"] + p["chosen"]} for p in pairs * 4]


def save_random_gpt2(model: str, folder: Path) -> Path:
    """A random transformers GPT-2 of the preset, without dropout (the assignment's "gpt2" preset): attention
    dropout would push PyTorch's CPU attention onto its unfused path, which stores every attention matrix of a
    4,000-token packed row (both sides alike)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(**MODELS[model], n_positions=1024, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


# --- one side, in its own process -------------------------------------------------------------------------------


def run_side(settings: dict[str, Any], side: str, weights: str, rows: list[dict[str, str]]) -> dict[str, Any]:
    """Train one side for warmup + steps steps: its time per step, set-up time, peak RSS, losses and rate."""
    import datasets
    import torch
    import transformers
    import trl
    from transformers import TrainerCallback

    import alignment
    from alignment.modeling.tokenizer import load_tokenizer
    from alignment.training import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
    from alignment.training.dpo import frozen_copy

    options = Settings(**settings)
    torch.manual_seed(0)
    ours = side.startswith("ours")
    dtype = torch.bfloat16 if options.dtype == "bf16" else torch.float32
    if ours:
        model = alignment.AlignmentGPT2ForCausalLM.from_pretrained(weights, dtype=dtype)
    else:
        model = transformers.GPT2LMHeadModel.from_pretrained(weights, dtype=dtype, attn_implementation="sdpa")
    tokenizer = load_tokenizer("gpt2")
    total_steps = options.warmup + options.steps
    common = dict(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=options.batch_size,
        max_steps=total_steps,
        max_length=options.max_length,
        learning_rate=1e-6,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        gradient_checkpointing=False,
        bf16=options.dtype == "bf16",
        use_cpu=not torch.cuda.is_available(),
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )

    class Clock(TrainerCallback):
        """The end time of every step (after the GPU finished it)."""

        def __init__(self):
            self.marks = []

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks.append(time.perf_counter())

    clock = Clock()
    start = time.perf_counter()
    if options.task == "dpo":
        precompute = side.endswith("precompute")
        config_class, trainer_class = (DPOConfig, DPOTrainer) if ours else (trl.DPOConfig, trl.DPOTrainer)
        args = config_class(**common, precompute_ref_log_probs=precompute, beta=0.1)
        ref_model = None if precompute else frozen_copy(model)
        trainer = trainer_class(
            model,
            ref_model,
            args=args,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[clock],
        )
    else:
        config_class, trainer_class = (SFTConfig, SFTTrainer) if ours else (trl.SFTConfig, trl.SFTTrainer)
        args = config_class(**common, packing=True, packing_strategy="bfd")  # TRL's default, so batches are equal
        trainer = trainer_class(
            model,
            args=args,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[clock],
        )
    setup_seconds = time.perf_counter() - start
    batches = iter(trainer.get_train_dataloader())
    tokens = [_tokens_in(next(batches)) for _ in range(total_steps)] if options.task == "sft" else []
    trainer.train()
    seconds = clock.marks[-1] - clock.marks[options.warmup - 1]  # from the end of the last warm-up step
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    result = {
        "side": side,
        "seconds_per_step": seconds / options.steps,
        "setup_seconds": setup_seconds,
        "peak_rss_gb": peak_rss_mib() / 1024,
        "losses": losses[:total_steps],
    }
    if options.task == "dpo":
        result["pairs_per_second"] = options.batch_size * options.steps / seconds
    else:
        result["tokens_per_second"] = sum(tokens[options.warmup :]) / seconds
    return result


def _tokens_in(batch) -> int:
    """Real (non-padding) tokens of an SFT batch."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int((batch["labels"] != -100).sum()) + batch["input_ids"].size(0)


# --- the comparison ---------------------------------------------------------------------------------------------


def compare(settings: Settings, sides: list[str] | None = None) -> dict[str, Any]:
    """Every side (default: all for the task) on the same weights and rows, one process each; the report."""
    import torch

    os.environ.update(SIDE_ENVIRONMENT)
    work = Path(tempfile.mkdtemp(prefix="alignment-benchmark-"))
    weights = save_random_gpt2(settings.model, work / "weights")
    rows = training_rows(settings)
    results = []
    for side in sides or settings.sides:
        run = run_in_child(
            run_side,
            asdict(settings),
            side,
            str(weights),
            rows,
            log_path=work / f"{side}.log",
            what=f"side {side}",
            preload=SIDE_PRELOAD,
        )
        results.append(run.result)
        print(f"  {side}: done", file=sys.stderr)
    return {
        "task": settings.task,
        "model": settings.model,
        "dtype": settings.dtype,
        "batch_size": settings.batch_size,
        "max_length": settings.max_length,
        "steps": settings.steps,
        "warmup": settings.warmup,
        "data": settings.data or "generated",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cpus": os.cpu_count(),
        "results": results,
    }


def print_table(report: dict[str, Any]) -> None:
    """Rate and peak RSS of every side, each against stock TRL's, and its first losses."""
    rate = "pairs_per_second" if report["task"] == "dpo" else "tokens_per_second"
    results = {r["side"]: r for r in report["results"]}
    base = results.get("trl")
    print(
        f"\n{report['task'].upper()} · GPT-2 {report['model']} · {report['dtype']} · batch {report['batch_size']} · "
        f"max_length {report['max_length']} · {report['steps']} timed steps · {report['device']}"
    )
    print(f"{'side':<18}{rate.replace('_', ' '):>18}{'vs trl':>9}{'peak RSS GB':>13}{'vs trl':>9}  first losses")
    for side, r in results.items():
        speed = f"{r[rate] / base[rate]:.2f}x" if base else ""
        memory = f"{r['peak_rss_gb'] / base['peak_rss_gb']:.2f}x" if base else ""
        losses = " ".join(f"{x:.4f}" for x in r["losses"][:3])
        print(f"{side:<18}{r[rate]:>18.2f}{speed:>9}{r['peak_rss_gb']:>13.2f}{memory:>9}  {losses}")

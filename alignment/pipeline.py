"""What `scripts/run_sft.py` and `scripts/run_dpo.py` do: recipe → data, model → trainer → checkpoint (→ Hub).

    recipe = parse_recipe(...)              model and tokenizer (checked against each other)
    data   = load_*_dataset(...)            bad rows dropped and counted; a held-out split
    trainer.train()                         TRL's loop with our log-prob and loss computations
    save_run(...)                           weights, tokenizer, model code, resolved recipe, metrics, model card,
                                            curves, merged LoRA model; pushed to the Hub when asked
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from transformers import set_seed
from trl import get_peft_config

from .configs import DataArguments, DPOConfig, ModelArguments, SFTConfig
from .data import load_preference_dataset, load_sft_dataset
from .integrations import hub_push_possible, prepare_wandb, push_folder
from .loading import load_model_and_tokenizer
from .recipe import parse_recipe, save_resolved_recipe
from .trainers import DPOTrainer, SFTTrainer

logger = logging.getLogger(__name__)


def resume_argument(value: str | None) -> str | bool | None:
    """`--resume_from_checkpoint=true` resumes from the newest checkpoint; a path resumes from that one."""
    if value is None or str(value).lower() in ("false", "no", "0", ""):
        return None
    return True if str(value).lower() in ("true", "yes", "1") else value


def held_out_size(test_size: float) -> float | int:
    """`test_size` below 1 is a share of the rows, from 1 up a row count: the recipe field is a float, and
    `datasets` takes a count only as an int (`test_size: 20` would otherwise fail as 20.0)."""
    return int(test_size) if test_size >= 1 else test_size


def prepare_run(args: Any) -> bool:
    """Set up logging integrations before the trainer exists; returns whether to push to the Hub at the end."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)
    prepare_wandb(args.report_to)
    wants_push = bool(args.push_to_hub)
    if wants_push and not hub_push_possible():
        args.push_to_hub = False  # Trainer would otherwise fail at init creating the repository
    return wants_push and args.push_to_hub


def run_sft(argv: list[str]) -> Path:
    model_args, data_args, args = parse_recipe((ModelArguments, DataArguments, SFTConfig), argv)
    wants_push = prepare_run(args)
    model, tokenizer = load_model_and_tokenizer(model_args, args.max_length, args.trust_remote_code)
    data = load_sft_dataset(
        data_args.specs(),
        seed=args.seed,
        test_size=held_out_size(data_args.test_size),
        completion_only=bool(args.completion_only_loss),
    )
    trainer = SFTTrainer(
        model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["test"] if args.eval_strategy != "no" and len(data["test"]) else None,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    return train_and_save(trainer, model_args, data_args, args, wants_push, method="SFT")


def run_dpo(argv: list[str]) -> Path:
    model_args, data_args, args = parse_recipe((ModelArguments, DataArguments, DPOConfig), argv)
    wants_push = prepare_run(args)
    model, tokenizer = load_model_and_tokenizer(model_args, args.max_length, args.trust_remote_code)
    prompt_budget = data_args.max_prompt_length or (args.max_length - 1 if args.max_length else None)
    data = load_preference_dataset(
        data_args.specs(),
        seed=args.seed,
        test_size=held_out_size(data_args.test_size),
        tokenizer=tokenizer if prompt_budget else None,
        max_prompt_length=prompt_budget,
    )
    trainer = DPOTrainer(
        model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data["test"] if args.eval_strategy != "no" and len(data["test"]) else None,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    return train_and_save(trainer, model_args, data_args, args, wants_push, method="DPO")


def train_and_save(trainer, model_args, data_args, args, wants_push: bool, method: str) -> Path:
    output_dir = Path(args.output_dir)
    if trainer.is_world_process_zero():  # one writer: processes writing it at once race on recipe.yaml.tmp
        save_resolved_recipe(output_dir, model_args, data_args, args)
    result = trainer.train(resume_from_checkpoint=resume_argument(args.resume_from_checkpoint))
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    if trainer.eval_dataset is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    trainer.save_state()
    trainer.args.push_to_hub = False  # else save_model pushes by itself, before the card exists, and may abort the run
    trainer.save_model(str(output_dir))  # on every process: with FSDP or ZeRO-3, gathering the weights is collective
    if trainer.is_world_process_zero():
        save_run(trainer, model_args, data_args, output_dir, method)
        if wants_push:
            push_folder(output_dir, args.hub_model_id or output_dir.name, token=args.hub_token)
    trainer.accelerator.wait_for_everyone()
    return output_dir


def save_run(trainer, model_args: ModelArguments, data_args: DataArguments, output_dir: Path, method: str) -> None:
    """Everything a user (or the Hub) needs next to the weights (saved by then): merged LoRA model, card, curves."""
    if model_args.use_peft and model_args.merge_adapter_on_save:
        merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        merged.save_pretrained(output_dir / "merged")
        trainer.processing_class.save_pretrained(output_dir / "merged")
    datasets = [spec["path"] for spec in data_args.specs()]
    trainer.create_model_card(model_name=output_dir.name, dataset_name=", ".join(datasets))
    plots = draw_curves(output_dir)
    append_results_to_card(output_dir, method, model_args, datasets, plots)


def draw_curves(output_dir: Path) -> list[Path]:
    try:
        from .plotting import plot_run
    except ImportError:
        return []
    try:
        return plot_run(output_dir)
    except Exception as error:  # a figure must never cost a finished run
        logger.warning("could not draw the training curves: %s", error)
        return []


def append_results_to_card(
    output_dir: Path, method: str, model_args: ModelArguments, datasets: list[str], plots: list[Path]
) -> None:
    """Add what was trained, on what, the final metrics and the curves to TRL's model card."""
    base_model = model_args.model_name_or_path or f"{model_args.model_config} (random initialisation)"
    lines = ["", "## Training run", "", f"- method: {method}", f"- base model: {base_model}"]
    lines += [f"- data: {', '.join(datasets)}", "- recipe: [`recipe.yaml`](recipe.yaml)", ""]
    for split in ("train", "eval"):
        path = output_dir / f"{split}_results.json"
        if path.exists():
            metrics = json.loads(path.read_text())
            lines += [f"### Final {split} metrics", "", "| metric | value |", "| --- | --- |"]
            lines += [f"| {key} | {value:.4g} |" for key, value in metrics.items() if isinstance(value, (int, float))]
            lines.append("")
    if plots:
        lines += ["### Curves", ""] + [f"![{p.stem}]({p.relative_to(output_dir).as_posix()})" for p in plots] + [""]
    card = output_dir / "README.md"
    with open(card, "a", encoding="utf-8") as f:
        f.write("\n".join(lines))

"""What `scripts/run_sft.py` and `scripts/run_dpo.py` do: recipe → data, model → trainer → checkpoint (→ Hub).

    recipe = parse_recipe(...)              model and tokenizer (checked against each other)
    data   = load_*_dataset(...)            bad rows dropped and counted; a held-out split
    trainer.train()                         TRL's loop with our log-prob and loss computations
    save_run(...)                           weights, tokenizer, model code, resolved recipe, metrics, model card,
                                            curves, merged LoRA model; pushed to the Hub when asked
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import set_seed
from trl import get_peft_config

from .callbacks import (
    SOURCE_ROW,
    GracefulInterrupt,
    NonFiniteLossGuard,
    SourceRowsMixin,
    TrainingInterrupted,
    rows_by_text,
)
from .checkpoints import AtomicCheckpointsMixin, check_output_dir, last_complete_checkpoint, resume_checkpoint
from .configs import DataArguments, DPOConfig, ModelArguments, SFTConfig
from .data import DataFormatError, load_preference_dataset, load_sft_dataset
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


def prepare_output(args: Any) -> str | None:
    """Before anything loads: the output folder is usable and a saved run is never overwritten by accident
    (only with `overwrite_output_dir`, or when resuming); returns the checkpoint folder to resume from, if any."""
    resume = resume_argument(args.resume_from_checkpoint)
    check_output_dir(
        args.output_dir,
        overwrite=args.overwrite_output_dir,
        resuming=resume is not None,
        clean_stale=args.should_save,
    )
    return resume_checkpoint(resume, args.output_dir)


@functools.cache
def reliable(trainer_class: type) -> type:
    """The trainer with atomic checkpoints and the bookkeeping that names a failing batch's rows."""
    return type(trainer_class.__name__, (AtomicCheckpointsMixin, SourceRowsMixin, trainer_class), {
        "__module__": __name__, "__doc__": trainer_class.__doc__,
    })


def check_lora_targets(model: Any, model_args: ModelArguments) -> None:
    """Every LoRA target must name modules of the model (PEFT ignores a misspelt one as long as another matches).
    A list holds module names (or dotted suffixes); a single string is a regular expression, as in PEFT."""
    targets = model_args.lora_target_modules
    if not model_args.use_peft or not targets or targets == "all-linear":
        return
    names = [name for name, _ in model.named_modules() if name]
    if isinstance(targets, str):
        missing = [] if any(re.fullmatch(targets, n) for n in names) else [targets]
    else:
        missing = [t for t in targets if t != "all-linear" and not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and _is_linear(m)})
        raise ValueError(
            f"lora_target_modules {missing} match no module of the model; its linear layers are named: "
            f"{', '.join(linear)}"
        )


def _is_linear(module: Any) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def load_data(loader: Any, specs: list[dict[str, Any]], **kwargs: Any) -> Any:
    """`loader(specs, ...)`, with one clear line for what the data libraries report badly (an empty file is a bare
    StopIteration, a malformed one "An error occurred while generating the dataset")."""
    names = ", ".join(str(spec.get("path")) for spec in specs)
    for spec in specs:
        path = Path(str(spec.get("path", ""))).expanduser()
        if path.is_file() and path.stat().st_size == 0:
            raise DataFormatError(f"{spec['path']} is empty")
    try:
        return loader(specs, **kwargs)
    except (DataFormatError, ValueError, TypeError):  # ours, and the specs' own checks: already one clear line
        raise
    except StopIteration:
        raise DataFormatError(f"{names}: no rows to read") from None
    except Exception as error:
        detail = first_line(error)
        cause = error.__cause__ or error.__context__
        if type(error).__name__ == "DatasetGenerationError" and cause is not None:  # says nothing by itself
            detail += f": {first_line(cause)}"
        raise DataFormatError(f"cannot load the data {names}: {detail}") from error


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def with_source_rows(dataset: Dataset) -> Dataset:
    """Number the training rows, so a failing batch can be traced back to them (`alignment.callbacks`)."""
    return dataset.add_column(SOURCE_ROW, list(range(len(dataset))))


def attach_safety(trainer: Any, train_rows: Dataset, tokenizer: Any) -> GracefulInterrupt:
    """Ctrl-C saves and stops; a NaN/inf loss stops before the update, naming the batch's rows."""

    def locate(batch: dict[str, Any]) -> list[int]:
        if batch.get(SOURCE_ROW) is not None:
            return [int(i) for i in batch[SOURCE_ROW].tolist()]
        if batch.get("input_ids") is None:
            return []
        columns = train_rows.column_names
        if "text" in columns:
            texts = train_rows["text"]
        elif "prompt" in columns and "completion" in columns:
            texts = [p + c for p, c in zip(train_rows["prompt"], train_rows["completion"])]
        else:
            return []
        return rows_by_text(batch["input_ids"], tokenizer, texts)

    def describe(rows: list[int]) -> list[dict[str, Any]]:
        return [{"row": i, **{k: v for k, v in train_rows[i].items() if k != SOURCE_ROW}} for i in rows]

    trainer.loss_guard = NonFiniteLossGuard(locate, describe)
    trainer.add_callback(trainer.loss_guard)
    interrupt = GracefulInterrupt()
    trainer.add_callback(interrupt)
    return interrupt


@contextlib.contextmanager
def hub_token_kept_out(args: Any) -> Iterator[str | None]:
    """Keep the Hub token out of everything the Trainer saves (it pickles its arguments into training_args.bin):
    while it trains, the token is only in the environment, where huggingface_hub finds it; returned for the push."""
    token = args.hub_token
    if not token:
        yield None
        return
    args.hub_token = None
    previous = os.environ.get("HF_TOKEN")
    if args.push_to_hub:  # the Trainer's own pushes during training
        os.environ["HF_TOKEN"] = token
    try:
        yield token
    finally:
        args.hub_token = token
        if previous is None:
            os.environ.pop("HF_TOKEN", None)
        else:
            os.environ["HF_TOKEN"] = previous


def run_sft(argv: list[str]) -> Path:
    return run("SFT", SFTConfig, SFTTrainer, argv)


def run_dpo(argv: list[str]) -> Path:
    return run("DPO", DPOConfig, DPOTrainer, argv)


def run(method: str, config_class: type, trainer_class: type, argv: list[str]) -> Path:
    model_args, data_args, args = parse_recipe((ModelArguments, DataArguments, config_class), argv)
    wants_push = prepare_run(args)
    resume = prepare_output(args)
    model, tokenizer = load_model_and_tokenizer(model_args, args.max_length, args.trust_remote_code)
    check_lora_targets(model, model_args)
    data = training_data(method, data_args, args, tokenizer)
    with hub_token_kept_out(args) as hub_token:
        trainer = reliable(trainer_class)(
            model,
            args=args,
            train_dataset=with_source_rows(data["train"]),
            eval_dataset=data["test"] if args.eval_strategy != "no" and len(data["test"]) else None,
            processing_class=tokenizer,
            peft_config=get_peft_config(model_args),
        )
        interrupt = attach_safety(trainer, data["train"], tokenizer)
        return train_and_save(
            trainer, model_args, data_args, args, wants_push, method=method, resume=resume, interrupt=interrupt,
            hub_token=hub_token,
        )


def training_data(method: str, data_args: DataArguments, args: Any, tokenizer: Any) -> Any:
    """SFT text (or prompt/completion), or preference pairs whose prompts fit the length budget."""
    common = {"seed": args.seed, "test_size": held_out_size(data_args.test_size)}
    if method == "SFT":
        return load_data(load_sft_dataset, data_args.specs(), completion_only=bool(args.completion_only_loss), **common)
    prompt_budget = data_args.max_prompt_length or (args.max_length - 1 if args.max_length else None)
    return load_data(
        load_preference_dataset,
        data_args.specs(),
        tokenizer=tokenizer if prompt_budget else None,
        max_prompt_length=prompt_budget,
        **common,
    )


def train_and_save(
    trainer, model_args, data_args, args, wants_push: bool, method: str, resume: str | None = None,
    interrupt: GracefulInterrupt | None = None, hub_token: str | None = None,
) -> Path:
    output_dir = Path(args.output_dir)
    if trainer.is_world_process_zero():  # one writer: processes writing it at once race on recipe.yaml.tmp
        save_resolved_recipe(output_dir, model_args, data_args, args)
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    finally:
        if interrupt is not None:
            interrupt.restore()  # on_train_end does it too, but not when training failed
    if interrupt is not None and interrupt.stopped_at_step is not None:
        trainer.accelerator.wait_for_everyone()
        checkpoint = last_complete_checkpoint(output_dir, warn=False)
        raise TrainingInterrupted(
            f"training stopped at step {interrupt.stopped_at_step}; checkpoint saved in {checkpoint}; "
            "resume with --resume_from_checkpoint=true",
            exit_code=interrupt.exit_code,
        )
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
            push_folder(output_dir, args.hub_model_id or output_dir.name, token=hub_token)
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

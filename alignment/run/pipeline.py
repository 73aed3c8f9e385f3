"""What `scripts/run_sft.py` and `scripts/run_dpo.py` do, top to bottom, for one `Stage` (SFT or DPO):

parse the recipe              → model, data and training arguments, with this machine's defaults
prepare the run               → logging, seed, wandb, the Hub, the output folder (never overwritten by accident)
load the model and tokenizer  → checked against each other and against max_length
load the data                 → bad rows dropped and counted; a held-out split
build the trainer             → ours: TRL's loop with our log-probs, losses and safety
train, save, push             → weights, tokenizer, model code, resolved recipe, metrics, card, curves
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import transformers
import yaml
from transformers import set_seed
from trl import get_peft_config

from ..common import first_line
from ..data import DataFormatError, load_preference_dataset, load_sft_dataset
from ..modeling.chat_templates import fit_model_to_tokenizer, set_chat_template
from ..modeling.export import export_stock_gpt2
from ..modeling.loading import load_model_and_tokenizer
from ..training import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
from ..training.checkpoints import check_output_dir, clear_previous_run, resume_checkpoint
from .arguments import DataArguments, ModelArguments, default_lora_targets
from .engine import check_engine_request, whole_weights_loading
from .folder_lock import RunFolderLock
from .integrations import describe_wandb_run, hub_push_possible, prepare_wandb, push_folder
from .model_card import RunCard, model_type_of, prompt_style
from .recipe import RESOLVED_RECIPE, parse_recipe, resolved_recipe, save_resolved_recipe
from .resume_check import check_resume_recipe
from .run_line import check_launch, launch_line, run_line

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """One training method as the pipeline runs it."""

    name: str  # "SFT" or "DPO": the model card's method line
    config_class: type
    trainer_class: type
    load_data: Callable[[DataArguments, Any, Any], Any]  # (data arguments, training config, tokenizer) -> splits


def sft_data(data_args: DataArguments, args: SFTConfig, tokenizer: Any) -> Any:
    """SFT text, or prompt/completion pairs with `completion_only_loss`."""
    return load_data(
        load_sft_dataset,
        data_args.specs(),
        completion_only=bool(args.completion_only_loss),
        tokenizer=tokenizer,
        **split_settings(data_args, args),
    )


def preference_data(data_args: DataArguments, args: DPOConfig, tokenizer: Any) -> Any:
    """Preference pairs whose prompts fit the length budget (default: max_length - 1 tokens)."""
    prompt_budget = data_args.max_prompt_length or (args.max_length - 1 if args.max_length else None)
    return load_data(
        load_preference_dataset,
        data_args.specs(),
        tokenizer=tokenizer if prompt_budget is not None else None,
        max_prompt_length=prompt_budget,
        **split_settings(data_args, args),
    )


SFT = Stage("SFT", SFTConfig, SFTTrainer, sft_data)
DPO = Stage("DPO", DPOConfig, DPOTrainer, preference_data)


def run(stage: Stage, argv: list[str]) -> Path:
    """Train one stage from a recipe and command-line overrides; returns the output folder."""
    model_args, data_args, args = parse_recipe((ModelArguments, DataArguments, stage.config_class), argv)
    check_engine_request(args)  # an engine that cannot start here stops the run now, in one line
    check_trainable(args, data_args)
    wants_push = prepare_run(args)
    logger.info(launch_line(args))  # the first line: what trains (check_launch stops the run if anything else would)
    with RunFolderLock(args.output_dir):  # no other run writes into this folder meanwhile
        return train_stage(stage, model_args, data_args, args, wants_push)


def train_stage(
    stage: Stage, model_args: ModelArguments, data_args: DataArguments, args: Any, wants_push: bool
) -> Path:
    """Everything after parsing, inside the folder lock: output folder, model, data, trainer, train, save, push."""
    resume = prepare_output(args)
    recipe = resolved_recipe(model_args, data_args, args)
    if resume is not None:  # the checkpoint continues the run it was saved in, not another one
        check_resume_recipe(resume, recipe, args.output_dir, args.allow_recipe_change)
    model, tokenizer = load_model_and_tokenizer(
        model_args.model_name_or_path,
        tokenizer_name_or_path=model_args.tokenizer_name_or_path,
        max_length=args.max_length,
        **model_loading(model_args, args.trust_remote_code),
    )
    added_tokens = set_chat_template(tokenizer, model_args.chat_template)
    if fit_model_to_tokenizer(model, tokenizer):
        logger.info("embeddings resized to %d tokens for the chat template's %s", len(tokenizer), added_tokens)
    check_lora_targets(model, model_args)
    data = stage.load_data(data_args, args, tokenizer)
    peft_config = get_peft_config(model_args)
    if peft_config is not None and added_tokens:  # LoRA alone would leave the new tokens' rows at their random init
        peft_config.trainable_token_indices = list(added_tokens)
    with hub_token_kept_out(args) as hub_token:
        trainer = stage.trainer_class(
            model,
            args=args,
            train_dataset=data["train"],
            eval_dataset=data["test"] if args.eval_strategy != "no" and len(data["test"]) else None,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
        check_launch(trainer)  # what the launcher asked for is what runs, or one line why not
        logger.info(run_line(trainer))
        trainer.checkpoint_files = {RESOLVED_RECIPE: yaml.safe_dump(recipe, sort_keys=True)}
        example = data["train"][0] if len(data["train"]) else None  # the prompt format, for the card's quick start
        RunCard(trainer, stage.name, model_args, data_args, prompt_style(example)).install()  # also TRL's saves
        describe_wandb_run(trainer, recipe, tags=[stage.name.lower(), model_type_of(trainer) or "unknown"])
        output_dir = train_and_save(trainer, model_args, data_args, args, stage, resume=resume)
        if wants_push and trainer.is_world_process_zero():
            push_folder(
                output_dir,
                args.hub_model_id or output_dir.name,
                token=hub_token,
                private=args.hub_private_repo,
                revision=args.hub_revision,
            )
        trainer.accelerator.wait_for_everyone()
    return output_dir


def run_sft(argv: list[str]) -> Path:
    return run(SFT, argv)


def run_dpo(argv: list[str]) -> Path:
    return run(DPO, argv)


def model_loading(model_args: ModelArguments, trust_remote_code: bool) -> dict[str, Any]:
    """The recipe's model settings as `alignment.modeling.loading.load_model` takes them; a model field that would
    be read nowhere (or cannot work, e.g. quantization without LoRA) is refused here, before anything loads.
    `load_in_4bit` / `load_in_8bit` go through TRL's `get_quantization_config` (QLoRA), as in TRL's scripts."""
    from trl import get_quantization_config

    from ..modeling.loading import kbit_device_map
    from .field_audit import check_model_fields

    check_model_fields(model_args)
    quantization_config = get_quantization_config(model_args)
    return {
        "config_name": model_args.model_config,
        "config_overrides": model_args.model_config_overrides,
        "revision": model_args.model_revision,
        "dtype": model_args.dtype,
        "attn_implementation": model_args.attn_implementation,
        "implementation": model_args.model_implementation,
        "trust_remote_code": trust_remote_code,
        "quantization_config": quantization_config,
        "device_map": kbit_device_map() if quantization_config is not None else None,
    }


def split_settings(data_args: DataArguments, args: Any) -> dict[str, Any]:
    seed = args.seed if data_args.dataset_seed is None else data_args.dataset_seed
    return {"seed": seed, "test_size": held_out_size(data_args.test_size)}


def check_trainable(args: Any, data_args: DataArguments) -> None:
    """Settings that would "succeed" without training anything, or fail deep inside a library: one line each,
    before anything loads."""
    if not str(args.output_dir or "").strip():
        raise ValueError("output_dir is empty; name the folder the run is saved in")
    if args.max_steps <= 0 and args.num_train_epochs <= 0:
        raise ValueError(
            f"nothing to train: max_steps is {args.max_steps} and num_train_epochs {args.num_train_epochs}; "
            "set max_steps above 0 or num_train_epochs above 0"
        )
    if args.gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps must be at least 1, got {args.gradient_accumulation_steps}")
    if args.max_length is not None and args.max_length < 2:
        raise ValueError(f"max_length {args.max_length} leaves no token to predict; use at least 2 (e.g. 512)")
    size = data_args.test_size
    if size < 0 or (size >= 1 and size != int(size)):
        raise ValueError(
            f"test_size {size:g}: a share of the rows is below 1 (e.g. 0.05), a row count a whole number (e.g. 100)"
        )
    from .field_audit import check_training_fields

    check_training_fields(args, data_args)  # no recipe field is parsed and then silently ignored


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
    """Set up logging integrations before the trainer exists; returns whether to push to the Hub at the end.

    With an unreachable Hub, `push_to_hub` is switched off for the whole run (the Trainer would otherwise fail at
    init creating the repository); else the Trainer pushes checkpoints while it trains, and the final push is ours
    (`train_and_save`), after the model card exists."""
    configure_logging(args)
    set_seed(args.seed)
    prepare_wandb(args.report_to)
    if args.push_to_hub and not hub_push_possible():
        args.push_to_hub = False
    return bool(args.push_to_hub)


def configure_logging(args: Any) -> None:
    """The main process logs info and warnings; the others warnings only (transformers' `log_level_replica`), and not
    the data-filter lines, which every process would repeat word for word."""
    if args.should_log:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
        return
    level = args.get_process_log_level()
    logging.basicConfig(format=f"[rank {args.process_index}] %(levelname)s %(name)s: %(message)s", level=level)
    transformers.utils.logging.set_verbosity(level)
    datasets.utils.logging.set_verbosity(level)
    logging.getLogger("alignment.data").setLevel(max(level, logging.ERROR))


def prepare_output(args: Any) -> str | None:
    """Before anything loads: the output folder is usable and a saved run is never overwritten by accident
    (only with `overwrite_output_dir`, or when resuming); returns the checkpoint folder to resume from, if any."""
    resume = resume_argument(args.resume_from_checkpoint)
    check_output_dir(args.output_dir, overwrite=args.overwrite_output_dir, resuming=resume is not None)
    return resume_checkpoint(resume, args.output_dir)


def check_lora_targets(model: Any, model_args: ModelArguments) -> None:
    """Every LoRA target must name modules of the model (PEFT ignores a misspelt one as long as another matches).
    A list holds module names (or dotted suffixes); a single string is a regular expression, as in PEFT."""
    if not model_args.use_peft:
        return
    if not model_args.lora_target_modules:
        model_args.lora_target_modules = default_lora_targets(model.config.model_type)
        logger.info("LoRA targets (the default for %s): %s", model.config.model_type, model_args.lora_target_modules)
    targets = model_args.lora_target_modules
    if targets == "all-linear":
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


def train_and_save(trainer, model_args, data_args, args, stage: Stage, resume: str | None = None) -> Path:
    """Train (resuming if asked), evaluate, and save the final model with everything a user needs beside it."""
    output_dir = Path(args.output_dir)
    if trainer.is_world_process_zero():  # one writer: processes writing it at once race on recipe.yaml.tmp
        if args.overwrite_output_dir and resume is None:  # the new run has its model and data: now the old one goes
            clear_previous_run(output_dir)
        if resume is None or not (output_dir / RESOLVED_RECIPE).exists():  # a resumed run's: rewritten at the end
            save_resolved_recipe(output_dir, model_args, data_args, args)
    trainer.accelerator.wait_for_everyone()
    result = trainer.train(resume_from_checkpoint=resume)  # a signal: TrainingInterrupted, after a checkpoint
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    if trainer.eval_dataset is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    trainer.save_state()
    trainer.args.push_to_hub = False  # else save_model pushes by itself, before the card exists; ours comes after
    trainer.save_model(str(output_dir))  # on every process: with FSDP or ZeRO-3, gathering the weights is collective
    if trainer.is_world_process_zero():
        save_resolved_recipe(output_dir, model_args, data_args, args)
        save_run(trainer, model_args, data_args, output_dir, stage.name)
    return output_dir


def save_run(trainer, model_args: ModelArguments, data_args: DataArguments, output_dir: Path, method: str) -> None:
    """Everything a user (or the Hub) needs next to the weights (saved by then): merged LoRA model, card, curves."""
    if model_args.use_peft and model_args.merge_adapter_on_save:
        merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        merged.save_pretrained(output_dir / "merged")
        trainer.processing_class.save_pretrained(output_dir / "merged")
    for folder in (output_dir, output_dir / "merged"):
        if model_args.save_format == "stock":
            save_in_stock_format(folder)
    plots = draw_curves(output_dir)
    card = getattr(trainer, "run_card", None) or RunCard(trainer, method, model_args, data_args)
    card.write(output_dir, plots)  # ours, not TRL's: see `alignment.run.model_card`


def save_in_stock_format(folder: Path) -> None:
    """`save_format: stock`: a saved model of our GPT-2 class rewritten in transformers' `GPT2LMHeadModel` layout
    (lossless: `alignment.modeling.export`); its model code goes. Anything else (an adapter, another architecture,
    no model) is left as it is."""
    config = folder / "config.json"
    if not config.is_file() or json.loads(config.read_text(encoding="utf-8")).get("model_type") != "alignment_gpt2":
        return
    staging = folder / ".stock-export"
    shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while exporting
    with whole_weights_loading():  # the main process alone rereads the model: no ZeRO-3 partitioning collective
        export_stock_gpt2(folder, staging)
    written = [p for p in staging.iterdir() if p.name in STOCK_MODEL_FILES or p.name.startswith("model")]
    for old in [folder / name for name in (*MODEL_CODE_FILES, "config.json")] + list(
        folder.glob("model*.safetensors*")
    ):
        old.unlink(missing_ok=True)
    for path in written:
        os.replace(path, folder / path.name)
    shutil.rmtree(staging)
    logger.info("%s saved in transformers' stock GPT-2 format (save_format: stock)", folder)


STOCK_MODEL_FILES = ("config.json", "generation_config.json")
MODEL_CODE_FILES = ("modeling_gpt2.py", "configuration_gpt2.py", "attention.py")


def draw_curves(output_dir: Path) -> list[Path]:
    try:
        from ..evaluation.plotting import plot_run
    except ImportError:
        return []
    try:
        return plot_run(output_dir)
    except Exception as error:  # a figure must never cost a finished run
        logger.warning("could not draw the training curves: %s", error)
        return []

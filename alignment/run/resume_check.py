"""Resuming continues the run that was saved, not another one: the recipe a checkpoint was trained with is compared
with the one resuming it.

Every checkpoint holds the resolved recipe it was written under (`recipe.yaml`, secrets left out). On resume, a
difference in a setting that changes the result (data, batch geometry, optimizer and schedule, model, loss, seed,
lengths, ...: every key not listed as harmless below) stops the run with one line listing the differences, unless
`allow_recipe_change` is set, which is then logged and recorded in `<output_dir>/recipe-changes.yaml`. Harmless
differences (logging, evaluation and save cadence, reporting, the Hub) pass with a note.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import yaml

from ..training.checkpoints import CheckpointError
from .recipe import RESOLVED_RECIPE

logger = logging.getLogger(__name__)

CHANGES_FILE = "recipe-changes.yaml"
HARMLESS_KEYS = {
    "output_dir", "logging_dir", "run_name", "report_to", "resume_from_checkpoint", "overwrite_output_dir",
    "allow_recipe_change", "disable_tqdm", "log_level", "log_level_replica", "log_on_each_node", "project",
    "trackio_space_id", "push_to_hub", "hub_model_id", "hub_strategy", "hub_private_repo", "hub_always_push",
    "hub_revision", "save_steps", "save_strategy", "save_total_limit", "save_on_each_node", "save_safetensors",
    "eval_steps", "eval_strategy", "eval_delay", "eval_on_start", "per_device_eval_batch_size",
    "eval_accumulation_steps", "metric_for_best_model", "greater_is_better", "load_best_model_at_end",
    "prediction_loss_only", "include_num_input_tokens_seen", "dataloader_num_workers", "dataloader_pin_memory",
    "dataloader_persistent_workers", "dataloader_prefetch_factor", "ref_logps_cache_dir", "trust_remote_code",
}  # fmt: skip
HARMLESS_PREFIXES = ("logging_", "hub_", "push_to_hub")


def is_harmless(key: str) -> bool:
    return key in HARMLESS_KEYS or key.startswith(HARMLESS_PREFIXES)


def recipe_differences(saved: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    ignored = derived_keys(saved, new)
    return {
        key: (saved.get(key), new.get(key))
        for key in sorted(set(saved) | set(new))
        if saved.get(key) != new.get(key) and key not in ignored
    }


def derived_keys(saved: dict[str, Any], new: dict[str, Any]) -> set[str]:
    """Settings derived from others, not chosen: with global_batch_size in both recipes, gradient_accumulation_steps
    follows the world size (a run saved on 1 process and resumed on 2 keeps its batch); a different
    global_batch_size or per-device batch is still a change."""
    if saved.get("global_batch_size") is not None and new.get("global_batch_size") is not None:
        return {"gradient_accumulation_steps"}
    return set()


def shown(differences: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in differences.items())


def check_resume_recipe(checkpoint: str | Path, new: dict[str, Any], output_dir: str | Path, allow: bool) -> None:
    """Compare the checkpoint's recipe with the resuming one (see the module docstring)."""
    path = Path(checkpoint) / RESOLVED_RECIPE
    if not path.is_file():
        logger.warning(
            "%s holds no %s (written by an older version?): the resumed settings cannot be compared",
            checkpoint,
            RESOLVED_RECIPE,
        )
        return
    saved = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    differences = recipe_differences(saved, new)
    changed = {k: v for k, v in differences.items() if not is_harmless(k)}
    harmless = {k: v for k, v in differences.items() if is_harmless(k)}
    if harmless:
        logger.info("resuming %s with other logging/saving settings: %s", checkpoint, shown(harmless))
    if not changed:
        return
    if not allow:
        raise CheckpointError(
            f"resuming {checkpoint} with settings that change the result: {shown(changed)}; resume with the recipe "
            "it was trained with, or pass --allow_recipe_change=true to continue with the new settings"
        )
    logger.warning("allow_recipe_change: resuming %s with changed settings: %s", checkpoint, shown(changed))
    record = Path(output_dir) / CHANGES_FILE
    entries = yaml.safe_load(record.read_text(encoding="utf-8")) if record.is_file() else None
    entries = (entries or []) + [{
        "resumed": str(checkpoint), "at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "changes": {key: {"was": old, "now": new_value} for key, (old, new_value) in changed.items()},
    }]  # fmt: skip
    record.write_text(yaml.safe_dump(entries, sort_keys=False), encoding="utf-8")

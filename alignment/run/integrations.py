"""The Hub and wandb, made safe for runs without a network: nothing hangs, nothing aborts, one line says why."""

from __future__ import annotations

import contextlib
import json
import logging
import netrc
import os
import urllib.parse
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainerCallback

from ..common import first_line, hub_reachable, reachable
from .model_card import HUB_RECORD, strip_local_paths, trace_lineage
from .recipe import RESOLVED_RECIPE

logger = logging.getLogger(__name__)


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def prepare_wandb(report_to: list[str] | str | None) -> None:
    """Keep wandb logging from hanging or aborting a run: without credentials or network, log offline."""
    if not reports_to_wandb(report_to):
        return
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return
    base_url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    reason = None
    if not wandb_has_credentials():
        reason = "no wandb API key (WANDB_API_KEY or `wandb login`)"
    elif not reachable(base_url):
        reason = f"{base_url} is unreachable"
    if reason:
        os.environ["WANDB_MODE"] = "offline"
        logger.warning("wandb: %s; logging offline (sync later with `wandb sync wandb/`)", reason)


def reports_to_wandb(report_to: list[str] | str | None) -> bool:
    targets = [report_to] if isinstance(report_to, str) else list(report_to or [])
    return "wandb" in targets or "all" in targets


def describe_wandb_run(trainer: Any, recipe: dict[str, Any], tags: list[str]) -> None:
    """Give the wandb run a project (`WANDB_PROJECT`, else the recipe's `project`, transformers' field), a name
    (`run_name`, else the output folder's), tags, and the whole resolved recipe, model and data settings included,
    as its config: transformers' callback logs only the training arguments and the model config."""
    if not reports_to_wandb(trainer.args.report_to):
        return
    project = getattr(trainer.args, "project", None)
    if not os.environ.get("WANDB_PROJECT") and project and project != "huggingface":  # transformers' default
        os.environ["WANDB_PROJECT"] = project  # read by transformers' WandbCallback when it starts the run
    trainer.add_callback(WandbRunDetails(recipe, tags))


class WandbRunDetails(TrainerCallback):
    """After transformers' WandbCallback has started the run (callbacks run in order; ours is added last)."""

    def __init__(self, recipe: dict[str, Any], tags: list[str]) -> None:
        self.recipe, self.tags = recipe, tags

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        try:
            import wandb
        except ImportError:
            return
        run = wandb.run
        if run is None:
            return
        run.config.update(self.recipe, allow_val_change=True)
        run.tags = tuple(dict.fromkeys([*(run.tags or ()), *self.tags]))
        if args.run_name is None:
            run.name = Path(args.output_dir).name


def hub_push_possible() -> bool:
    """Whether a push can work; says in one line why not. Checked before training, so a run never dies at init."""
    if not hub_reachable():
        logger.warning("push_to_hub: the Hugging Face Hub is unreachable; checkpoints stay local")
        return False
    return True


UPLOAD_IGNORED = ["checkpoint-*", "*.tmp", "runs/*", "wandb/*", ".alignment.lock", HUB_RECORD]


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    *,
    private: bool | None = None,
    revision: str | None = None,
) -> bool:
    """Upload a finished run's folder in one commit (to branch `revision`, created if needed; a new repo is private
    when `private`); on failure keep the local copy and say so in one line.

    What leaves the machine names no local path: a LoRA adapter's base model becomes the Hub id its lineage started
    from and the recipe's absolute paths their base names, in the uploaded copy only (the folder stays loadable)."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    try:
        api = HfApi(token=token)
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        named, repo_id = repo_id, getattr(repo, "repo_id", None) or repo_id  # "x" is "user/x" on the Hub
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        api.create_commit(
            repo_id,
            operations=upload_operations(folder, renamed=(named, repo_id)),
            commit_message="alignment: final model",
            revision=revision,
        )
    except Exception as error:  # network, auth, quota: none of them may cost the local checkpoint
        logger.warning(
            "push to the Hub failed (%s); the model is kept in %s", first_line(error), Path(folder).resolve()
        )
        return False
    with contextlib.suppress(OSError):  # a later run's lineage starts here; without it, at this folder's base
        (folder / HUB_RECORD).write_text(json.dumps({"repo_id": repo_id, "revision": revision}), encoding="utf-8")
    logger.info("pushed %s to https://huggingface.co/%s", folder, repo_id)
    return True


def upload_operations(folder: Path, renamed: tuple[str, str] | None = None) -> list[Any]:
    """Every file to upload (as `upload_folder` would pick them), with the rewritten ones as bytes; `renamed`:
    (the repo id the card's quick start names, the one the Hub gave), e.g. ("x", "user/x")."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS
    from huggingface_hub.utils import filter_repo_objects

    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    kept = filter_repo_objects(files, ignore_patterns=[*UPLOAD_IGNORED, *DEFAULT_IGNORE_PATTERNS])
    rewritten = {"adapter_config.json": hub_adapter_config, RESOLVED_RECIPE: hub_recipe}
    if renamed and renamed[0] != renamed[1]:
        rewritten["README.md"] = lambda path: path.read_bytes().replace(
            f'"{renamed[0]}"'.encode(), f'"{renamed[1]}"'.encode()
        )
    operations = []
    for name in kept:
        content = rewritten[name](folder / name) if name in rewritten else None
        source = content if content is not None else str(folder / name)
        operations.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=source))
    return operations


def hub_adapter_config(path: Path) -> bytes | None:
    """adapter_config.json with the base model as a Hub id, so that others can load the adapter; None: unchanged."""
    config = json.loads(path.read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    if not base or not Path(str(base)).expanduser().is_dir():
        return None  # a Hub id already (or nothing): as it is
    lineage = trace_lineage(str(base))
    local = Path(str(base)).name
    if lineage.hub_id is None:
        logger.warning(
            "the adapter's base model `%s` is not on the Hub (%s); push it, then point "
            "adapter_config.json's base_model_name_or_path at it",
            local,
            "random initialisation" if lineage.random_init else "origin unknown",
        )
        config["base_model_name_or_path"] = local  # no local path on the Hub
    else:
        if lineage.local_steps:
            logger.warning(
                "the adapter was trained on the local checkpoint `%s`, not on the Hub; its base_model_name_or_path "
                "names %s, where its lineage started: push `%s` and point the adapter at it to load the right base",
                local,
                lineage.hub_id,
                local,
            )
        config["base_model_name_or_path"] = lineage.hub_id
        if lineage.revision and lineage.revision != "main":
            config["revision"] = lineage.revision
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")


def hub_recipe(path: Path) -> bytes:
    """recipe.yaml with absolute local paths cut to their base names: they mean nothing elsewhere, and leak."""
    recipe = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return yaml.safe_dump(strip_local_paths(recipe), sort_keys=True).encode("utf-8")

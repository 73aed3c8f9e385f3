"""The Hub and wandb, made safe for runs without a network: nothing hangs, nothing aborts, one line says why."""

from __future__ import annotations

import logging
import netrc
import os
import urllib.parse
from pathlib import Path

from ..common import first_line, hub_reachable, reachable

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
    targets = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if "wandb" not in targets and "all" not in targets:
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


def hub_push_possible() -> bool:
    """Whether a push can work; says in one line why not. Checked before training, so a run never dies at init."""
    if not hub_reachable():
        logger.warning("push_to_hub: the Hugging Face Hub is unreachable; checkpoints stay local")
        return False
    return True


def push_folder(folder: str | os.PathLike, repo_id: str, token: str | None = None) -> bool:
    """Upload a finished run's folder; on failure keep the local copy and say so in one line."""
    from huggingface_hub import HfApi

    try:
        api = HfApi(token=token)
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            commit_message="alignment: final model",
            ignore_patterns=["checkpoint-*", "*.tmp", "runs/*", "wandb/*", ".alignment.lock"],
        )
    except Exception as error:  # network, auth, quota: none of them may cost the local checkpoint
        logger.warning(
            "push to the Hub failed (%s); the model is kept in %s", first_line(error), Path(folder).resolve()
        )
        return False
    logger.info("pushed %s to https://huggingface.co/%s", folder, repo_id)
    return True

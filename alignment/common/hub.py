"""The Hugging Face Hub seen from a machine that may have no network: Hub ids, a quick reachability probe, caches."""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.request
from pathlib import Path

PROBE_TIMEOUT_S = 5
TRUTHY = {"1", "ON", "YES", "TRUE"}
HUB_ID = re.compile(r"[\w-][\w.-]*(/[\w.-]+)?")  # "name" or "owner/name"
FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".gz", ".txt", ".yaml", ".yml", ".safetensors", ".bin")


def looks_like_hub_id(name: str) -> bool:
    """ "owner/name" or "name", not a file name, not starting with '.' or '~', and not a path under a local folder
    ("outputs/sft" with a local "outputs/" is a mistyped path, not a Hub repository)."""
    if HUB_ID.fullmatch(name) is None or name.startswith((".", "~")) or name.lower().endswith(FILE_SUFFIXES):
        return False
    owner, _, rest = name.partition("/")
    return not (rest and os.path.isdir(owner))


def reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One quick HEAD request: client libraries retry unreachable hosts with backoff for close to a minute."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except urllib.error.HTTPError as error:
        return error.code < 500
    except (OSError, ValueError):  # DNS failure, refused connection, timeout, bad URL
        return False


def hub_reachable() -> bool:
    """Whether the Hub answers now (False at once under HF_HUB_OFFLINE)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_OFFLINE", "").upper() in TRUTHY:
        return False
    return reachable(constants.ENDPOINT)


def default_cache_dir() -> Path:
    """Where this package keeps what it builds or computes once (tokenizer files, reference log-probs):
    `$ALIGNMENT_CACHE` if set, else `~/.cache/alignment`."""
    return Path(os.environ.get("ALIGNMENT_CACHE") or Path.home() / ".cache" / "alignment").expanduser()

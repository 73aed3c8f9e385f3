"""Reference log-probs kept on disk, so that a second run on the same data and reference skips computing them.

The key is a hash of what determines the numbers: the tokenised pairs (their content, in order), the reference
weights, the truncation length and the batch layout. A changed row, weight or setting gives a new key; nothing stale
is ever read. Files are written under a temporary name and renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file

from ..common import default_cache_dir

TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def token_ids_digest(dataset: Dataset, batch_size: int = 10_000) -> str:
    """sha256 of the token-id columns, row by row in dataset order (Arrow buffers, no Python lists)."""
    digest = hashlib.sha256()
    for batch in dataset.select_columns(list(TOKEN_COLUMNS)).with_format("arrow").iter(batch_size=batch_size):
        for name in TOKEN_COLUMNS:
            column = batch.column(name).combine_chunks()
            offsets = column.offsets.to_numpy() - column.offsets[0].as_py()
            digest.update(name.encode())
            digest.update(offsets.astype("int64").tobytes())
            digest.update(column.flatten().to_numpy().astype("int64").tobytes())
    return digest.hexdigest()


def cache_path(cache_dir: str | os.PathLike | None, *parts: object) -> Path:
    key = hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:32]
    return Path(cache_dir or default_cache_dir() / "reference_logps") / f"{key}.safetensors"


def save_reference_logps(path: Path, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"chosen": chosen.contiguous().float(), "rejected": rejected.contiguous().float()}, str(tmp))
    tmp.replace(path)


def load_reference_logps(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = load_file(str(path))
    return tensors["chosen"], tensors["rejected"]

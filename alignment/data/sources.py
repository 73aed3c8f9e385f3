"""Where data comes from: local files and folders, the Hub, and mixtures of several sources with a held-out split.

Every source is read as stored, converted to a trainer's layout by `formats.normalize_dataset`, subsampled, and
pooled; `read_split` gives one split as stored, for evaluation.
"""

from __future__ import annotations

import codecs
import gzip
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, concatenate_datasets, load_dataset

from ..common import looks_like_hub_id
from .formats import FORMATS, DataFormatError, normalize_dataset

logger = logging.getLogger(__name__)

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class DatasetSpec:
    """One source of a data mixture, as written in a recipe.

    ``path`` is a Hub id, a local folder, or a local .json/.jsonl/.parquet/.csv file
    (optionally .gz); a single file is one split, so ``split`` applies to Hub ids and
    folders only. ``eval_split`` names the source's own held-out split (e.g. hh-rlhf's
    "test"); without it, held-out rows are carved out of ``split``.
    """

    path: str
    split: str = "train"
    fraction: float = 1.0
    format: str | None = None
    name: str | None = None
    data_dir: str | None = None
    eval_split: str | None = None

    def __post_init__(self) -> None:
        self.path = os.fspath(self.path)
        if not 0 < self.fraction <= 1:
            raise ValueError(f"{self.path}: fraction must be in (0, 1], got {self.fraction}")
        if self.format is not None and self.format not in FORMATS:
            raise ValueError(f"{self.path}: unknown format {self.format!r}; expected one of {list(FORMATS)}")

    @classmethod
    def from_any(cls, spec: SpecLike) -> DatasetSpec:
        """Accept what a recipe or caller naturally has: a spec, a path, or a YAML mapping."""
        if isinstance(spec, cls):
            return spec
        if isinstance(spec, (str, os.PathLike)):
            return cls(path=spec)
        if isinstance(spec, Mapping):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(spec) - known)
            if unknown:
                raise ValueError(f"unknown dataset spec keys {unknown}; expected some of {sorted(known)}")
            return cls(**spec)
        raise TypeError(f"cannot make a DatasetSpec from {type(spec).__name__}: {spec!r}")


SpecLike = DatasetSpec | str | os.PathLike | Mapping[str, Any]


def _file_builder(path: str) -> str | None:
    """The datasets builder for a data file's extension (".gz" allowed), if any."""
    stem = path.lower().removesuffix(".gz")
    return _FILE_BUILDERS.get(os.path.splitext(stem)[1])


def _check_utf8(path: Path) -> None:
    """Reject a text file that is not UTF-8 up front: pyarrow may load invalid bytes and
    only fail, deep in a traceback, when a row is read."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with (gzip.open if path.name.lower().endswith(".gz") else open)(path, "rb") as stream:
        try:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                decoder.decode(chunk)
                offset += len(chunk)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as error:
            raise DataFormatError(
                f"{path} is not valid UTF-8 text (bad byte near offset {offset + error.start}); re-encode it as UTF-8"
            ) from None


def _check_parquet(path: Path) -> None:
    """A parquet file starts and ends with `PAR1`; pyarrow's error for one that does not names no file."""
    if path.name.lower().endswith(".gz"):
        return
    with open(path, "rb") as stream:
        head = stream.read(4)
        stream.seek(max(0, path.stat().st_size - 4))
        tail = stream.read(4)
    if head != b"PAR1" or tail != b"PAR1":
        raise DataFormatError(
            f"{path} is not a parquet file (truncated, or another format renamed); fix the file or its extension"
        )


def _check_file(path: Path, builder: str | None) -> None:
    if builder == "parquet":
        _check_parquet(path)
    elif builder in ("json", "csv"):
        _check_utf8(path)


def read_split(spec: DatasetSpec, split: str) -> Dataset:
    """Load one split of a spec's source as it is stored, before any normalising (a single file is one split)."""
    local = Path(spec.path).expanduser()
    if local.is_file():
        builder = _file_builder(local.name)
        if builder is None:
            raise DataFormatError(
                f"{spec.path}: unsupported file type; expected .json, .jsonl, .parquet or .csv (optionally .gz)"
            )
        _check_file(local, builder)
        return load_dataset(builder, data_files=str(local), split="train")
    if local.is_dir():
        kinds: dict[str, list[str]] = {}
        for file in sorted(local.rglob("*")):
            builder = _file_builder(file.name)
            if builder is not None:
                kinds.setdefault(builder, []).append(file.name)
            _check_file(file, builder)
        if len(kinds) > 1:  # `datasets` would read the files of one kind only, and say nothing of the others
            found = "; ".join(f"{kind}: {', '.join(names[:3])}" for kind, names in sorted(kinds.items()))
            raise DataFormatError(
                f"{spec.path} holds data files of several kinds ({found}), of which only one kind would be read; "
                "keep one kind in the folder, or list the files as a mixture (datasets: [{path: ...}, ...])"
            )
    elif not looks_like_hub_id(spec.path):
        raise DataFormatError(f"{spec.path}: no such file or directory")
    return load_dataset(spec.path, spec.name, split=split, data_dir=spec.data_dir)


def _take_fraction(dataset: Dataset, fraction: float, seed: int) -> Dataset:
    if fraction == 1:
        return dataset
    count = max(1, round(fraction * len(dataset)))
    return dataset.shuffle(seed=seed).select(range(count))


def _load_mixture(
    specs: SpecLike | Sequence[SpecLike],
    target: str,
    *,
    seed: int,
    test_size: float | int,
    tokenizer: Any = None,
    max_prompt_length: int | None = None,
) -> DatasetDict:
    """Normalise, filter and subsample every source, then build train and test splits.

    Sources with an ``eval_split`` bring their own held-out rows; ``test_size`` (a share
    or a row count) is carved, with ``seed``, out of the pooled rows of the others, and
    ``test_size=0`` holds nothing out.
    """
    if max_prompt_length is not None and tokenizer is None:
        raise ValueError("max_prompt_length needs a tokenizer to count prompt tokens")
    if isinstance(specs, (DatasetSpec, str, os.PathLike, Mapping)):
        specs = [specs]
    specs = [DatasetSpec.from_any(spec) for spec in specs]
    if not specs:
        raise ValueError("no datasets given")

    def prepare(spec: DatasetSpec, split: str) -> Dataset:
        source = spec.path if Path(spec.path).expanduser().is_file() else f"{spec.path} ({split} split)"
        rows, _ = normalize_dataset(
            read_split(spec, split),
            target,
            format=spec.format,
            source=source,
            tokenizer=tokenizer,
            max_prompt_length=max_prompt_length,
        )
        return _take_fraction(rows, spec.fraction, seed)

    train_parts, test_parts, pooled = [], [], []
    for spec in specs:
        if spec.eval_split is None:
            pooled.append(prepare(spec, spec.split))
        else:
            if Path(spec.path).expanduser().is_file():
                raise DataFormatError(f"{spec.path}: a single file has no {spec.eval_split!r} split; drop eval_split")
            train_parts.append(prepare(spec, spec.split))
            test_parts.append(prepare(spec, spec.eval_split))
    if pooled and test_size:
        carved = concatenate_datasets(pooled).train_test_split(test_size=test_size, seed=seed)
        train_parts.append(carved["train"])
        test_parts.append(carved["test"])
    elif pooled:
        train_parts += pooled
        test_parts.append(pooled[0].select([]))
    return DatasetDict(
        train=concatenate_datasets(train_parts).shuffle(seed=seed),
        test=concatenate_datasets(test_parts).shuffle(seed=seed),
    )


def load_preference_dataset(
    specs: SpecLike | Sequence[SpecLike],
    *,
    seed: int = 42,
    test_size: float | int = 0.05,
    tokenizer: Any = None,
    max_prompt_length: int | None = None,
) -> DatasetDict:
    """Load a DPO mixture as ``train``/``test`` splits with ``prompt``, ``chosen``, ``rejected``.

    Given a tokenizer and ``max_prompt_length``, rows whose prompt has more tokens are
    dropped, so truncation never cuts into a prompt the replies depend on.
    """
    return _load_mixture(
        specs,
        "preference",
        seed=seed,
        test_size=test_size,
        tokenizer=tokenizer,
        max_prompt_length=max_prompt_length,
    )


def load_sft_dataset(
    specs: SpecLike | Sequence[SpecLike],
    *,
    seed: int = 42,
    test_size: float | int = 0.05,
    completion_only: bool = False,
) -> DatasetDict:
    """Load an SFT mixture as ``train``/``test`` splits with ``text``, or with ``prompt`` and
    ``completion`` when ``completion_only`` (so TRL trains on the completion tokens only).

    Preference sources contribute their prompt and chosen reply.
    """
    target = "prompt-completion" if completion_only else "text"
    return _load_mixture(specs, target, seed=seed, test_size=test_size)

"""Where data comes from: local files and folders, the Hub, and mixtures of several sources with a held-out split.

Every source is read as stored, converted to a trainer's layout by `formats.normalize_dataset`, subsampled, and
pooled; `read_split` gives one split as stored, for evaluation.
"""

from __future__ import annotations

import codecs
import dataclasses
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

PACKAGED_BUILDERS = ("json", "csv", "parquet", "text", "arrow")  # their data_files are local files (or URLs)
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class DatasetSpec:
    """One source of a data mixture, as written in a recipe: TRL's `DatasetConfig` fields, plus ours.

    TRL's: ``path`` is a Hub id, a local folder, a local .json/.jsonl/.parquet/.csv file (optionally .gz), or a
    `datasets` builder (``json``, ``csv``, ...) with ``data_files``; ``name`` and ``data_dir`` as in
    `datasets.load_dataset`; ``split`` (a single file is one split, so it applies to the others only); ``columns``
    keeps only these columns; ``fraction`` is TRL's share of this source in the mixture (set on every source or on
    none: shares are normalised to sum to 1, and the mixture is as large as it can be without repeating a row, each
    source giving its first rows).

    Ours: ``subsample`` keeps a random share of this source's rows (the alignment-handbook's ``weight``);
    ``format`` forces a row shape instead of detecting it; ``test_split`` names the source's own held-out split
    (e.g. hh-rlhf's "test"); without it, held-out rows are carved out of ``split``.
    """

    path: str
    name: str | None = None
    data_dir: str | None = None
    data_files: str | list[str] | dict[str, str] | None = None
    split: str = "train"
    columns: list[str] | None = None
    fraction: float | None = None
    subsample: float = 1.0
    format: str | None = None
    test_split: str | None = None

    def __post_init__(self) -> None:
        self.path = os.fspath(self.path)
        if self.fraction is not None and not self.fraction > 0:
            raise ValueError(f"{self.path}: fraction (its share of the mixture) must be > 0, got {self.fraction}")
        if not 0 < self.subsample <= 1:
            raise ValueError(f"{self.path}: subsample must be in (0, 1], got {self.subsample}")
        if self.format is not None and self.format not in FORMATS:
            raise ValueError(f"{self.path}: unknown format {self.format!r}; expected one of {list(FORMATS)}")
        if isinstance(self.columns, str):
            self.columns = [self.columns]

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
                raise ValueError(f"unknown datasets entry keys {unknown}; expected some of {sorted(known)}")
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
    elif spec.data_files is not None:  # a builder ("json", ...) or a Hub id, reading the files named
        for file in _listed_files(spec.data_files):
            local_file = Path(file).expanduser()
            if local_file.is_file():
                _check_file(local_file, _file_builder(local_file.name))
            elif spec.path in PACKAGED_BUILDERS and "://" not in file and not any(c in file for c in "*?["):
                raise DataFormatError(f"{spec.path}: data_files entry {file}: no such file")
    elif not looks_like_hub_id(spec.path):
        raise DataFormatError(f"{spec.path}: no such file or directory")
    return load_dataset(spec.path, spec.name, split=split, data_dir=spec.data_dir, data_files=spec.data_files)


def _listed_files(data_files: str | list[str] | dict[str, Any]) -> list[str]:
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, Mapping):
        return [f for value in data_files.values() for f in _listed_files(value)]
    return list(data_files)


def _subsample(dataset: Dataset, share: float, seed: int) -> Dataset:
    if share == 1:
        return dataset
    count = max(1, round(share * len(dataset)))
    return dataset.shuffle(seed=seed).select(range(count))


def _mixture_shares(parts: list[Dataset], specs: list[DatasetSpec]) -> list[Dataset]:
    """TRL's `fraction`: shares normalised to 1; the largest mixture that repeats no row; each source's first rows."""
    fractions = [spec.fraction for spec in specs]
    if all(f is None for f in fractions):
        return parts
    weights = [f / sum(fractions) for f in fractions]
    total = min(len(part) / weight for part, weight in zip(parts, weights))
    logger.info(
        "mixture by fraction: %s rows",
        ", ".join(f"{spec.path} {round(w * total)}" for spec, w in zip(specs, weights)),
    )
    return [part.select(range(round(w * total))) for part, w in zip(parts, weights)]


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

    Sources with a ``test_split`` bring their own held-out rows (a single file has none: its rows are pooled, with a
    warning); ``test_size`` (a share or a row count) is carved, with ``seed``, out of the pooled rows of the others,
    and ``test_size=0`` holds nothing out. The tokenizer, if given, checks that conversational rows have a chat
    template, and with ``max_prompt_length`` measures prompts."""
    if max_prompt_length is not None and tokenizer is None:
        raise ValueError("max_prompt_length needs a tokenizer to count prompt tokens")
    if isinstance(specs, (DatasetSpec, str, os.PathLike, Mapping)):
        specs = [specs]
    specs = [DatasetSpec.from_any(spec) for spec in specs]
    if not specs:
        raise ValueError("no datasets given")
    if len({spec.fraction is None for spec in specs}) > 1:
        raise ValueError("fraction (a source's share of the mixture) must be set on every datasets entry or on none")

    def prepare(spec: DatasetSpec, split: str) -> Dataset:
        source = spec.path if Path(spec.path).expanduser().is_file() else f"{spec.path} ({split} split)"
        raw = read_split(spec, split)
        if spec.columns is not None:
            missing = [c for c in spec.columns if c not in raw.column_names]
            if missing:
                raise DataFormatError(f"{source}: columns {missing} not found (it has {raw.column_names})")
            raw = raw.select_columns(spec.columns)
        rows, _ = normalize_dataset(
            raw,
            target,
            format=spec.format,
            source=source,
            tokenizer=tokenizer,
            max_prompt_length=max_prompt_length,
        )
        return _subsample(rows, spec.subsample, seed)

    own_test = []
    for spec in specs:
        if spec.test_split is not None and Path(spec.path).expanduser().is_file():
            logger.warning(
                "%s is a single file, so it has no %r split: %s of its rows are held out instead (unset "
                "dataset_test_split, or test_split in its datasets entry, to stop this line)",
                spec.path,
                spec.test_split,
                test_size,
            )
            spec = dataclasses.replace(spec, test_split=None)
        own_test.append(spec)
    specs = own_test
    trained = _mixture_shares([prepare(spec, spec.split) for spec in specs], specs)
    train_parts = [part for part, spec in zip(trained, specs) if spec.test_split is not None]
    pooled = [part for part, spec in zip(trained, specs) if spec.test_split is None]
    test_parts = [prepare(spec, spec.test_split) for spec in specs if spec.test_split is not None]
    check_one_row_form(train_parts + pooled + test_parts, specs)
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


def check_one_row_form(parts: list[Dataset], specs: list[DatasetSpec]) -> None:
    """`datasets` would fail to pool string rows with message-list rows in a long 'features can't be aligned'."""
    if len({tuple(sorted((k, str(v)) for k, v in part.features.items())) for part in parts}) > 1:
        raise DataFormatError(
            "cannot mix sources of string rows and conversational (message-list) rows in one mixture: "
            + ", ".join(spec.path for spec in specs)
            + "; convert one kind, or train on them separately"
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
    tokenizer: Any = None,
) -> DatasetDict:
    """Load an SFT mixture as ``train``/``test`` splits with ``text``, or with ``prompt`` and
    ``completion`` when ``completion_only`` (so TRL trains on the completion tokens only).

    Preference sources contribute their prompt and chosen reply.
    """
    target = "prompt-completion" if completion_only else "text"
    return _load_mixture(specs, target, seed=seed, test_size=test_size, tokenizer=tokenizer)

"""Load preference and SFT data from the Hub or local files into TRL's formats.

Every source is normalised to one of TRL's column layouts:

* preference (DPO): ``prompt``, ``chosen``, ``rejected``; the prompt is the text up
  to where the replies start and ``chosen``/``rejected`` hold the replies only;
* SFT: ``text``, or ``prompt``/``completion`` when only completions are trained on.

Bad rows are dropped rather than failing a long run halfway, but never silently:
each reason gets one warning with its count, and :class:`FilterReport` keeps them.
"""

from __future__ import annotations

import codecs
import gzip
import logging
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, concatenate_datasets, load_dataset

__all__ = [
    "FORMATS",
    "DataFormatError",
    "DatasetSpec",
    "FilterReport",
    "detect_format",
    "load_preference_dataset",
    "load_sft_dataset",
    "normalize_dataset",
    "split_hh_dialogue",
]

logger = logging.getLogger(__name__)

# The columns that identify each source shape, in detection order: a shape whose
# columns include another's comes first (rm-static > preference > hh), so the
# first match is the most specific one.
FORMATS: dict[str, tuple[str, ...]] = {
    "rm-static": ("prompt", "response", "chosen", "rejected"),
    "stack-exchange": ("question", "response_j", "response_k"),
    "preference": ("prompt", "chosen", "rejected"),
    "hh": ("chosen", "rejected"),
    "prompt-completion": ("prompt", "completion"),
    "text": ("text",),
}

# The formats each output layout can be built from; output columns are FORMATS[target].
_SOURCES_FOR = {
    "preference": ("rm-static", "stack-exchange", "preference", "hh"),
    "prompt-completion": ("rm-static", "stack-exchange", "preference", "hh", "prompt-completion"),
    "text": tuple(FORMATS),
}

HH_ASSISTANT = "\n\nAssistant:"
# The prompt template of TRL's stack_llama_2 example.
STACK_EXCHANGE_PROMPT = "Question: {question}\n\nAnswer: "

# Reasons a row is dropped; a row is counted under the first one it hits.
MISSING = "missing or empty field"
NON_TEXT = "non-text value"
NO_ASSISTANT_TURN = "no '\\n\\nAssistant:' turn in an hh dialogue"
PROMPTS_DIFFER = "prompts differ between chosen and rejected"
IDENTICAL = "chosen identical to rejected"
PROMPT_TOO_LONG = "prompt longer than max_prompt_length"

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
_HUB_ID = re.compile(r"[\w-][\w.-]*(/[\w.-]+)?")


class DataFormatError(ValueError):
    """The data cannot be read or turned into the layout a trainer needs."""


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


@dataclass
class FilterReport:
    """How many rows a source had and how many were dropped for each reason."""

    source: str
    total: int
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def kept(self) -> int:
        return self.total - sum(self.dropped.values())


class _Drop(Exception):
    """Raised inside row conversion to drop the row for ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def split_hh_dialogue(text: str) -> tuple[str, str]:
    """Split an hh-rlhf dialogue into the prompt (through the last "\\n\\nAssistant:")
    and the final reply, which keeps its leading space so prompt + reply == text."""
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
        raise ValueError(f"no {HH_ASSISTANT!r} turn in dialogue: {text[:80]!r}")
    cut += len(HH_ASSISTANT)
    return text[:cut], text[cut:]


def detect_format(columns: Sequence[str], source: str = "dataset", target: str = "text") -> str:
    """Name the first format in FORMATS whose columns are all present.

    ``target`` limits the candidates to formats that can be turned into that layout,
    so the error lists only what would have worked.
    """
    for fmt in _SOURCES_FOR[target]:
        if set(FORMATS[fmt]) <= set(columns):
            return fmt
    accepted = ", ".join(f"{fmt} ({', '.join(FORMATS[fmt])})" for fmt in _SOURCES_FOR[target])
    raise DataFormatError(
        f"{source} has columns {list(columns)}, which match no known {target} format; "
        f"expected one of: {accepted}"
    )


def _check_format(columns: Sequence[str], fmt: str, source: str, target: str) -> None:
    """Fail early, naming the gap, when an explicit format cannot serve the target."""
    missing = [column for column in FORMATS[fmt] if column not in columns]
    if missing:
        raise DataFormatError(
            f"{source}: format {fmt!r} needs columns {list(FORMATS[fmt])}, "
            f"missing {missing} (found {list(columns)})"
        )
    if fmt not in _SOURCES_FOR[target]:
        raise DataFormatError(
            f"{source}: format {fmt!r} cannot provide {target} data; "
            f"use one of: {', '.join(_SOURCES_FOR[target])}"
        )


def _text(row: Mapping[str, Any], column: str) -> str:
    """Return a non-blank string field, or drop the row."""
    value = row.get(column)
    if value is None:
        raise _Drop(MISSING)
    if not isinstance(value, str):
        raise _Drop(NON_TEXT)
    if not value.strip():
        raise _Drop(MISSING)
    return value


def _hh_turns(row: Mapping[str, Any], column: str) -> tuple[str, str]:
    try:
        prompt, reply = split_hh_dialogue(_text(row, column))
    except ValueError:
        raise _Drop(NO_ASSISTANT_TURN) from None
    if not reply.strip():
        raise _Drop(MISSING)
    return prompt, reply


def _preference(row: Mapping[str, Any], fmt: str, with_rejected: bool) -> dict[str, str]:
    """Read prompt, chosen reply and (if asked) rejected reply from a preference-shaped row.

    SFT only needs the chosen side, so it does not pay for problems on the rejected one.
    """
    if fmt == "hh":
        prompt, chosen = _hh_turns(row, "chosen")
        if not with_rejected:
            return {"prompt": prompt, "chosen": chosen}
        rejected_prompt, rejected = _hh_turns(row, "rejected")
        if rejected_prompt != prompt:
            raise _Drop(PROMPTS_DIFFER)
    else:
        if fmt == "stack-exchange":
            prompt = STACK_EXCHANGE_PROMPT.format(question=_text(row, "question"))
            chosen_column, rejected_column = "response_j", "response_k"
        else:  # rm-static and preference keep the same three columns
            prompt = _text(row, "prompt")
            chosen_column, rejected_column = "chosen", "rejected"
        chosen = _text(row, chosen_column)
        if not with_rejected:
            return {"prompt": prompt, "chosen": chosen}
        rejected = _text(row, rejected_column)
    if chosen.strip() == rejected.strip():
        raise _Drop(IDENTICAL)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _convert(row: Mapping[str, Any], fmt: str, target: str) -> dict[str, str]:
    """Turn one raw row of format ``fmt`` into the ``target`` columns, or raise _Drop."""
    if fmt == "text":
        return {"text": _text(row, "text")}
    if fmt == "prompt-completion":
        prompt, completion = _text(row, "prompt"), _text(row, "completion")
    else:
        pair = _preference(row, fmt, with_rejected=target == "preference")
        if target == "preference":
            return pair
        prompt, completion = pair["prompt"], pair["chosen"]
    if target == "text":
        return {"text": prompt + completion}
    return {"prompt": prompt, "completion": completion}


def _convert_or_mark(row: dict[str, Any], fmt: str, target: str) -> dict[str, str]:
    """Map-friendly _convert: bad rows keep empty columns and name their reason in _drop."""
    try:
        return {**_convert(row, fmt, target), "_drop": ""}
    except _Drop as drop:
        return {**dict.fromkeys(FORMATS[target], ""), "_drop": drop.reason}


def _mark_long_prompts(batch: dict[str, list], tokenizer: Any, max_prompt_length: int) -> dict[str, list]:
    lengths = [len(ids) for ids in tokenizer(batch["prompt"], add_special_tokens=False)["input_ids"]]
    return {
        "_drop": [
            PROMPT_TOO_LONG if not reason and length > max_prompt_length else reason
            for reason, length in zip(batch["_drop"], lengths)
        ]
    }


def normalize_dataset(
    dataset: Dataset,
    target: str,
    *,
    format: str | None = None,
    source: str = "dataset",
    tokenizer: Any = None,
    max_prompt_length: int | None = None,
) -> tuple[Dataset, FilterReport]:
    """Convert ``dataset`` to the ``target`` layout ("preference", "prompt-completion"
    or "text") and drop bad rows, logging one warning per reason.

    The prompt-length filter runs only when both ``tokenizer`` and ``max_prompt_length``
    are given (prompt tokens, without special tokens, > max_prompt_length).
    Raises DataFormatError when the columns fit no format or no row survives.
    """
    if target not in _SOURCES_FOR:
        raise ValueError(f"unknown target {target!r}; expected one of {list(_SOURCES_FOR)}")
    if format is None:
        format = detect_format(dataset.column_names, source, target)
    else:
        _check_format(dataset.column_names, format, source, target)

    converted = dataset.map(
        _convert_or_mark,
        fn_kwargs={"fmt": format, "target": target},
        remove_columns=dataset.column_names,
        desc=f"Normalising {source}",
    )
    if tokenizer is not None and max_prompt_length is not None and "prompt" in converted.column_names:
        converted = converted.map(
            _mark_long_prompts,
            fn_kwargs={"tokenizer": tokenizer, "max_prompt_length": max_prompt_length},
            batched=True,
            desc=f"Measuring prompts of {source}",
        )

    reasons = Counter(reason for reason in converted["_drop"] if reason)
    report = FilterReport(source=source, total=len(dataset), dropped=dict(reasons.most_common()))
    for reason, count in report.dropped.items():
        logger.warning("dropped %d of %d rows from %s: %s", count, report.total, source, reason)
    if report.total == 0:
        raise DataFormatError(f"{source} has no rows")
    if report.kept == 0:
        why = ", ".join(f"{reason}: {count}" for reason, count in report.dropped.items())
        raise DataFormatError(f"{source}: all {report.total} rows were dropped ({why})")
    kept = converted.filter(lambda reason: not reason, input_columns="_drop")
    kept = kept.select_columns(list(FORMATS[target]))
    logger.info("%s: kept %d of %d rows (format %s)", source, report.kept, report.total, format)
    return kept, report


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
                f"{path} is not valid UTF-8 text (bad byte near offset {offset + error.start}); "
                "re-encode it as UTF-8"
            ) from None


def _looks_like_hub_id(path: str) -> bool:
    """"owner/name" or "name", so a mistyped local file is reported here, not by the Hub."""
    return _HUB_ID.fullmatch(path) is not None and _file_builder(path) is None


def _read(spec: DatasetSpec, split: str) -> Dataset:
    """Load one split of a spec's source as it is stored, before any normalising."""
    local = Path(spec.path).expanduser()
    if local.is_file():
        builder = _file_builder(local.name)
        if builder is None:
            raise DataFormatError(
                f"{spec.path}: unsupported file type; expected .json, .jsonl, .parquet or .csv (optionally .gz)"
            )
        if builder != "parquet":
            _check_utf8(local)
        return load_dataset(builder, data_files=str(local), split="train")
    if local.is_dir():
        for file in sorted(local.rglob("*")):
            if _file_builder(file.name) in ("json", "csv"):
                _check_utf8(file)
    elif not _looks_like_hub_id(spec.path):
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
            _read(spec, split),
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
                raise DataFormatError(
                    f"{spec.path}: a single file has no {spec.eval_split!r} split; drop eval_split"
                )
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

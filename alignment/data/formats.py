"""The row shapes the trainers accept, and their conversion into TRL's column layouts.

* preference (DPO): ``prompt``, ``chosen``, ``rejected``; the prompt is the text up to where the replies start and
  ``chosen``/``rejected`` hold the replies only;
* SFT: ``text``, or ``prompt``/``completion`` when only completions are trained on.

Bad rows are dropped rather than failing a long run halfway, but never silently: each reason gets one warning with
its count, and :class:`FilterReport` keeps them.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset

from ..common import HH_ASSISTANT, split_hh_dialogue  # noqa: F401  (HH_ASSISTANT: part of this module's API)

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

# The prompt template of TRL's stack_llama_2 example.
STACK_EXCHANGE_PROMPT = "Question: {question}\n\nAnswer: "

# Reasons a row is dropped; a row is counted under the first one it hits.
MISSING = "missing or empty field"
NON_TEXT = "non-text value"
NO_ASSISTANT_TURN = "no '\\n\\nAssistant:' turn in an hh dialogue"
PROMPTS_DIFFER = "prompts differ between chosen and rejected"
IDENTICAL = "chosen identical to rejected"
PROMPT_TOO_LONG = "prompt longer than max_prompt_length"


class DataFormatError(ValueError):
    """The data cannot be read or turned into the layout a trainer needs."""


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
        f"{source} has columns {list(columns)}, which match no known {target} format; expected one of: {accepted}"
    )


def _check_format(columns: Sequence[str], fmt: str, source: str, target: str) -> None:
    """Fail early, naming the gap, when an explicit format cannot serve the target."""
    missing = [column for column in FORMATS[fmt] if column not in columns]
    if missing:
        raise DataFormatError(
            f"{source}: format {fmt!r} needs columns {list(FORMATS[fmt])}, missing {missing} (found {list(columns)})"
        )
    if fmt not in _SOURCES_FOR[target]:
        raise DataFormatError(
            f"{source}: format {fmt!r} cannot provide {target} data; use one of: {', '.join(_SOURCES_FOR[target])}"
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
        hint = ""
        if report.dropped.get(PROMPT_TOO_LONG) == report.total:
            hint = f"; no prompt fits in {max_prompt_length} tokens: raise max_length (or set max_prompt_length)"
        raise DataFormatError(f"{source}: all {report.total} rows were dropped ({why}){hint}")
    kept = converted.filter(lambda reason: not reason, input_columns="_drop")
    kept = kept.select_columns(list(FORMATS[target]))
    logger.info("%s: kept %d of %d rows (format %s)", source, report.kept, report.total, format)
    return kept, report

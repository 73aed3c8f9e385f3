"""The row shapes the trainers accept, and their conversion into TRL's column layouts.

Every TRL dataset type (https://huggingface.co/docs/trl/dataset_formats) is read, in its standard form (strings) and
its conversational form (lists of ``{"role", "content"}`` messages), plus a few source-specific shapes:

=====================  ==========================================  ==========================================
format                 columns                                     values
=====================  ==========================================  ==========================================
rm-static              prompt, response, chosen, rejected          strings (Dahoas/rm-static)
stack-exchange         question, response_j, response_k            strings (the stack-exchange-paired set)
preference             prompt, chosen, rejected                    all strings, or all message lists
ultrafeedback          prompt, chosen, rejected                    prompt string, full conversations
hh                     chosen, rejected                            HH dialogues: split at the last Assistant turn
implicit-preference    chosen, rejected                            strings or message lists; shared prefix split
prompt-completion      prompt, completion                          strings or message lists
messages               messages                                    message lists (language modeling)
text                   text                                        strings (language modeling)
prompt-only            prompt                                      strings or message lists
=====================  ==========================================  ==========================================

Each is turned into the layout a trainer reads, keeping TRL's column names and the data's form, so TRL's trainers
tokenize (and apply the chat template to) our rows exactly as stock TRL would its own:

* preference (DPO): ``prompt``, ``chosen``, ``rejected``, the replies without the prompt;
* text (SFT): ``text``, or ``messages`` for conversations;
* prompt-completion (SFT on completions only): ``prompt``, ``completion``;
* prompt-only: ``prompt``.

Detection goes by columns and by value types (a sample's strings vs message lists); an implicit prompt is the shared
beginning of the two replies, cut at a message boundary, or for strings at a word boundary (never inside a word).
Messages keep only ``role`` and ``content``, so sources of one form pool into one column type.

Bad rows are dropped rather than failing a long run halfway, but never silently: each reason gets one warning with
its count, and :class:`FilterReport` keeps them.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset, Features, List, Value

from ..common import HH_ASSISTANT, split_hh_dialogue  # noqa: F401  (HH_ASSISTANT: part of this module's API)

logger = logging.getLogger(__name__)

# Value types of a column: TRL's "standard" (strings) and "conversational" (message lists) forms.
TEXT, MESSAGES = "text", "messages"


@dataclass(frozen=True)
class _Shape:
    """One row shape a source may have: what identifies it, how its values are read, how to show it."""

    columns: tuple[str, ...]  # all must be present
    layouts: tuple[Mapping[str, str], ...]  # the value type of each column read; the first that fits the data is used
    example: Mapping[str, Any]  # one short row, for error messages
    note: str = ""


def _same(columns: Sequence[str], kind: str) -> dict[str, str]:
    return dict.fromkeys(columns, kind)


def _either(*columns: str) -> tuple[dict[str, str], ...]:
    """Strings in every column, or message lists in every column."""
    return _same(columns, TEXT), _same(columns, MESSAGES)


_USER = {"role": "user", "content": "Hi"}
_HELLO = {"role": "assistant", "content": "Hello!"}
_GO_AWAY = {"role": "assistant", "content": "Go away."}

# The shapes in detection order: a shape whose columns include another's comes first (rm-static > preference > hh),
# and of two with the same columns the values decide (preference vs ultrafeedback; hh vs implicit-preference: hh when
# most sampled `chosen` strings hold an "\n\nAssistant:" turn), so the first match is the most specific one.
_SHAPES: dict[str, _Shape] = {
    "rm-static": _Shape(
        ("prompt", "response", "chosen", "rejected"),
        (_same(("prompt", "chosen", "rejected"), TEXT),),
        {"prompt": "\n\nHuman: Hi\n\nAssistant:", "response": " Hello!", "chosen": " Hello!", "rejected": " Go away."},
    ),
    "stack-exchange": _Shape(
        ("question", "response_j", "response_k"),
        (_same(("question", "response_j", "response_k"), TEXT),),
        {"question": "Why?", "response_j": "Because.", "response_k": "No idea."},
    ),
    "preference": _Shape(
        ("prompt", "chosen", "rejected"),
        _either("prompt", "chosen", "rejected"),
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        " as strings or message lists",
    ),
    "ultrafeedback": _Shape(
        ("prompt", "chosen", "rejected"),
        ({"prompt": TEXT, "chosen": MESSAGES, "rejected": MESSAGES},),
        {"prompt": "Hi", "chosen": [_USER, _HELLO], "rejected": [_USER, _GO_AWAY]},
        " with full conversations",
    ),
    "hh": _Shape(
        ("chosen", "rejected"),
        (_same(("chosen", "rejected"), TEXT),),
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."},
        " as HH dialogues",
    ),
    "implicit-preference": _Shape(
        ("chosen", "rejected"),
        _either("chosen", "rejected"),
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        " as strings or message lists, sharing a prompt",
    ),
    "prompt-completion": _Shape(
        ("prompt", "completion"),
        _either("prompt", "completion"),
        {"prompt": "The sky is", "completion": " blue."},
        " as strings or message lists",
    ),
    "messages": _Shape(("messages",), (_same(("messages",), MESSAGES),), {"messages": [_USER, _HELLO]}),
    "text": _Shape(("text",), (_same(("text",), TEXT),), {"text": "The sky is blue."}),
    "prompt-only": _Shape(("prompt",), _either("prompt"), {"prompt": "The sky is"}, " as a string or a message list"),
}

# The columns that identify each format (its name is what `format=` takes).
FORMATS: dict[str, tuple[str, ...]] = {name: shape.columns for name, shape in _SHAPES.items()}

_PREFERENCE_SHAPES = ("rm-static", "stack-exchange", "preference", "ultrafeedback", "hh", "implicit-preference")
_IMPLICIT = ("ultrafeedback", "implicit-preference")  # the prompt is the replies' shared beginning

# The formats each output layout can be built from.
_SOURCES_FOR = {
    "preference": _PREFERENCE_SHAPES,
    "prompt-completion": (*_PREFERENCE_SHAPES, "prompt-completion"),
    "text": (*_PREFERENCE_SHAPES, "prompt-completion", "messages", "text"),
    "prompt-only": (*_PREFERENCE_SHAPES, "prompt-completion", "prompt-only"),
}

# The prompt template of TRL's stack_llama_2 example.
STACK_EXCHANGE_PROMPT = "Question: {question}\n\nAnswer: "

# Reasons a row is dropped; a row is counted under the first one it hits.
MISSING = "missing or empty field"
NON_TEXT = "non-text value"
NOT_MESSAGES = "not a list of messages with string 'role' and 'content'"
NO_ASSISTANT_TURN = "no '\\n\\nAssistant:' turn in an hh dialogue"
NO_SHARED_PROMPT = "chosen and rejected share no prompt"
PROMPTS_DIFFER = "prompts differ between chosen and rejected"
IDENTICAL = "chosen identical to rejected"
PROMPT_TOO_LONG = "prompt longer than max_prompt_length"

_SAMPLE_ROWS = 100  # rows whose values decide a column's type
_MESSAGE_LIST = List({"role": Value("string"), "content": Value("string")})


class DataFormatError(ValueError):
    """The data cannot be read or turned into the layout a trainer needs."""


@dataclass
class FilterReport:
    """How many rows a source had and how many were dropped for each reason."""

    source: str
    total: int
    dropped: dict[str, int] = field(default_factory=dict)
    format: str | None = None
    conversational: bool = False  # rows are message lists, for the tokenizer's chat template

    @property
    def kept(self) -> int:
        return self.total - sum(self.dropped.values())


class _Drop(Exception):
    """Raised inside row conversion to drop the row for ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def output_columns(target: str, conversational: bool = False) -> tuple[str, ...]:
    """The columns of a ``target`` layout: TRL's names, with ``messages`` for conversational language modeling."""
    if target == "text":
        return ("messages",) if conversational else ("text",)
    return {"preference": FORMATS["preference"], "prompt-completion": FORMATS["prompt-completion"]}.get(
        target, ("prompt",)
    )


# --- detection ---------------------------------------------------------------------------------------------------


def _value_type(value: Any) -> str | None:
    """TEXT for a string, MESSAGES for a list of dicts (valid or not: bad messages are dropped later), else None."""
    if isinstance(value, str):
        return TEXT
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return MESSAGES
    return None


def _column_types(sample: Mapping[str, Sequence[Any]]) -> dict[str, str | None]:
    """The most common value type of each sampled column (None when no value has one)."""
    types = {}
    for column, values in sample.items():
        counts = Counter(kind for kind in map(_value_type, values) if kind is not None)
        types[column] = counts.most_common(1)[0][0] if counts else None
    return types


def _mostly_hh(sample: Mapping[str, Sequence[Any]] | None) -> bool:
    """Whether most sampled ``chosen`` strings are HH dialogues (without a sample: assume so, as before)."""
    if sample is None or "chosen" not in sample:
        return True
    texts = [value for value in sample["chosen"] if isinstance(value, str)]
    return not texts or 2 * sum(HH_ASSISTANT in text for text in texts) >= len(texts)


def _fitting_layout(fmt: str, types: Mapping[str, str | None]) -> Mapping[str, str] | None:
    """The first layout of ``fmt`` whose value types the columns have (an unknown type fits any)."""
    for layout in _SHAPES[fmt].layouts:
        if all(types.get(column) in (None, kind) for column, kind in layout.items()):
            return layout
    return None


def _accepted(target: str) -> str:
    """Every shape ``target`` can be built from, with its columns and one example row."""
    lines = [
        f"  {fmt} ({', '.join(FORMATS[fmt])}){_SHAPES[fmt].note}: {json.dumps(_SHAPES[fmt].example)}"
        for fmt in _SOURCES_FOR[target]
    ]
    message = json.dumps([_USER, _HELLO])
    return "\n".join([*lines, f"  (a message list is like {message})"])


def _detect(
    columns: Sequence[str], sample: Mapping[str, Sequence[Any]] | None, source: str, target: str
) -> tuple[str, Mapping[str, str]]:
    types = _column_types(sample) if sample is not None else {}
    for fmt in _SOURCES_FOR[target]:
        if not set(FORMATS[fmt]) <= set(columns):
            continue
        layout = _fitting_layout(fmt, types)
        if layout is not None and (fmt != "hh" or _mostly_hh(sample)):
            return fmt, layout
    lists = [column for column in columns if types.get(column) == MESSAGES]
    values = f" (message lists in {lists})" if lists else ""
    raise DataFormatError(
        f"{source} has columns {list(columns)}{values}, which match no known {target} format; "
        f"expected one of:\n{_accepted(target)}"
    )


def detect_format(
    columns: Sequence[str],
    source: str = "dataset",
    target: str = "text",
    sample: Mapping[str, Sequence[Any]] | None = None,
) -> str:
    """Name the first format in FORMATS whose columns are all present and whose value types fit ``sample``.

    ``sample`` is some rows by column, as ``dataset[:100]`` gives them; without it, the string reading of a shape
    is assumed (so ``chosen``/``rejected`` alone is "hh"). ``target`` limits the candidates to formats that can be
    turned into that layout, so the error lists only what would have worked.
    """
    return _detect(columns, sample, source, target)[0]


def _check_format(
    columns: Sequence[str], sample: Mapping[str, Sequence[Any]], fmt: str, source: str, target: str
) -> Mapping[str, str]:
    """Fail early, naming the gap, when an explicit format cannot serve the target; return the layout to read."""
    if fmt not in FORMATS:
        raise DataFormatError(f"{source}: unknown format {fmt!r}; expected one of {list(FORMATS)}")
    missing = [column for column in FORMATS[fmt] if column not in columns]
    if missing:
        raise DataFormatError(
            f"{source}: format {fmt!r} needs columns {list(FORMATS[fmt])}, missing {missing} (found {list(columns)})"
        )
    if fmt not in _SOURCES_FOR[target]:
        raise DataFormatError(
            f"{source}: format {fmt!r} cannot provide {target} data; use one of: {', '.join(_SOURCES_FOR[target])}"
        )
    types = _column_types(sample)
    layout = _fitting_layout(fmt, types)
    if layout is None:
        names = {TEXT: "strings", MESSAGES: "message lists", None: "other values"}
        found = ", ".join(f"{column}: {names[types.get(column)]}" for column in _SHAPES[fmt].layouts[0])
        raise DataFormatError(
            f"{source}: format {fmt!r} reads rows like {json.dumps(_SHAPES[fmt].example)}, but found {found}"
        )
    return layout


# --- reading one row ---------------------------------------------------------------------------------------------


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


def _messages(row: Mapping[str, Any], column: str) -> list[dict[str, str]]:
    """Return a valid, non-blank message list (``role`` and ``content`` only), or drop the row."""
    value = row.get(column)
    if value is None or (isinstance(value, list) and not value):
        raise _Drop(MISSING)
    if not isinstance(value, list):
        raise _Drop(NOT_MESSAGES)
    messages = []
    for message in value:
        if not isinstance(message, Mapping):
            raise _Drop(NOT_MESSAGES)
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role.strip() or not isinstance(content, str):
            raise _Drop(NOT_MESSAGES)
        messages.append({"role": role, "content": content})
    if not any(message["content"].strip() for message in messages):
        raise _Drop(MISSING)
    return messages


def _read(row: Mapping[str, Any], column: str, layout: Mapping[str, str]) -> Any:
    return _messages(row, column) if layout[column] == MESSAGES else _text(row, column)


def _stripped(value: str | list[dict[str, str]]) -> Any:
    """What two replies are compared by: equal ignoring surrounding whitespace."""
    if isinstance(value, str):
        return value.strip()
    return [(message["role"], message["content"].strip()) for message in value]


def _is_word_boundary(text: str, cut: int) -> bool:
    return cut == len(text) or text[cut - 1].isspace() or text[cut].isspace()


def _split_texts(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Cut two strings after their longest shared run of whole words, as TRL's `extract_prompt` does when its cut
    falls between words (a space before the cut goes to the replies); both replies must keep some text."""
    shared = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        shared += 1
    for cut in range(shared, 0, -1):
        if not (_is_word_boundary(chosen, cut) and _is_word_boundary(rejected, cut)):
            continue
        if chosen[cut - 1] == " ":  # TRL's rule: the space belongs to the reply (" blue" is one GPT-2 token)
            cut -= 1
        prompt, chosen_reply, rejected_reply = chosen[:cut], chosen[cut:], rejected[cut:]
        if prompt.strip() and chosen_reply.strip() and rejected_reply.strip():
            return prompt, chosen_reply, rejected_reply
    raise _Drop(NO_SHARED_PROMPT)


def _split_conversations(chosen: list, rejected: list) -> tuple[list, list, list]:
    """The shared leading messages are the prompt, the rest of each conversation its reply."""
    shared = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        shared += 1
    if shared == 0:
        raise _Drop(NO_SHARED_PROMPT)
    chosen_reply, rejected_reply = chosen[shared:], rejected[shared:]
    if not all(any(message["content"].strip() for message in reply) for reply in (chosen_reply, rejected_reply)):
        raise _Drop(MISSING)
    return chosen[:shared], chosen_reply, rejected_reply


def _split_shared(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    if _stripped(chosen) == _stripped(rejected):
        raise _Drop(IDENTICAL)
    if isinstance(chosen, str):
        return _split_texts(chosen, rejected)
    return _split_conversations(chosen, rejected)


def split_shared_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """Split an implicit-prompt pair into (prompt, chosen reply, rejected reply).

    Strings are cut at a word boundary, so ``prompt + reply`` gives each string back; message lists at a message
    boundary. Raises ValueError, naming the reason, when the two share no prompt or do not differ.
    """
    try:
        return _split_shared(chosen, rejected)
    except _Drop as drop:
        raise ValueError(drop.reason) from None


def _hh_turns(row: Mapping[str, Any], column: str) -> tuple[str, str]:
    try:
        prompt, reply = split_hh_dialogue(_text(row, column))
    except ValueError:
        raise _Drop(NO_ASSISTANT_TURN) from None
    if not reply.strip():
        raise _Drop(MISSING)
    return prompt, reply


def _preference(row: Mapping[str, Any], fmt: str, layout: Mapping[str, str], with_rejected: bool) -> dict[str, Any]:
    """Read prompt, chosen reply and (if asked) rejected reply from a preference-shaped row.

    SFT only needs the chosen side, so it does not pay for problems on the rejected one, except where the prompt
    is the part the two replies share.
    """
    if fmt in _IMPLICIT:  # ultrafeedback's `prompt` string is ignored: its conversations hold the prompt
        prompt, chosen, rejected = _split_shared(_read(row, "chosen", layout), _read(row, "rejected", layout))
        pair = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        return pair if with_rejected else {"prompt": prompt, "chosen": chosen}
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
            prompt = _read(row, "prompt", layout)
            chosen_column, rejected_column = "chosen", "rejected"
        chosen = _read(row, chosen_column, layout)
        if not with_rejected:
            return {"prompt": prompt, "chosen": chosen}
        rejected = _read(row, rejected_column, layout)
    if _stripped(chosen) == _stripped(rejected):
        raise _Drop(IDENTICAL)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _convert(row: Mapping[str, Any], fmt: str, layout: Mapping[str, str], target: str) -> dict[str, Any]:
    """Turn one raw row of format ``fmt`` into the ``target`` columns, or raise _Drop."""
    conversational = MESSAGES in layout.values()
    if fmt in ("text", "messages"):
        return {fmt: _read(row, fmt, layout)}
    if fmt == "prompt-only":
        return {"prompt": _read(row, "prompt", layout)}
    if fmt == "prompt-completion":
        prompt, completion = _read(row, "prompt", layout), _read(row, "completion", layout)
    elif target == "text" and fmt in _IMPLICIT:  # prompt + chosen reply is the chosen side as written
        return {output_columns(target, conversational)[0]: _read(row, "chosen", layout)}
    else:
        pair = _preference(row, fmt, layout, with_rejected=target == "preference")
        if target == "preference":
            return pair
        prompt, completion = pair["prompt"], pair["chosen"]
    if target == "prompt-only":
        return {"prompt": prompt}
    if target == "text":
        return {output_columns(target, conversational)[0]: prompt + completion}
    return {"prompt": prompt, "completion": completion}


def _convert_or_mark(
    row: dict[str, Any], fmt: str, layout: Mapping[str, str], target: str, columns: tuple[str, ...]
) -> dict[str, Any]:
    """Map-friendly _convert: bad rows keep empty columns and name their reason in _drop."""
    try:
        return {**_convert(row, fmt, layout, target), "_drop": ""}
    except _Drop as drop:
        empty = [] if MESSAGES in layout.values() else ""
        return {**dict.fromkeys(columns, empty), "_drop": drop.reason}


# --- prompt length -----------------------------------------------------------------------------------------------


def _require_chat_template(tokenizer: Any, source: str) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataFormatError(
            f"{source}: conversational data (message lists) needs a chat template, and the tokenizer has none; "
            "set one with the recipe key `chat_template`"
        )


def _prompt_lengths(prompts: list, tokenizer: Any, conversational: bool) -> list[int]:
    """Prompt tokens as TRL's DPO tokenization counts them: a conversation through the chat template with the
    generation prompt; strings without special tokens (none for GPT-2). Empty prompts (dropped rows) count 0."""
    if not conversational:
        return [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    return [
        len(
            tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)[
                "input_ids"
            ]
        )
        if prompt
        else 0
        for prompt in prompts
    ]


def _mark_long_prompts(
    batch: dict[str, list], tokenizer: Any, max_prompt_length: int, conversational: bool
) -> dict[str, list]:
    lengths = _prompt_lengths(batch["prompt"], tokenizer, conversational)
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
    """Convert ``dataset`` to the ``target`` layout ("preference", "prompt-completion", "text" or "prompt-only")
    and drop bad rows, logging one warning per reason.

    Conversational sources give conversational rows (``messages`` instead of ``text``). The prompt-length filter
    runs only when both ``tokenizer`` and ``max_prompt_length`` are given (prompt tokens > max_prompt_length).
    Raises DataFormatError when the data fits no format, when conversational data meets a tokenizer without a
    chat template, or when no row survives.
    """
    if target not in _SOURCES_FOR:
        raise ValueError(f"unknown target {target!r}; expected one of {list(_SOURCES_FOR)}")
    sample = dataset[:_SAMPLE_ROWS]
    if format is None:
        format, layout = _detect(dataset.column_names, sample, source, target)
    else:
        layout = _check_format(dataset.column_names, sample, format, source, target)
    conversational = MESSAGES in layout.values()
    if conversational and tokenizer is not None:
        _require_chat_template(tokenizer, source)

    columns = output_columns(target, conversational)
    value_type = _MESSAGE_LIST if conversational else Value("string")
    converted = dataset.map(
        _convert_or_mark,
        fn_kwargs={"fmt": format, "layout": layout, "target": target, "columns": columns},
        remove_columns=dataset.column_names,
        features=Features({**dict.fromkeys(columns, value_type), "_drop": Value("string")}),
        desc=f"Normalising {source}",
    )
    if tokenizer is not None and max_prompt_length is not None and "prompt" in converted.column_names:
        converted = converted.map(
            _mark_long_prompts,
            fn_kwargs={
                "tokenizer": tokenizer,
                "max_prompt_length": max_prompt_length,
                "conversational": conversational,
            },
            batched=True,
            desc=f"Measuring prompts of {source}",
        )

    reasons = Counter(reason for reason in converted["_drop"] if reason)
    report = FilterReport(
        source=source,
        total=len(dataset),
        dropped=dict(reasons.most_common()),
        format=format,
        conversational=conversational,
    )
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
    kept = kept.select_columns(list(columns))
    form = "conversational" if conversational else "standard"
    logger.info("%s: kept %d of %d rows (format %s, %s)", source, report.kept, report.total, format, form)
    return kept, report

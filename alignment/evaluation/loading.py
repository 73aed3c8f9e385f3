"""Loading what evaluation needs, from plain arguments (never a training config): trained causal LM checkpoints as
the training pipeline loads them, held-out preference pairs (one split as stored), and reward models as judges."""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from ..common import looks_like_hub_id
from ..data import DatasetSpec, normalize_dataset, read_split
from ..modeling.chat_templates import set_chat_template
from ..modeling.loading import (
    TOKENIZER_FILES,
    check_compatible,
    checkpoint_model_type,
    load_model,
    tokenizer_source,
)
from ..modeling.tokenizer import load_tokenizer
from .judging import RewardModelJudge


def check_checkpoint(name_or_path: str, what: str = "model") -> None:
    """Fail in one clear line on a path that is neither a folder nor could be a Hub id ("name" or "owner/name")."""
    path = os.path.expanduser(name_or_path)
    if os.path.isfile(path):
        raise ValueError(f"the {what} should be a checkpoint folder or a Hub id, not a file: {name_or_path}")
    if os.path.isdir(path):
        return
    if not looks_like_hub_id(name_or_path):
        raise FileNotFoundError(f"{what} checkpoint not found: no folder {name_or_path}")


def load_causal_lm(
    name_or_path: str,
    *,
    tokenizer_name_or_path: str | None = None,
    trust_remote_code: bool = False,
    dtype: str | None = "float32",
    model_implementation: str = "alignment",
    revision: str | None = None,
    device: str | torch.device | None = None,
    chat_template: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM checkpoint (local folder or Hub id) and its tokenizer, loaded as the training pipeline loads them.

    GPT-2 checkpoints (ours or transformers'/OpenAI's) load into our GPT-2 class unless `model_implementation` is
    "transformers"; anything else through `AutoModelForCausalLM`. The tokenizer is `tokenizer_name_or_path`, else
    the checkpoint's own, else GPT-2's. The checkpoint is checked first, so a wrong path gets an error naming it.
    `chat_template` (a built-in name or a Jinja file, see `set_chat_template`) replaces the tokenizer's template,
    for checkpoints saved without the one they were trained with; one needing tokens the model lacks is refused.
    """
    check_checkpoint(os.fspath(name_or_path))
    path = os.path.expanduser(os.fspath(name_or_path))
    model = load_model(
        path, revision=revision, dtype=dtype, implementation=model_implementation, trust_remote_code=trust_remote_code
    )
    tokenizer = load_tokenizer(tokenizer_source(path, tokenizer_name_or_path))
    added = set_chat_template(tokenizer, chat_template)
    if added and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        new = ", ".join(tokenizer.convert_ids_to_tokens(added))
        raise ValueError(
            f"chat template {chat_template!r} needs the tokens {new}, which {name_or_path} has no embeddings for: "
            "it was not trained with this template"
        )
    check_compatible(model, tokenizer, None)
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer


def load_preference_pairs(
    path: str | os.PathLike,
    split: str = "test",
    *,
    format: str | None = None,
    config: str | None = None,
    max_samples: int | None = None,
) -> list[dict[str, str]]:
    """One split of a preference source as (prompt, chosen, rejected) rows, in the source's order.

    `path` is anything `alignment.data` reads: a local .jsonl/.json/.parquet/.csv file (one split, so `split` is
    ignored), a folder or a Hub id, in any shape it knows (hh, rm-static, stack-exchange, TRL preference); bad rows
    are dropped with a warning, as in training. `max_samples` keeps the first rows.
    """
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be at least 1, got {max_samples}")
    spec = DatasetSpec(path=os.fspath(path), split=split, format=format, name=config)
    local = os.path.isfile(os.path.expanduser(spec.path))
    source = spec.path if local else f"{spec.path} ({split} split)"
    rows, _ = normalize_dataset(read_split(spec, split), "preference", format=format, source=source)
    if max_samples is not None:
        rows = rows.select(range(min(max_samples, len(rows))))
    return rows.to_list()


def load_reward_model(
    name_or_path: str,
    *,
    tokenizer_name_or_path: str | None = None,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
    **judge_kwargs: Any,
) -> RewardModelJudge:
    """A judge from a reward-model checkpoint (folder or Hub id) loaded with AutoModelForSequenceClassification; its
    tokenizer is `tokenizer_name_or_path`, else the checkpoint's own, else GPT-2's."""
    path = os.path.expanduser(os.fspath(name_or_path))
    check_checkpoint(os.fspath(name_or_path), "reward model")
    checkpoint_model_type(path)  # a missing Hub checkpoint gets one line naming it
    model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=trust_remote_code)
    source = tokenizer_name_or_path or path
    if os.path.isdir(source) and not any(os.path.exists(os.path.join(source, f)) for f in TOKENIZER_FILES):
        source = "gpt2"
    if device is not None:
        model.to(device)
    return RewardModelJudge(model, load_tokenizer(source), **judge_kwargs)

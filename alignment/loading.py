"""Build the model and tokenizer a recipe names, with one clear error when they cannot work together."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import cached_file

from .configs import ModelArguments
from .modeling import AlignmentGPT2Config, AlignmentGPT2ForCausalLM
from .modeling.configuration_gpt2 import GPT2_SIZES
from .tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


def torch_dtype(name: str | None) -> torch.dtype | str:
    if name in (None, "auto"):
        return "auto"
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; use float32, bfloat16, float16 or auto")
    return dtype


def checkpoint_model_type(name_or_path: str, revision: str | None = None) -> str | None:
    """The model_type in a checkpoint's config.json (local folder or Hub)."""
    if os.path.exists(name_or_path) and not os.path.isdir(name_or_path):
        raise ValueError(f"model_name_or_path must be a checkpoint folder or a Hub id, not a file: {name_or_path}")
    try:
        config_file = cached_file(name_or_path, "config.json", revision=revision)
    except OSError as error:
        raise FileNotFoundError(f"cannot load the model {name_or_path!r}: {str(error).splitlines()[0]}") from None
    with open(config_file, encoding="utf-8") as f:
        return json.load(f).get("model_type")


def config_from_name(model_args: ModelArguments, trust_remote_code: bool = False) -> Any:
    """A config for random initialisation: a GPT-2 preset, or a config.json (folder or Hub id)."""
    overrides = model_args.model_config_overrides or {}
    size = model_args.model_config.partition("/")[0]
    if size in GPT2_SIZES:
        return AlignmentGPT2Config.from_preset(model_args.model_config, **overrides)
    config = AutoConfig.from_pretrained(model_args.model_config, trust_remote_code=trust_remote_code)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def load_model(model_args: ModelArguments, trust_remote_code: bool = False) -> PreTrainedModel:
    """The policy: a checkpoint (official GPT-2 ones converted into our class), or random weights from a config."""
    kwargs: dict[str, Any] = {"dtype": torch_dtype(model_args.dtype), "trust_remote_code": trust_remote_code}
    if model_args.attn_implementation is not None:
        kwargs["attn_implementation"] = model_args.attn_implementation
    path = model_args.model_name_or_path
    if path is None:
        config = config_from_name(model_args, trust_remote_code)
        if model_args.attn_implementation is not None:
            config._attn_implementation = model_args.attn_implementation
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        dtype = kwargs["dtype"]
        return model.to(dtype) if isinstance(dtype, torch.dtype) else model
    model_type = checkpoint_model_type(path, model_args.model_revision)
    if model_type == "gpt2" and model_args.model_implementation == "alignment":
        return AlignmentGPT2ForCausalLM.from_pretrained(path, revision=model_args.model_revision, **kwargs)
    return AutoModelForCausalLM.from_pretrained(path, revision=model_args.model_revision, **kwargs)


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


def tokenizer_source(model_args: ModelArguments) -> str:
    """The recipe's tokenizer; else the checkpoint's own; else GPT-2's (random init, or a folder without one)."""
    path = model_args.model_name_or_path
    if model_args.tokenizer_name_or_path:
        return model_args.tokenizer_name_or_path
    if path is None or (os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES)):
        return "gpt2"
    return path


def load_model_and_tokenizer(
    model_args: ModelArguments, max_length: int | None = None, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer, checked against each other and against `max_length`."""
    tokenizer = load_tokenizer(tokenizer_source(model_args))
    model = load_model(model_args, trust_remote_code)
    check_compatible(model, tokenizer, max_length)
    return model, tokenizer


def check_compatible(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_length: int | None) -> None:
    vocab_size = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has only {vocab_size}; "
            "use the tokenizer the model was trained with (tokenizer_name_or_path)"
        )
    positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if max_length is not None and positions is not None and max_length > positions:
        raise ValueError(f"max_length {max_length} exceeds the model's {positions} positions; lower max_length")

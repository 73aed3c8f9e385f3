"""Build the model and tokenizer a recipe names, with one clear error when they cannot work together."""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
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


HUB_ID = re.compile(r"[\w-][\w.-]*/[\w.-]+|[\w-][\w.-]*")


def looks_like_a_hub_id(name: str) -> bool:
    """"owner/name" or "name"; anything else is a path that should exist here."""
    return HUB_ID.fullmatch(name) is not None and not name.startswith((".", "~"))


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def checkpoint_config(name_or_path: str, revision: str | None = None) -> dict[str, Any]:
    """A checkpoint's config.json (local folder or Hub), with one clear error when there is none."""
    if os.path.exists(name_or_path) and not os.path.isdir(name_or_path):
        raise ValueError(f"model_name_or_path must be a checkpoint folder or a Hub id, not a file: {name_or_path}")
    if os.path.isdir(name_or_path):
        if not os.path.isfile(os.path.join(name_or_path, "config.json")):
            raise FileNotFoundError(
                f"model_name_or_path {name_or_path} is a folder without a config.json, not a saved model"
            )
    elif not looks_like_a_hub_id(name_or_path):
        raise FileNotFoundError(f"model_name_or_path {name_or_path}: no such folder")
    try:
        config_file = cached_file(name_or_path, "config.json", revision=revision)
    except OSError as error:
        where = "failed" if os.path.isdir(name_or_path) else "is not a folder here, and loading it from the Hub failed"
        raise FileNotFoundError(f"cannot load the model {name_or_path!r}: it {where} ({first_line(error)})") from None
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{config_file} is not valid JSON; the checkpoint is damaged") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} is not a model config (a JSON object)")
    return config


def checkpoint_model_type(name_or_path: str, revision: str | None = None) -> str | None:
    """The model_type in a checkpoint's config.json (local folder or Hub)."""
    return checkpoint_config(name_or_path, revision).get("model_type")


NOT_CAUSAL = "which is not a causal language model; SFT and DPO need a decoder-only one such as GPT-2 or Llama"


def check_causal_lm(config: Any, where: str, architectures: list[str] | None = None) -> None:
    """SFT and DPO need a causal (decoder-only) language model: not an encoder, a seq2seq or a vision model."""
    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{where} is a {model_type!r} encoder-decoder model, {NOT_CAUSAL}")
    has_remote_code = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if not has_remote_code and type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        kind = ", ".join(architectures or []) or type(config).__name__
        raise ValueError(f"{where} is a {model_type!r} model ({kind}), {NOT_CAUSAL}")
    heads = [name for name in architectures or [] if "For" in name and not name.endswith("ForCausalLM")]
    if architectures and len(heads) == len(architectures):
        raise ValueError(f"{where} holds a {', '.join(heads)} ({model_type!r}), {NOT_CAUSAL}")


def config_from_name(model_args: ModelArguments, trust_remote_code: bool = False) -> Any:
    """A config for random initialisation: a GPT-2 preset, or a config.json (folder or Hub id)."""
    overrides = model_args.model_config_overrides or {}
    if not isinstance(overrides, dict):
        raise ValueError(f"model_config_overrides must be a mapping of config fields, got {type(overrides).__name__}")
    name = model_args.model_config
    is_preset = name.partition("/")[0] in GPT2_SIZES
    if is_preset:
        base = AlignmentGPT2Config.from_preset(name)
    else:
        if not os.path.isdir(name) and not looks_like_a_hub_id(name):
            presets = ", ".join(GPT2_SIZES)
            raise FileNotFoundError(f"model_config {name}: no such folder (nor a GPT-2 preset: {presets})")
        try:
            base = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"model_config {name!r} is neither a GPT-2 preset ({', '.join(GPT2_SIZES)}, each also with /dropout) "
                f"nor a folder or Hub id with a config.json ({first_line(error)})"
            ) from None
    known = set(base.to_dict()) | set(getattr(base, "attribute_map", {}) or {})
    unknown = [key for key in overrides if key not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(known), n=2)
            hints.append(f"{key!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise ValueError(f"model_config_overrides: unknown config fields {', '.join(hints)}")
    if is_preset:
        config = AlignmentGPT2Config.from_preset(name, **overrides)
    else:
        config = base
        for key, value in overrides.items():
            setattr(config, key, value)
    check_causal_lm(config, f"model_config {name}", getattr(config, "architectures", None))
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
    raw = checkpoint_config(path, model_args.model_revision)
    model_type = raw.get("model_type")
    try:
        config = AutoConfig.from_pretrained(
            path, revision=model_args.model_revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(
            f"model_name_or_path {path} holds a model of type {model_type!r} that transformers cannot read "
            f"({first_line(error)})"
        ) from None
    check_causal_lm(config, f"model_name_or_path {path}", raw.get("architectures"))
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
    if model_args.model_name_or_path is not None:  # a wrong path is about the model, not its tokenizer
        checkpoint_config(model_args.model_name_or_path, model_args.model_revision)
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

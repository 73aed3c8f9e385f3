"""Build a model and its tokenizer from a checkpoint or a config, with one clear error when they cannot work
together. Plain arguments: the recipe's `ModelArguments` are mapped onto them in `alignment.run`."""

from __future__ import annotations

import difflib
import json
import logging
import os
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.utils import cached_file

from ..common import first_line, looks_like_hub_id
from ..common.files import nonfinite_parameter, weights_problem
from .configuration_gpt2 import GPT2_SIZES, AlignmentGPT2Config
from .modeling_gpt2 import AlignmentGPT2ForCausalLM
from .tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


def torch_dtype(name: str | None) -> torch.dtype | str:
    if name in (None, "auto"):
        return "auto"
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; use float32, bfloat16, float16 or auto")
    return dtype


def checkpoint_config(name_or_path: str, revision: str | None = None) -> dict[str, Any]:
    """A checkpoint's config.json (local folder or Hub), with one clear error when there is none."""
    if os.path.exists(name_or_path) and not os.path.isdir(name_or_path):
        raise ValueError(f"model_name_or_path must be a checkpoint folder or a Hub id, not a file: {name_or_path}")
    if os.path.isdir(name_or_path):
        if not os.path.isfile(os.path.join(name_or_path, "config.json")):
            raise FileNotFoundError(
                f"model_name_or_path {name_or_path} is a folder without a config.json, not a saved model"
            )
    elif not looks_like_hub_id(name_or_path):
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


def config_from_name(name: str, overrides: dict[str, Any] | None = None, trust_remote_code: bool = False) -> Any:
    """A config for random initialisation: a GPT-2 preset, or a config.json (folder or Hub id)."""
    overrides = overrides or {}
    if not isinstance(overrides, dict):
        raise ValueError(f"model_config_overrides must be a mapping of config fields, got {type(overrides).__name__}")
    is_preset = name.partition("/")[0] in GPT2_SIZES
    if is_preset:
        base = AlignmentGPT2Config.from_preset(name)
    else:
        if not os.path.isdir(name) and not looks_like_hub_id(name):
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


def load_model(
    name_or_path: str | None = None,
    *,
    config_name: str | None = None,
    config_overrides: dict[str, Any] | None = None,
    revision: str | None = None,
    dtype: str | None = None,
    attn_implementation: str | None = None,
    implementation: str = "alignment",
    trust_remote_code: bool = False,
    quantization_config: Any = None,
    device_map: Any = None,
) -> PreTrainedModel:
    """A causal LM: a checkpoint (official GPT-2 ones converted into our class unless `implementation` is
    "transformers"), or random weights from `config_name` (a GPT-2 preset, or a folder/Hub id with a config.json).

    With a bitsandbytes `quantization_config` (QLoRA) the checkpoint's linear layers load quantized, on `device_map`
    (`kbit_device_map()`), and the model is prepared for adapter training (`prepare_for_kbit_training`)."""
    if name_or_path is None and config_name is None:
        raise ValueError("set model_name_or_path (a checkpoint) or model_config (random weights from a config)")
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype), "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if quantization_config is not None:
        kwargs.update(quantization_config=quantization_config, device_map=device_map)
    path = name_or_path
    if path is None and quantization_config is not None:  # from_config has no weights to quantize
        raise ValueError(
            f"{quantization_name(quantization_config)} quantizes a checkpoint's weights, but model_config builds random "
            "ones; set model_name_or_path, or train without quantization"
        )
    if path is None:
        config = config_from_name(config_name, config_overrides, trust_remote_code)
        if attn_implementation is not None:
            config._attn_implementation = attn_implementation
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        dtype = kwargs["dtype"]
        return model.to(dtype) if isinstance(dtype, torch.dtype) else model
    raw = checkpoint_config(path, revision)
    model_type = raw.get("model_type")
    try:
        config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(
            f"model_name_or_path {path} holds a model of type {model_type!r} that transformers cannot read "
            f"({first_line(error)})"
        ) from None
    check_causal_lm(config, f"model_name_or_path {path}", raw.get("architectures"))
    broken = weights_problem(path)  # a local folder's files; the Hub's are whole or not downloaded at all
    if broken:
        raise ValueError(f"model_name_or_path: {broken}; the checkpoint is damaged, use another one")
    if model_type == "gpt2" and implementation == "alignment":
        if quantization_config is not None:  # the conversion builds the model in memory: nothing quantizes it
            raise ValueError(
                f"{quantization_name(quantization_config)}: the official GPT-2 checkpoint {path} is converted into our "
                "GPT-2 class in memory, which bitsandbytes cannot quantize; set model_implementation: transformers, "
                "or save the converted model once (save_pretrained) and load that folder"
            )
        model = AlignmentGPT2ForCausalLM.from_pretrained(path, revision=revision, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, revision=revision, **kwargs)
    if quantization_config is not None:
        prepare_for_kbit_training(model)
    broken = nonfinite_parameter(model)
    if broken:  # trained on, it gives a non-finite loss at the first step, which would be blamed on that step's rows
        raise ValueError(
            f"model_name_or_path {path}: weight {broken} holds NaN or infinite values; the checkpoint was saved from "
            "a diverged run, use an earlier one"
        )
    return model


def quantization_name(quantization_config: Any) -> str:
    """The recipe key that asked for `quantization_config`, for error messages."""
    return "load_in_8bit" if getattr(quantization_config, "load_in_8bit", False) else "load_in_4bit"


def kbit_device_map() -> dict[str, int] | None:
    """Where a quantized model loads: whole on this process's accelerator (bitsandbytes quantizes while loading,
    so the weights should land where they train), or None on CPU. Older TRL's `get_kbit_device_map`, which
    TRL 1.16 no longer has."""
    from accelerate import PartialState

    state = PartialState()
    return {"": state.local_process_index} if state.device.type in ("cuda", "xpu", "npu") else None


def prepare_for_kbit_training(model: PreTrainedModel) -> None:
    """peft's k-bit preparation: the base is frozen and its non-quantized weights (norms, embeddings) kept in
    float32 for stable adapter training. Gradient checkpointing is left to the Trainer (`gradient_checkpointing`),
    which also makes the inputs require grads for it."""
    from peft import prepare_model_for_kbit_training

    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


def tokenizer_source(name_or_path: str | None, tokenizer_name_or_path: str | None = None) -> str:
    """The tokenizer asked for; else the checkpoint's own; else GPT-2's (random init, or a folder without one)."""
    path = name_or_path
    if tokenizer_name_or_path:
        return tokenizer_name_or_path
    if path is None or (
        os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES)
    ):
        return "gpt2"
    return path


def load_model_and_tokenizer(
    name_or_path: str | None = None,
    *,
    tokenizer_name_or_path: str | None = None,
    max_length: int | None = None,
    **model_kwargs: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (`load_model`'s arguments) and tokenizer, checked against each other and against `max_length`."""
    if name_or_path is not None:  # a wrong path is about the model, not its tokenizer
        checkpoint_config(name_or_path, model_kwargs.get("revision"))
    tokenizer = load_tokenizer(tokenizer_source(name_or_path, tokenizer_name_or_path))
    model = load_model(name_or_path, **model_kwargs)
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


def model_max_length(model: PreTrainedModel) -> int | None:
    """How many positions the model has (GPT-2's n_positions, max_position_embeddings elsewhere), if it says."""
    config = model.config.get_text_config()
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None

"""Official GPT-2 checkpoints (transformers' `GPT2LMHeadModel`, model_type "gpt2") into our GPT-2 class.

The official layout stores every projection as a `Conv1D`, a transposed `nn.Linear`, under `transformer.h.N.*` (or
without the `transformer.` prefix when saved from the bare `GPT2Model`). Converting is renaming and transposing; the
config keeps the fields both models share.

This lives outside `modeling_gpt2.py` on purpose: that file travels with every saved checkpoint as remote code,
and a checkpoint of ours never needs converting. `register_gpt2_conversion()` (run when `alignment` is imported)
makes `AlignmentGPT2ForCausalLM.from_pretrained` accept official checkpoints too.

The tables below are the one description of how the two layouts relate, read in both directions: here to load
official checkpoints, in `export.py` to write ours back in the official layout.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.utils import cached_file

from .configuration_gpt2 import AlignmentGPT2Config
from .modeling_gpt2 import AlignmentGPT2PreTrainedModel

HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")
# The projections the official layout stores as `Conv1D`, (in, out): transposed either way, bit for bit.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Old causal-mask buffers some official checkpoints still hold: not weights, dropped on conversion.
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")
# Fields a transformers `GPT2Config` shares with ours, same name and meaning (dropout included: same places).
SHARED_GPT2_FIELDS = (
    "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "embd_pdrop", "attn_pdrop",
    "resid_pdrop", "layer_norm_epsilon", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id",
    "tie_word_embeddings", "use_cache",
)  # fmt: skip
# `GPT2Config` settings our architecture fixes (tanh-GELU, 1/sqrt(d) attention scale, no cross-attention):
# official checkpoints with other values cannot be converted, and exports write exactly these.
GPT2_ARCHITECTURE = {
    "activation_function": "gelu_new",
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
}


def config_from_gpt2(gpt2_config: dict[str, Any], **overrides: Any) -> AlignmentGPT2Config:
    """Our config from the config.json of a transformers GPT-2 checkpoint (model_type "gpt2")."""
    for key, ours in GPT2_ARCHITECTURE.items():
        value = gpt2_config.get(key, ours)  # an absent key is GPT2Config's default, which is ours
        if value != ours:
            raise ValueError(f"GPT-2 checkpoints with {key}={value!r} cannot be converted (ours is {ours!r})")
    fields = {k: gpt2_config[k] for k in SHARED_GPT2_FIELDS if k in gpt2_config}
    return AlignmentGPT2Config(**{**fields, **overrides})


def read_config_if_gpt2(name_or_path: str | os.PathLike, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint's config.json when it is an official GPT-2 one, else None."""
    hub_kwargs = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
    config_file = cached_file(name_or_path, "config.json", **hub_kwargs)
    with open(config_file, encoding="utf-8") as f:
        raw = json.load(f)
    return raw if raw.get("model_type") == "gpt2" else None


def load_checkpoint_tensors(name_or_path: str | os.PathLike, hub_kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """All tensors of a transformers checkpoint: safetensors (single or sharded) first, else a weights-only .bin."""
    from safetensors.torch import load_file

    quiet = {"_raise_exceptions_for_missing_entries": False, **hub_kwargs}
    single = cached_file(name_or_path, "model.safetensors", **quiet)
    if single is not None:
        return load_file(single)
    index = cached_file(name_or_path, "model.safetensors.index.json", **quiet)
    if index is not None:
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        tensors: dict[str, torch.Tensor] = {}
        for shard in shards:
            tensors.update(load_file(cached_file(name_or_path, shard, **hub_kwargs)))
        return tensors
    legacy = cached_file(name_or_path, "pytorch_model.bin", **quiet)
    if legacy is not None:
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin found in {name_or_path}")


def convert_gpt2_state_dict(tensors: dict[str, torch.Tensor], tied: bool = True) -> dict[str, torch.Tensor]:
    """Rename and transpose transformers-GPT-2 tensors into our layout (Conv1D stores weights as (in, out))."""
    converted = {}
    for name, tensor in tensors.items():
        if name.endswith(MASK_BUFFERS):
            continue
        if name == "lm_head.weight" and tied:  # the token embeddings, tied back on load
            continue
        if not name.startswith("transformer.") and name != "lm_head.weight":
            name = "transformer." + name  # checkpoints saved from the bare GPT2Model
        if name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t().contiguous()
        converted[name] = tensor
    return converted


def to_gpt2_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our causal LM's tensors in transformers' `GPT2LMHeadModel` layout: same names, projections transposed."""
    return {
        name: tensor.t().contiguous() if name.endswith(CONV1D_WEIGHTS) else tensor for name, tensor in tensors.items()
    }


def from_gpt2_checkpoint(cls: type, name_or_path: str | os.PathLike, gpt2_config: dict[str, Any], **kwargs: Any):
    """An instance of `cls` (our causal LM or bare backbone) with an official GPT-2 checkpoint's weights."""
    hub_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in HUB_KWARGS}
    dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", None))
    device_map = kwargs.pop("device_map", None)
    kwargs.pop("trust_remote_code", None)
    attn_implementation = kwargs.pop("attn_implementation", None)
    config = config_from_gpt2(gpt2_config, **kwargs)
    config._name_or_path = str(name_or_path)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    model = cls(config)
    tied = config.tie_word_embeddings
    state_dict = convert_gpt2_state_dict(load_checkpoint_tensors(name_or_path, hub_kwargs), tied=tied)
    if not hasattr(model, cls.base_model_prefix):  # the bare backbone has no "transformer." prefix
        prefix = cls.base_model_prefix + "."
        state_dict = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
    model.load_state_dict(state_dict, strict=False, assign=False)
    missing = set(model.state_dict()) - set(state_dict) - ({"lm_head.weight"} if tied else set())
    if missing:
        raise ValueError(f"{name_or_path} is missing GPT-2 weights: {sorted(missing)[:5]}")
    model.tie_weights()
    if dtype is not None and dtype != "auto":
        model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    if device_map is not None:
        if not isinstance(device_map, (str, torch.device)) or device_map == "auto":
            raise ValueError("converting a GPT-2 checkpoint supports device_map only as a single device, e.g. 'cuda'")
        model = model.to(device_map)
    return model.eval()


def _from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any, **kwargs: Any):
    """Our own checkpoints load as usual; official GPT-2 checkpoints (model_type "gpt2") by conversion."""
    if kwargs.get("config") is None and not model_args:
        gpt2_config = read_config_if_gpt2(pretrained_model_name_or_path, kwargs)
        if gpt2_config is not None:
            return from_gpt2_checkpoint(cls, pretrained_model_name_or_path, gpt2_config, **kwargs)
    return PreTrainedModel.from_pretrained.__func__(cls, pretrained_model_name_or_path, *model_args, **kwargs)


def register_gpt2_conversion() -> None:
    """Let `from_pretrained` of our GPT-2 classes read official checkpoints (see the module docstring)."""
    AlignmentGPT2PreTrainedModel.from_pretrained = classmethod(_from_pretrained)

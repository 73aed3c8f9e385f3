"""GPT-2 (Radford et al., 2019) as a transformers model, on our own attention kernel.

The layout follows the paper and the official checkpoints: learned position embeddings, pre-LayerNorm blocks with a
tanh-GELU MLP, a final LayerNorm and an LM head tied to the token embeddings. Parameter names match transformers'
GPT-2 (`transformer.h.N.attn.c_attn`, ...) but every projection is an `nn.Linear`; official checkpoints store them as
`Conv1D` (transposed) and are converted on load by `from_pretrained`.

Two details matter for preference training:

* positions come from the attention mask, so a left-padded sequence gets exactly the log-probs it gets unpadded;
* several documents can share a row (`segment_ids`, or `position_ids` that restart at 0): they never attend to each
  other and their positions restart, so packing changes nothing but speed.

This file, `configuration_gpt2.py` and `attention.py` need only torch and transformers: they are copied into every
saved checkpoint, so `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` works without this package.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import cached_file

from .attention import attend, build_visibility_mask, is_causal_only
from .configuration_gpt2 import AlignmentGPT2Config


class CausalSelfAttention(nn.Module):
    def __init__(self, config: AlignmentGPT2Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # query, key and value in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_dropout = nn.Dropout(config.attn_pdrop)  # a module, so tools that switch dropout off find it
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(
        self,
        hidden_states: torch.Tensor,
        visible: torch.Tensor | None,
        causal_only: bool,
        past_key_values: Cache | None,
        implementation: str,
    ) -> torch.Tensor:
        batch, length, width = hidden_states.shape
        q, k, v = self.c_attn(hidden_states).split(width, dim=2)
        q, k, v = (t.view(batch, length, self.n_head, -1).transpose(1, 2) for t in (q, k, v))  # (B, heads, T, d)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        y = attend(
            q,
            k,
            v,
            visible,
            causal_only=causal_only,
            dropout_p=self.attn_dropout.p if self.training else 0.0,
            implementation=implementation,
        )
        y = y.transpose(1, 2).reshape(batch, length, width)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: AlignmentGPT2Config):
        super().__init__()
        inner = config.n_inner or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, inner)
        self.c_proj = nn.Linear(inner, config.n_embd)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(GradientCheckpointingLayer):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: AlignmentGPT2Config, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        visible: torch.Tensor | None = None,
        *,
        causal_only: bool = False,
        past_key_values: Cache | None = None,
        implementation: str = "auto",
    ) -> torch.Tensor:
        attn_out = self.attn(self.ln_1(hidden_states), visible, causal_only, past_key_values, implementation)
        hidden_states = hidden_states + attn_out
        return hidden_states + self.mlp(self.ln_2(hidden_states))


def positions_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 wherever the segment id changes along the row."""
    index = torch.arange(segment_ids.size(-1), device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=-1).values
    return index - start_index


def segments_from_positions(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Segment ids of a packed row whose positions restart (as TRL's padding-free collator writes them), else None."""
    steps = position_ids[:, 1:] - position_ids[:, :-1]
    if bool((steps == 1).all()):
        return None
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = steps != 1
    return starts.long().cumsum(dim=-1)


class AlignmentGPT2PreTrainedModel(PreTrainedModel):
    config_class = AlignmentGPT2Config
    config: AlignmentGPT2Config
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        if isinstance(module, (CausalSelfAttention, MLP)):
            # GPT-2's scaled init of the projections into the residual stream: 1/sqrt(number of residual layers).
            init.normal_(module.c_proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))

    @property
    def attention_implementation(self) -> str:
        """Our kernel's path for transformers' `attn_implementation`: "eager" is the literal formula."""
        return "reference" if self.config._attn_implementation == "eager" else "auto"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any, **kwargs: Any):
        """Load our own checkpoints as usual, and official GPT-2 checkpoints (model_type "gpt2") by conversion."""
        if kwargs.get("config") is None and not model_args:
            gpt2_config = _read_config_if_gpt2(pretrained_model_name_or_path, kwargs)
            if gpt2_config is not None:
                return cls._from_gpt2_checkpoint(pretrained_model_name_or_path, gpt2_config, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    @classmethod
    def _from_gpt2_checkpoint(cls, name_or_path: str | os.PathLike, gpt2_config: dict[str, Any], **kwargs: Any):
        hub_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in HUB_KWARGS}
        dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", None))
        device_map = kwargs.pop("device_map", None)
        kwargs.pop("trust_remote_code", None)
        attn_implementation = kwargs.pop("attn_implementation", None)
        config = AlignmentGPT2Config.from_gpt2_config(gpt2_config, **kwargs)
        config._name_or_path = str(name_or_path)
        if attn_implementation is not None:
            config._attn_implementation = attn_implementation
        model = cls(config)
        state_dict = convert_gpt2_state_dict(load_checkpoint_tensors(name_or_path, hub_kwargs))
        if not hasattr(model, cls.base_model_prefix):  # the bare backbone has no "transformer." prefix
            prefix = cls.base_model_prefix + "."
            state_dict = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
        model.load_state_dict(state_dict, strict=False, assign=False)
        missing = set(model.state_dict()) - set(state_dict) - {"lm_head.weight"}
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


HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _read_config_if_gpt2(name_or_path: str | os.PathLike, kwargs: dict[str, Any]) -> dict[str, Any] | None:
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


def convert_gpt2_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename and transpose transformers-GPT-2 tensors into our layout (Conv1D stores weights as (in, out))."""
    converted = {}
    for name, tensor in tensors.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # old causal-mask buffers, not weights
            continue
        if name == "lm_head.weight":  # tied to the token embeddings
            continue
        if not name.startswith("transformer."):
            name = "transformer." + name  # checkpoints saved from the bare GPT2Model
        if name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t().contiguous()
        converted[name] = tensor
    return converted


class AlignmentGPT2Model(AlignmentGPT2PreTrainedModel):
    """The GPT-2 backbone: embeddings, blocks, final LayerNorm; returns the last hidden state."""

    def __init__(self, config: AlignmentGPT2Config):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.wte = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        segment_ids: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        r"""
        attention_mask: (B, S) with 1 for tokens and 0 for padding, S counting cached tokens too; or a boolean
            (B, 1, T, S) mask, True where a query may attend a key (ANDed with causality).
        segment_ids: (B, S) ids of the documents packed in each row; documents do not see each other and their
            positions restart. Derived from `position_ids` when those restart at 0 within a row.
        position_ids: (B, T); by default counted over the real tokens of `attention_mask`, or per segment.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        batch, length = inputs_embeds.shape[:2]

        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        key_length = past_length + length

        padding_mask, custom_mask = None, None
        if attention_mask is not None and attention_mask.dim() == 4:
            custom_mask = attention_mask.bool()
        elif attention_mask is not None:
            if attention_mask.shape[-1] != key_length:
                raise ValueError(
                    f"attention_mask covers {attention_mask.shape[-1]} positions but there are {key_length} "
                    f"({past_length} cached + {length} new)"
                )
            padding_mask = attention_mask

        if position_ids is None:
            if padding_mask is not None:
                position_ids = (padding_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
            elif segment_ids is not None:
                position_ids = positions_from_segments(segment_ids)[:, -length:]
            else:
                position_ids = torch.arange(past_length, key_length, device=inputs_embeds.device)[None]
        elif segment_ids is None and attention_mask is None and past_length == 0 and length > 1:
            segment_ids = segments_from_positions(position_ids)
        if padding_mask is not None and bool(padding_mask.all()):
            padding_mask = None  # nothing to hide: keep the fused causal kernel

        visible = build_visibility_mask(
            length,
            key_length,
            causal=True,
            attention_mask=padding_mask,
            segment_ids=segment_ids,
            mask=custom_mask,
            device=inputs_embeds.device,
        )
        causal_only = is_causal_only(
            length, key_length, causal=True, attention_mask=padding_mask, segment_ids=segment_ids, mask=custom_mask
        )

        hidden_states = self.drop(inputs_embeds + self.wpe(position_ids))
        all_hidden_states = [] if output_hidden_states else None
        for block in self.h:
            if all_hidden_states is not None:
                all_hidden_states.append(hidden_states)
            hidden_states = block(
                hidden_states,
                visible,
                causal_only=causal_only,
                past_key_values=past_key_values,
                implementation=self.attention_implementation,
            )
        hidden_states = self.ln_f(hidden_states)
        if all_hidden_states is not None:
            all_hidden_states.append(hidden_states)

        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(all_hidden_states) if all_hidden_states is not None else None,
        )


class AlignmentGPT2ForCausalLM(AlignmentGPT2PreTrainedModel, GenerationMixin):
    """GPT-2 with its language-modelling head (tied to the token embeddings)."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: AlignmentGPT2Config):
        super().__init__(config)
        self.transformer = AlignmentGPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        segment_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        r"""
        labels: (B, T) token ids, -100 where no loss is taken; shifted inside, so `labels = input_ids` works.
        logits_to_keep: if an int > 0, only the last that many positions get logits (generation needs one).
        """
        outputs = self.transformer(
            input_ids,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            segment_ids=segment_ids,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
        )


__all__ = ["AlignmentGPT2Model", "AlignmentGPT2ForCausalLM", "AlignmentGPT2PreTrainedModel"]

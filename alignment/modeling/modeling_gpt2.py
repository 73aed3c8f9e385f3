"""GPT-2 (Radford et al., 2019) as a transformers model, on our own attention kernel.

The layout follows the paper and the official checkpoints: learned position embeddings, pre-LayerNorm blocks with a
tanh-GELU MLP, a final LayerNorm and an LM head tied to the token embeddings. Parameter names match transformers'
GPT-2 (`transformer.h.N.attn.c_attn`, ...) but every projection is an `nn.Linear`; official checkpoints store them as
`Conv1D` (transposed) and are converted on load by `from_pretrained` (`conversion.py`, which stays in the package).

Two details matter for preference training:

* positions come from the attention mask, so a left-padded sequence gets exactly the log-probs it gets unpadded;
* several documents can share a row (`segment_ids`, or `position_ids` that restart at 0): they never attend to each
  other and their positions restart, so packing changes nothing but speed. Without a KV cache, attention then runs
  over short rows of whole documents (`group_documents`) rather than over the whole packed row.

This file, `configuration_gpt2.py` and `attention.py` need only torch and transformers: they are copied into every
saved checkpoint, so `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` works without this package.
"""

from __future__ import annotations

import math
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

from .attention import DocumentGroups, attend, build_visibility_mask, group_documents, is_causal_only
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
        groups: DocumentGroups | None = None,
    ) -> torch.Tensor:
        batch, length, width = hidden_states.shape
        qkv = self.c_attn(hidden_states)
        if groups is not None:  # packed documents: attend within short rows of whole documents (`visible` is theirs)
            qkv = groups.gather(qkv)
        rows, columns = qkv.shape[:2]
        q, k, v = qkv.split(width, dim=2)
        q, k, v = (t.view(rows, columns, self.n_head, -1).transpose(1, 2) for t in (q, k, v))  # (B, heads, T, d)
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
        y = y.transpose(1, 2).reshape(rows, columns, width)
        if groups is not None:
            y = groups.scatter(y, batch, length)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: AlignmentGPT2Config):
        super().__init__()
        inner = config.n_inner or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, inner)
        self.c_proj = nn.Linear(inner, config.n_embd)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor, recompute_activation: bool = True) -> torch.Tensor:
        pre_activation = self.c_fc(x)
        activation = F.gelu(pre_activation, approximate="tanh")
        if not (recompute_activation and activation.requires_grad) or torch.compiler.is_compiling():
            return self.dropout(self.c_proj(activation))
        with torch.autograd.graph.saved_tensors_hooks(*gelu_recomputed_when_saved(pre_activation, activation)):
            return self.dropout(self.c_proj(activation))


def gelu_recomputed_when_saved(pre_activation: torch.Tensor, activation: torch.Tensor):
    """Saved-tensor hooks that store GELU's output, which the projection after it saves for its weight gradient,
    as the GELU input (saved anyway, by GELU's own backward) and recompute it in the backward pass.

    The MLP's 4 × width activation is the largest tensor a block keeps for its backward; this keeps one of the two
    (1/3 of a GPT-2 block's saved activations) for an elementwise recomputation. The projection is still called as a
    module (LoRA, quantized layers and ZeRO-3's parameter gathering see it); torch has no option for this.
    """

    # torch keeps the hooks as long as what they saved, so they hold the activation's address, not the activation
    address, size, dtype = activation.data_ptr(), activation.numel(), activation.dtype

    def pack(saved: torch.Tensor):
        same = saved.data_ptr() == address and saved.numel() == size and saved.dtype == dtype
        if same and saved.is_contiguous():
            return pre_activation, saved.shape
        return saved

    def unpack(packed):
        if isinstance(packed, tuple):
            source, shape = packed
            return F.gelu(source, approximate="tanh").view(shape)
        return packed

    return pack, unpack


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
        groups: DocumentGroups | None = None,
    ) -> torch.Tensor:
        attn_out = self.attn(self.ln_1(hidden_states), visible, causal_only, past_key_values, implementation, groups)
        hidden_states = hidden_states + attn_out
        # under activation checkpointing nothing is saved to recompute (and the checkpoint owns the saved tensors)
        return hidden_states + self.mlp(self.ln_2(hidden_states), recompute_activation=not self.gradient_checkpointing)


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
        attention_layout: torch.LongTensor | None = None,
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
        attention_layout: (R, L) for tokens given without padding: attention runs over R rows of L slots, each
            holding the flat (b · T + t) token `attention_layout` names, or padding (-1); `attention_mask` is then
            those rows' boolean (R, 1, L, L) mask (ANDed with causality along each row) and `position_ids` are
            required (`DocumentGroups.from_layout`).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        batch, length = inputs_embeds.shape[:2]
        if attention_layout is not None:
            if use_cache or past_key_values is not None or segment_ids is not None or position_ids is None:
                raise ValueError("attention_layout needs position_ids, and no KV cache or segment_ids")
            groups = DocumentGroups.from_layout(attention_layout, attention_mask, batch * length)
            return self.run_blocks(inputs_embeds, position_ids, groups.visible, False, None, groups,
                                   output_hidden_states)  # fmt: skip

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

        groups = None
        if segment_ids is not None and padding_mask is None and custom_mask is None and past_key_values is None:
            groups = group_documents(segment_ids)  # None unless short rows of whole documents do less work
        visible = (
            groups.visible
            if groups is not None
            else build_visibility_mask(
                length,
                key_length,
                causal=True,
                attention_mask=padding_mask,
                segment_ids=segment_ids,
                mask=custom_mask,
                device=inputs_embeds.device,
            )
        )
        causal_only = is_causal_only(
            length, key_length, causal=True, attention_mask=padding_mask, segment_ids=segment_ids, mask=custom_mask
        )

        outputs = self.run_blocks(
            inputs_embeds, position_ids, visible, causal_only, past_key_values, groups, output_hidden_states
        )
        if not use_cache:
            outputs.past_key_values = None
        return outputs

    def run_blocks(
        self, inputs_embeds, position_ids, visible, causal_only, past_key_values, groups, output_hidden_states
    ) -> BaseModelOutputWithPast:
        """Position embeddings, the blocks and the final LayerNorm, under a prepared mask (and document groups)."""
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
                groups=groups,
            )
        hidden_states = self.ln_f(hidden_states)
        if all_hidden_states is not None:
            all_hidden_states.append(hidden_states)

        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values,
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
        attention_layout: torch.LongTensor | None = None,
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
            attention_layout=attention_layout,
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

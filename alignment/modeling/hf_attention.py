"""Expose our attention kernel to every transformers model as ``attn_implementation="alignment"``.

Transformers builds the mask with its registered mask function and then calls the registered attention function.
We reuse its ``sdpa_mask`` (a boolean (B, 1, T, S) mask, True = visible, or None when plain causal attention is
enough) and run our kernel on it.

It also takes what our GPT-2 takes: tokens without padding, one row (1, N), with the rows attention runs in as
``attention_layout`` and their 4D mask as the attention mask (`DocumentGroups.from_layout`). Transformers passes a
4D mask through unchanged and a model's extra keyword arguments down to its attention function, so a model whose
layers do (Llama, Qwen, Mistral, …) can be trained on padding-free shared-prefix batches; whether one does is
checked by a probe (`layouts.use_padding_free_attention`), not assumed.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .attention import DocumentGroups, attention

ATTN_IMPLEMENTATION = "alignment"


def alignment_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The transformers attention contract: (B, heads, T, d) in, (B, T, heads, d) out, no weights."""
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # grouped-query attention: share each key/value head among its query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask == 0  # an additive float mask: 0 where visible
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    layout = kwargs.get("attention_layout")
    if layout is not None:
        return attention_in_layout(query, key, value, layout, attention_mask, dropout, scaling), None
    output = attention(
        query,
        key,
        value,
        causal=is_causal and attention_mask is None,
        mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
    )
    return output.transpose(1, 2).contiguous(), None


def attention_in_layout(query, key, value, layout, mask, dropout, scaling) -> torch.Tensor:
    """(1, heads, N, d) tokens without padding -> attention in the rows of `layout` under their (R, 1, L, L) `mask`
    (ANDed with causality along each row, as our GPT-2 does) -> (1, N, heads, d)."""
    if query.size(0) != 1:
        raise ValueError(f"attention_layout needs the tokens as one row, not {query.size(0)}")
    rows = DocumentGroups.from_layout(layout, mask, query.size(2))
    q, k, v = (rows.gather(t.transpose(1, 2)).transpose(1, 2) for t in (query, key, value))  # (R, heads, L, d)
    out = attention(q, k, v, causal=False, mask=rows.visible, dropout_p=dropout, scale=scaling)
    return rows.scatter(out.transpose(1, 2), 1, query.size(2))


def register_with_transformers() -> None:
    """Register the kernel and its mask builder under ``ATTN_IMPLEMENTATION``; safe to call more than once."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, alignment_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)

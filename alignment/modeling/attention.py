"""Multi-head scaled dot-product attention with causal, padding, packed-segment and arbitrary masks.

    O = softmax(Q Kᵀ / √d + M) · V        (per head; M = 0 where visible, a very large negative value where not)

Inputs are shaped (batch, heads, time, head_dim). Queries may be fewer than keys (decoding with a KV cache): they are
then the *last* T of the S key positions, which is what the causal mask assumes.

Two paths sit behind :func:`attention`:

* ``"reference"`` follows the formula literally (scores, additive mask, softmax, dropout, weighted sum). It is the
  specification the fast path is tested against, and it is what ``attn_implementation="eager"`` runs.
* ``"sdpa"`` is PyTorch's fused ``scaled_dot_product_attention``: its causal kernel when the mask is purely causal,
  a boolean mask otherwise.

``"auto"`` picks ``"sdpa"``. A query row that sees no key at all (a left-padding query, say) returns zeros on both
paths rather than the average of V or NaN.

A packed row of many documents (TRL's padding-free SFT batches put a whole batch in one row of thousands of tokens)
would spend most of its attention on pairs of tokens from different documents, computed and then masked away.
:func:`group_documents` regroups the documents into short rows of at most the longest document's length, so that
attention runs over those instead (`DocumentGroups`): the same keys for every query, a fraction of the work. The
other way round, a caller can give the tokens without padding and the rows attention runs in
(`DocumentGroups.from_layout`), so that padding costs attention only.

This file only needs torch: it travels with saved checkpoints so that ``trust_remote_code`` loading works where the
``alignment`` package is not installed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def build_visibility_mask(
    query_length: int,
    key_length: int,
    *,
    causal: bool = True,
    attention_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor | None:
    """Combine every mask into one boolean tensor, True where a query may look at a key.

    Args:
        query_length, key_length: T and S. Queries are the last T of the S positions.
        causal: each query sees keys at or before its own position.
        attention_mask: (B, S) with 1 for a token and 0 for padding; padding keys are hidden.
        segment_ids: (B, S) document ids of a packed row; a query only sees keys of its own document.
        mask: any boolean mask broadcastable to (B, heads, T, S), True = visible; ANDed with the rest.

    Returns:
        A boolean tensor broadcastable to (B, heads, T, S), or None when every key is visible to every query.
    """
    visible = None
    offset = key_length - query_length
    if causal and not (query_length == 1 and offset >= 0):
        q_pos = torch.arange(query_length, device=device) + offset
        k_pos = torch.arange(key_length, device=device)
        visible = (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        keys = attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, S)
        visible = keys if visible is None else visible & keys
    if segment_ids is not None:
        segment_ids = segment_ids.to(device)
        same = segment_ids[:, None, -query_length:, None] == segment_ids[:, None, None, :]  # (B, 1, T, S)
        visible = same if visible is None else visible & same
    if mask is not None:
        mask = mask.to(device=device, dtype=torch.bool)
        visible = mask if visible is None else visible & mask
    return visible


def reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    visible: torch.Tensor | None = None,
    *,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """The formula, step by step. Scores and softmax are computed in float32 at least."""
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    compute_dtype = torch.promote_types(query.dtype, torch.float32)
    scores = (query.to(compute_dtype) @ key.to(compute_dtype).transpose(-2, -1)) * scale
    if visible is not None:
        very_negative = torch.finfo(compute_dtype).min
        scores = scores + torch.zeros_like(scores).masked_fill(~visible, very_negative)  # + M
    probs = torch.softmax(scores, dim=-1)
    if visible is not None:
        # A row that sees nothing would otherwise spread uniformly over hidden keys.
        probs = probs.masked_fill(~visible.any(dim=-1, keepdim=True), 0.0)
    probs = F.dropout(probs, p=dropout_p) if dropout_p > 0 else probs
    return (probs @ value.to(compute_dtype)).to(value.dtype)


def sdpa_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    visible: torch.Tensor | None = None,
    *,
    causal_only: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """PyTorch's fused kernel. `causal_only` means `visible` is exactly the square causal mask."""
    if causal_only:
        return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout_p, scale=scale, is_causal=True)
    if visible is None:
        return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout_p, scale=scale)
    sees_something = visible.any(dim=-1, keepdim=True)
    # Rows without any visible key would make the fused softmax produce NaN (and NaN gradients); let them see
    # everything and zero their output afterwards, which also zeroes their gradients.
    safe_visible = visible | ~sees_something
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=safe_visible, dropout_p=dropout_p, scale=scale)
    return out.masked_fill(~sees_something, 0.0)


IMPLEMENTATIONS = ("auto", "sdpa", "reference")

GROUPING_MIN_SAVING = 2.0  # regroup only when the packed rows' attention is at least this many times the groups'


class DocumentGroups:
    """The documents of packed rows, regrouped into short rows for attention.

    `index` (count · length,) gives, for each slot of the short rows, the flat (row · S + column) token it holds
    (slots past a group's documents hold token 0 and see only themselves); `inverse` (B · S,) gives each token's slot;
    `visible` (count, 1, length, length) is causal attention within each document.
    """

    def __init__(self, index: torch.Tensor, inverse: torch.Tensor, visible: torch.Tensor):
        self.index, self.inverse, self.visible = index, inverse, visible

    @property
    def count(self) -> int:
        return self.visible.size(0)

    @property
    def length(self) -> int:
        return self.visible.size(-1)

    @classmethod
    def from_layout(cls, layout: torch.Tensor, visible: torch.Tensor | None, tokens: int) -> DocumentGroups:
        """Attention rows laid out by the caller: `layout` (count, length) holds, for each slot, the flat index of the
        token it takes (each of the `tokens` exactly once), or -1 for padding (which should see only itself), and
        `visible` (count, 1, length, length) their boolean mask, ANDed here with causality along each row, as any 4D
        mask is (a padding-free preference batch, `SharedPrefixPreferenceCollator`)."""
        if visible is None or visible.dim() != 4 or visible.shape[0] != layout.shape[0]:
            raise ValueError("attention_layout needs attention_mask as its rows' boolean (rows, 1, L, L) mask")
        flat = layout.flatten()
        real = (flat >= 0).nonzero().flatten()
        if real.numel() != tokens:
            raise ValueError(f"attention_layout holds {real.numel()} tokens, not the {tokens} given")
        inverse = torch.empty(real.numel(), dtype=torch.long, device=layout.device)
        inverse[flat[real]] = real
        causal = torch.ones(visible.shape[-2:], dtype=torch.bool, device=visible.device).tril()
        return cls(flat.clamp(min=0), inverse, visible.bool() & causal)

    def gather(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, S, ...) per-token values -> (count, length, ...) in the short rows."""
        flat = tokens.reshape(-1, *tokens.shape[2:])
        return flat.index_select(0, self.index).view(self.count, self.length, *tokens.shape[2:])

    def scatter(self, grouped: torch.Tensor, batch: int, length: int) -> torch.Tensor:
        """(count, length, ...) -> (B, S, ...): every token back in its place (a gather, so gradients stay exact)."""
        flat = grouped.reshape(-1, *grouped.shape[2:])
        return flat.index_select(0, self.inverse).view(batch, length, *grouped.shape[2:])


def plan_document_groups(segment_ids: torch.Tensor) -> list[list[tuple[int, int]]] | None:
    """The short rows `group_documents` would build, as (flat start, length) of each document in each row.

    Documents are the runs of equal, non-decreasing segment ids of the rows (B, S); they are taken in order, and a
    short row is filled until the next document would not fit in the longest document's length. None when that
    would not cut the attention work (rows · S²) by at least `GROUPING_MIN_SAVING` (one long document, say), or when
    an id comes back later in its row (one document in several runs), so the caller keeps one dense mask.
    """
    batch, width = segment_ids.shape
    if not bool((segment_ids[:, 1:] >= segment_ids[:, :-1]).all()):
        return None
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    flat_starts = starts.flatten().nonzero().flatten().tolist()
    documents = [(start, end - start) for start, end in zip(flat_starts, flat_starts[1:] + [batch * width])]
    capacity = max(n for _, n in documents)
    groups: list[list[tuple[int, int]]] = [[]]
    used = 0
    for document in documents:
        if used + document[1] > capacity:
            groups.append([])
            used = 0
        groups[-1].append(document)
        used += document[1]
    length = max(sum(n for _, n in group) for group in groups)
    if len(groups) * length**2 * GROUPING_MIN_SAVING > batch * width**2:
        return None
    return groups


def group_documents(segment_ids: torch.Tensor) -> DocumentGroups | None:
    """Regroup the documents of packed rows (B, S) into short rows (`plan_document_groups`), or None."""
    groups = plan_document_groups(segment_ids)
    if groups is None:
        return None
    length = max(sum(n for _, n in group) for group in groups)
    index: list[int] = []
    local_segments: list[int] = []  # segment ids within each short row; padding slots each get their own
    for group in groups:
        for document, (start, n) in enumerate(group):
            index += range(start, start + n)
            local_segments += [document] * n
        padding = length - sum(n for _, n in group)
        index += [0] * padding
        local_segments += range(-1, -1 - padding, -1)
    device = segment_ids.device
    index_tensor = torch.tensor(index, device=device)
    slots = torch.tensor(local_segments, device=device)
    real = (slots >= 0).nonzero().flatten()
    inverse = torch.empty(segment_ids.numel(), dtype=torch.long, device=device)
    inverse[index_tensor[real]] = real
    visible = build_visibility_mask(length, length, causal=True, segment_ids=slots.view(len(groups), length))
    return DocumentGroups(index_tensor, inverse, visible)


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    visible: torch.Tensor | None,
    *,
    causal_only: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    implementation: str = "auto",
) -> torch.Tensor:
    """Attention under a prebuilt mask (see :func:`build_visibility_mask`), so a model builds it once per forward.

    `causal_only` says that `visible` is exactly the square causal mask, which lets the fused causal kernel run.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; choose one of {IMPLEMENTATIONS}")
    if implementation == "reference":
        return reference_attention(query, key, value, visible, dropout_p=dropout_p, scale=scale)
    return sdpa_attention(query, key, value, visible, causal_only=causal_only, dropout_p=dropout_p, scale=scale)


def is_causal_only(
    query_length: int,
    key_length: int,
    *,
    causal: bool,
    attention_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> bool:
    """True when the masks reduce to the plain square causal mask."""
    no_other_mask = attention_mask is None and segment_ids is None and mask is None
    return causal and query_length == key_length and no_other_mask


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    causal: bool = True,
    attention_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    implementation: str = "auto",
) -> torch.Tensor:
    """Masked multi-head attention; returns (B, heads, T, head_dim). See the module docstring for the masks."""
    masks = {"attention_mask": attention_mask, "segment_ids": segment_ids, "mask": mask}
    query_length, key_length = query.size(-2), key.size(-2)
    visible = build_visibility_mask(query_length, key_length, causal=causal, device=query.device, **masks)
    causal_only = is_causal_only(query_length, key_length, causal=causal, **masks)
    return attend(
        query,
        key,
        value,
        visible,
        causal_only=causal_only,
        dropout_p=dropout_p,
        scale=scale,
        implementation=implementation,
    )

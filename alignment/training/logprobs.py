"""Per-token log-probabilities of the true next tokens, computed only where they are used.

A sequence's log-probability is the sum, over the tokens we score, of log_softmax(logits)[true next token]. Taking the
LM head and the log-softmax over every position and the whole vocabulary wastes most of the work (prompts are long,
vocabularies are 50k wide), and materialising (batch × length × vocab) floats dominates memory. Here the head runs
only on the positions whose label is not -100, a chunk of rows at a time, and the backward pass recomputes each
chunk's softmax instead of storing it (or, for a loss that weighs every token alike, only scales the gradients the
forward pass took from its softmax: `uniform_token_weights`).

`add_logprob_head(model)` patches `model.forward` so that `model(..., labels=labels, token_logps=True)` returns the
(batch, length - 1) log-probs (0 where no label) (`token_logps="with_stats"`: and the entropy and top-1 hits of those
positions, for the SFT metrics), and `model(..., score_positions=P, score_targets=Y,
token_logps=True)` the log-probs of the N tokens Y predicted from the hidden states at the (row, column) pairs P.
`token_logps="with_log_sum_sq"` returns, for either form, the scored tokens' log-probs flat and log Σ_v p_v² of their
distributions (WPO's weights).
Going through `model(...)` rather than calling submodules keeps DDP/FSDP/PEFT wrappers in the loop.

The head handles the same variants as TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`): logits scaled
(Cohere's `logit_scale`, Granite's `logits_scaling`, Falcon-H1's `lm_head_multiplier`, ...) and soft-capped
(Gemma 2's `final_logit_softcapping`). TRL's kernel would serve, but on CPU it is 1.3-1.5x slower than this one
(2048 tokens × GPT-2's head, forward and backward), and it has no mode for our reply-only `score_positions`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

IGNORE_INDEX = -100
CHUNK_ROWS = 1024  # rows of logits alive at once: 1024 × 50257 floats ≈ 200 MB in fp32


@dataclass(frozen=True)
class HeadTransform:
    """What a model does to its LM head's output before the softmax: z = cap · tanh(scale · logits / cap)."""

    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, config: Any) -> HeadTransform:
        """The transform a model's config asks for, read as TRL's fused LM head reads it."""
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        scale = getattr(text_config, "logit_scale", None)
        if scale is None:
            scale = getattr(text_config, "output_multiplier", None)
        if scale is None:
            scale = getattr(text_config, "lm_head_multiplier", None)
        if scale is None and getattr(text_config, "logits_scaling", None) is not None:
            scaling = text_config.logits_scaling  # HyperCLOVA X multiplies by it, Granite and MiniCPM3 divide
            scale = scaling if getattr(text_config, "model_type", None) == "hyperclovax" else 1 / scaling
        return cls(1.0 if scale is None else float(scale), getattr(text_config, "final_logit_softcapping", None))


PLAIN_HEAD = HeadTransform()


class _ChunkedTokenLogProbs(torch.autograd.Function):
    """log_softmax(transform(hidden @ weightᵀ + bias))[target], row by row in chunks, with a recomputing backward.

    Also returns, without gradients, each row's entropy and whether the target is the argmax (TRL's `entropy` and
    `mean_token_accuracy` metrics) and, when asked for, log Σ_v p_v² (WPO's weights; empty otherwise, to keep it
    out of every other step), from the same softmax: they cost no second pass through the head."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows, transform, with_log_sum_sq=False, uniform=False):
        out = torch.empty(hidden.size(0), dtype=_compute_dtype(hidden), device=hidden.device)
        entropy = torch.empty_like(out)
        is_top1 = torch.empty(hidden.size(0), dtype=torch.bool, device=hidden.device)
        log_sum_sq = torch.empty_like(out) if with_log_sum_sq else out.new_empty(0)
        # `uniform`: the caller's loss weighs every token alike (SFT's mean NLL), so the gradients of Σ log-probs,
        # taken here from the softmax at hand, only need scaling in the backward pass: no second pass of the head
        unit = _Gradients.empty_for(hidden, weight, bias, ctx.needs_input_grad) if uniform else None
        for start in range(0, hidden.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits = _transformed(_logits(hidden[rows], weight, bias), transform)
            normaliser = logits.logsumexp(dim=1)
            out[rows] = logits.gather(1, targets[rows, None]).squeeze(1) - normaliser
            probs = torch.softmax(logits, dim=1)
            entropy[rows] = normaliser - (probs * logits).sum(1)
            if with_log_sum_sq:
                log_sum_sq[rows] = probs.square().sum(1).log()
            is_top1[rows] = logits.argmax(dim=1) == targets[rows]  # the first maximum, as TRL counts it
            if unit is not None:
                unit.add(rows, _grad_logits(probs, logits, targets[rows], transform), hidden, weight)
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk_rows = chunk_rows
        ctx.transform = transform
        ctx.unit = unit
        ctx.mark_non_differentiable(entropy, is_top1, log_sum_sq)
        return out, entropy, is_top1, log_sum_sq

    @staticmethod
    def backward(ctx, grad_out, _grad_entropy=None, _grad_is_top1=None, _grad_log_sum_sq=None):
        hidden, weight, bias, targets = ctx.saved_tensors
        unit, ctx.unit = ctx.unit, None
        if unit is not None and bool((grad_out == grad_out[:1]).all()):  # every token weighed alike, as promised
            unit.scale_(grad_out[0] if grad_out.numel() else grad_out.new_zeros(()))
            return (*unit.in_dtypes_of(hidden, weight, bias), None, None, None, None, None)
        grads = _Gradients.empty_for(hidden, weight, bias, ctx.needs_input_grad)
        for start in range(0, hidden.size(0), ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            z = _transformed(_logits(hidden[rows], weight, bias), ctx.transform)
            grad_logits = _grad_logits(torch.softmax(z, dim=1), z, targets[rows], ctx.transform)
            grad_logits *= grad_out[rows, None]
            del z
            grads.add(rows, grad_logits, hidden, weight)
        return (*grads.in_dtypes_of(hidden, weight, bias), None, None, None, None, None)


def _grad_logits(probs: torch.Tensor, z: torch.Tensor, targets: torch.Tensor, transform: HeadTransform) -> torch.Tensor:
    """d log p(target) / d raw logits, in place of `probs` = softmax(z): onehot(target) − probs, through the
    transform (z = cap · tanh(scale · raw / cap): dz/draw = scale · (1 − (z / cap)²))."""
    grad = probs.neg_()
    grad.scatter_add_(1, targets[:, None], torch.ones_like(grad[:, :1]))
    if transform.softcap is not None:
        grad *= 1 - (z / transform.softcap) ** 2
    if transform.scale != 1.0:
        grad *= transform.scale
    return grad


class _Gradients:
    """The head's gradients (hidden, weight, bias), accumulated chunk by chunk in the softmax statistics' dtype."""

    def __init__(self, hidden, weight, bias):
        self.hidden, self.weight, self.bias = hidden, weight, bias

    @classmethod
    def empty_for(cls, hidden, weight, bias, needs_input_grad):
        dtype = _compute_dtype(hidden)
        return cls(
            torch.empty_like(hidden) if needs_input_grad[0] else None,
            torch.zeros_like(weight, dtype=dtype) if needs_input_grad[1] else None,
            torch.zeros_like(bias, dtype=dtype) if bias is not None and needs_input_grad[2] else None,
        )

    def add(self, rows: slice, grad_logits: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor) -> None:
        dtype = grad_logits.dtype
        if self.hidden is not None:
            self.hidden[rows] = (grad_logits @ weight.to(dtype)).to(hidden.dtype)
        if self.weight is not None:
            self.weight += grad_logits.t() @ hidden[rows].to(dtype)
        if self.bias is not None:
            self.bias += grad_logits.sum(0)

    def scale_(self, scale: torch.Tensor) -> None:
        for grad in (self.hidden, self.weight, self.bias):
            if grad is not None:
                grad.mul_(scale.to(grad.dtype))

    def in_dtypes_of(self, hidden, weight, bias) -> tuple:
        """(grad hidden, grad weight, grad bias) in the inputs' dtypes."""
        pairs = ((self.hidden, hidden), (self.weight, weight), (self.bias, bias))
        return tuple(grad.to(like.dtype) if grad is not None else None for grad, like in pairs)


def _transformed(logits: torch.Tensor, transform: HeadTransform) -> torch.Tensor:
    if transform.scale != 1.0:
        logits = logits * transform.scale
    if transform.softcap is not None:
        logits = transform.softcap * torch.tanh(logits / transform.softcap)
    return logits


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """Softmax statistics in float32 at least, whatever the activations' precision."""
    return torch.promote_types(hidden.dtype, torch.float32)


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return logits.to(_compute_dtype(hidden))


def logprobs_of_targets(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_rows: int = CHUNK_ROWS,
    transform: HeadTransform = PLAIN_HEAD,
) -> torch.Tensor:
    """For N hidden states (N, d) and their N target ids, the N log-probs under the head (weight: (vocab, d))."""
    return _ChunkedTokenLogProbs.apply(hidden, weight, bias, targets, chunk_rows, transform)[0]


def logprobs_and_log_sum_sq(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    transform: HeadTransform = PLAIN_HEAD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`logprobs_of_targets`, and log Σ_v p_v² of each row's distribution (no gradient; WPO's weights)."""
    logps, _, _, log_sum_sq = _ChunkedTokenLogProbs.apply(hidden, weight, bias, targets, CHUNK_ROWS, transform, True)
    return logps, log_sum_sq


@dataclass
class TokenStats:
    """Per-token figures of the scored positions, for TRL's metrics: (B, T-1), zero where nothing is scored."""

    entropy: torch.Tensor
    is_top1: torch.Tensor
    scored: torch.Tensor  # (B, T-1) bool


def token_logps_and_stats(
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    lm_head: nn.Module,
    transform: HeadTransform = PLAIN_HEAD,
    uniform_weights: bool = False,
) -> tuple[torch.Tensor, TokenStats]:
    """Like `token_logps_from_hidden`, with the entropy and top-1 hit of every scored position (no gradients).

    `uniform_weights`: the loss weighs every scored token's log-prob alike (a mean NLL), so the head's gradients are
    taken in the forward pass from its softmax and only scaled in the backward pass, which then skips recomputing the
    logits (a quarter of the head's matmuls). A loss that weighs them otherwise still gets exact gradients, by the
    recomputation."""
    hidden_states, targets = hidden_states[:, :-1], labels[:, 1:].to(hidden_states.device)
    scored = targets != IGNORE_INDEX
    bias = getattr(lm_head, "bias", None)
    logps, entropy, is_top1, _ = _ChunkedTokenLogProbs.apply(
        hidden_states[scored], lm_head.weight, bias, targets[scored], CHUNK_ROWS, transform, False, uniform_weights
    )
    zeros = torch.zeros(scored.shape, dtype=logps.dtype, device=logps.device)
    stats = TokenStats(zeros.masked_scatter(scored, entropy), scored.masked_scatter(scored, is_top1), scored)
    return zeros.masked_scatter(scored, logps), stats


def token_logps_from_hidden(
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    lm_head: nn.Module,
    chunk_rows: int = CHUNK_ROWS,
    transform: HeadTransform = PLAIN_HEAD,
) -> torch.Tensor:
    """(B, T, d) hidden states and (B, T) labels → (B, T-1) log p(label[t+1] | ..t), 0 where the label is -100."""
    hidden_states, targets = hidden_states[:, :-1], labels[:, 1:].to(hidden_states.device)
    scored = targets != IGNORE_INDEX
    logps = logprobs_of_targets(
        hidden_states[scored], lm_head.weight, targets[scored], getattr(lm_head, "bias", None), chunk_rows, transform
    )
    # masked_scatter keeps the graph connected even when nothing is scored, so backward() still works.
    return torch.zeros(scored.shape, dtype=logps.dtype, device=logps.device).masked_scatter(scored, logps)


def add_logprob_head(model: nn.Module) -> nn.Module:
    """Patch `model.forward` so that `token_logps=True` returns per-token log-probs instead of logits.

    The backbone is looked up on every call (`model.base_model`, the LM head via `get_output_embeddings`), since
    PEFT and FSDP replace modules after the patch. Without the flag the original forward runs, so generation and
    everything else are unchanged. Idempotent.
    """
    if getattr(model, "_has_logprob_head", False):
        return model
    original_forward = model.forward
    transform = HeadTransform.of(model.config)

    @functools.wraps(type(model).forward)
    def forward(
        *args,
        token_logps: bool | str = False,
        labels=None,
        score_positions=None,
        score_targets=None,
        uniform_token_weights: bool = False,
        **kwargs,
    ):
        if not token_logps:
            if labels is not None:
                kwargs["labels"] = labels
            return original_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        for unused in ("logits_to_keep", "num_items_in_batch", "fused_lm_head"):
            kwargs.pop(unused, None)
        hidden_states = model.base_model(*args, **kwargs).last_hidden_state
        lm_head = model.get_output_embeddings()
        if token_logps == "with_stats":
            return token_logps_and_stats(hidden_states, labels, lm_head, transform, uniform_token_weights)
        if token_logps == "with_log_sum_sq":  # flat, the scored tokens only, in row-major order
            if score_positions is None:
                targets = labels[:, 1:].to(hidden_states.device)
                scored = targets != IGNORE_INDEX
                sources, score_targets = hidden_states[:, :-1][scored], targets[scored]
            else:
                sources = hidden_states[score_positions[:, 0], score_positions[:, 1]]
            bias = getattr(lm_head, "bias", None)
            return logprobs_and_log_sum_sq(sources, lm_head.weight, score_targets, bias, transform)
        if score_positions is None:
            return token_logps_from_hidden(hidden_states, labels, lm_head, transform=transform)
        sources = hidden_states[score_positions[:, 0], score_positions[:, 1]]
        bias = getattr(lm_head, "bias", None)
        return logprobs_of_targets(sources, lm_head.weight, score_targets, bias, transform=transform)

    model.forward = forward
    model._has_logprob_head = True
    return model

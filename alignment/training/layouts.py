"""The two batch layouts of preference pairs, scored alike, and when the shared-prefix one is exact.

* TRL's layout: rows [prompt + chosen; prompt + rejected], right-padded, reply tokens marked by `completion_mask`.
* The shared-prefix layout (`shared_prefix.py`): one packed [prompt, reply, reply, …] sequence per prompt (the pairs
  of a batch with that prompt, each distinct reply once), several to a row, kept apart by a 4D attention mask and
  restarting positions.

The shared-prefix layout gives the same log-probs only if every token mixer of the model obeys the 4D mask and the
position ids. Attention does; a convolution or a state-space layer (LFM2, Mamba, Nemotron-H hybrids) carries state
from the chosen reply into the rejected one and from one pair into the next, and a sliding window is bypassed by a
4D mask. `prefix_sharing_problem` looks for both: first in the config (layer types, sliding windows, known
recurrent families), then by a probe that scores two small random pairs in both layouts and compares.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from .logprobs import IGNORE_INDEX
from .losses import ReplyLogps
from .shared_prefix import SharedPrefixPreferenceCollator

ATTENTION_LAYER_TYPES = {"full_attention", "attention", "global", "global_attention"}
RECURRENT_MODEL_TYPES = {"mamba", "mamba2", "falcon_mamba", "rwkv", "recurrent_gemma", "xlstm"}
PROBE_PAIRS = [(6, 5, 4), (3, 2, 6)]  # (prompt, chosen, rejected) lengths of the probe's two pairs
PROBED_PADDING_FREE = "_alignment_padding_free"  # set on a transformers model once its padding-free probe passed
PROBE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}  # other dtypes: 5e-2


@dataclass
class ScoredTokens:
    """The log-probs of every reply token of a batch, with the pair and reply each belongs to (each reply's tokens
    in order), and, when asked for, log Σ_v p_v² of each token's distribution (`log_sum_sq`, for WPO)."""

    logps: torch.Tensor  # (N,)
    pairs: torch.Tensor  # (N,) pair index
    rejected: torch.Tensor  # (N,) True for rejected-reply tokens
    num_pairs: int
    log_sum_sq: torch.Tensor | None = None  # (N,), no gradient

    @property
    def slots(self) -> torch.Tensor:
        """(N,) the reply each token belongs to: pair p's chosen reply is p, its rejected one num_pairs + p."""
        return self.rejected.long() * self.num_pairs + self.pairs

    def per_reply(self, values: torch.Tensor) -> torch.Tensor:
        """(2 · num_pairs,) the sum of a per-token value over each reply, chosen replies first."""
        return values.new_zeros(2 * self.num_pairs).index_add(0, self.slots, values)

    def lengths(self) -> torch.Tensor:
        return torch.bincount(self.slots, minlength=2 * self.num_pairs)

    def reply_logps(self, ld_alpha: float | None = None) -> ReplyLogps:
        """Per-pair sums and lengths of the chosen and rejected replies.

        With `ld_alpha` (LD-DPO, Liu et al., 2024), tokens past the shorter reply's length weigh α:
        log π(y) = Σ_{t ≤ min(|y_w|, |y_l|)} log π(y_t) + α · Σ_{t > min} log π(y_t), as TRL computes it."""
        lengths = self.lengths()
        logps = self.logps
        if ld_alpha is not None:
            shared = torch.minimum(*lengths.chunk(2)).repeat(2)  # per reply: the pair's shorter length
            tail = self.index_in_reply() >= shared[self.slots]
            logps = torch.where(tail, ld_alpha * logps, logps)
        return ReplyLogps(*self.per_reply(logps).chunk(2), *lengths.chunk(2))

    def index_in_reply(self) -> torch.Tensor:
        """(N,) each token's position within its reply, 0 for the first."""
        slots = self.slots
        order = torch.argsort(slots, stable=True)
        lengths = self.lengths()
        starts = lengths.cumsum(0) - lengths
        index = torch.empty_like(slots)
        index[order] = torch.arange(slots.numel(), device=slots.device) - starts[slots[order]]
        return index

    def wpo_weights(self) -> torch.Tensor:
        """WPO's per-pair weight (Zhou et al., 2024, eq. 2): w(y_w) · w(y_l), where w(y) is the exponential of the
        reply's mean over tokens of log π(y_t) − log Σ_v π(v)², without gradient (as TRL computes it)."""
        if self.log_sum_sq is None:
            raise ValueError("WPO weights need the tokens' log_sum_sq: score the batch with with_log_sum_sq=True")
        aligned = self.per_reply((self.logps - self.log_sum_sq).detach())
        chosen, rejected = (aligned / self.lengths().clamp(min=1)).exp().chunk(2)
        return chosen * rejected

    def chosen_nll(self) -> torch.Tensor:
        """Mean negative log-likelihood of the chosen reply tokens (RPO's extra term)."""
        chosen = self.logps[~self.rejected]
        return -chosen.sum() / max(chosen.numel(), 1)


def score_batch(model: Any, inputs: dict[str, Any], with_log_sum_sq: bool = False) -> ScoredTokens:
    """Log-probs of all reply tokens of a batch in either layout (the model has `add_logprob_head`)."""
    mode = "with_log_sum_sq" if with_log_sum_sq else True
    if "score_targets" in inputs:  # shared prefix, packed
        positions, targets = inputs["score_positions"], inputs["score_targets"]
        unique = inputs.get("score_unique")  # a token several pairs share is scored once, then copied to each
        if unique is not None:
            positions, targets = positions[unique], targets[unique]
        layout = {"attention_layout": inputs["attention_layout"]} if "attention_layout" in inputs else {}
        out = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
            position_ids=inputs["position_ids"], score_positions=positions, score_targets=targets, token_logps=mode,
            **layout,
        )  # fmt: skip
        logps, log_sum_sq = out if with_log_sum_sq else (out, None)
        if unique is not None:
            inverse = inputs["score_inverse"]
            logps, log_sum_sq = logps[inverse], None if log_sum_sq is None else log_sum_sq[inverse]
        num_pairs = inputs["pair_lengths"].numel()
        return ScoredTokens(logps, inputs["score_pairs"], inputs["score_rejected"], num_pairs, log_sum_sq)
    # TRL's layout: rows [chosen; rejected], prompt repeated, right-padded
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX)
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels, token_logps=mode)
    scored = labels[:, 1:] != IGNORE_INDEX
    logps, log_sum_sq = out if with_log_sum_sq else (out[scored], None)
    rows = scored.nonzero()[:, 0]
    num_pairs = inputs["input_ids"].size(0) // 2
    return ScoredTokens(logps, rows % num_pairs, rows >= num_pairs, num_pairs, log_sum_sq)


def takes_attention_layout(model: torch.nn.Module) -> bool:
    """Whether the model (under any PEFT wrapper) is given padding-free shared-prefix batches: tokens without
    padding and the rows its attention runs in (`attention_layout`): our GPT-2, whose forward takes them, and a
    transformers model that `use_padding_free_attention` put on our kernel after its probe."""
    from ..modeling.hf_attention import ATTN_IMPLEMENTATION

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "attention_layout" in inspect.signature(base.forward).parameters:
        return True
    on_our_kernel = getattr(getattr(base, "config", None), "_attn_implementation", None) == ATTN_IMPLEMENTATION
    return on_our_kernel and getattr(base, PROBED_PADDING_FREE, False)


def trl_layout(pairs: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Tokenised pairs in TRL's layout: [prompt + chosen rows; prompt + rejected rows], right-padded."""
    rows = [p["prompt_ids"] + p["chosen_ids"] for p in pairs] + [p["prompt_ids"] + p["rejected_ids"] for p in pairs]
    replies = [len(p["chosen_ids"]) for p in pairs] + [len(p["rejected_ids"]) for p in pairs]
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros_like(input_ids)
    for i, (row, reply) in enumerate(zip(rows, replies)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        completion_mask[i, len(row) - reply : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def config_problem(config: Any, max_length: int | None) -> str | None:
    """What in a model's config says the shared-prefix layout would not be exact, if anything."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(config, "model_type", "")
    if model_type in RECURRENT_MODEL_TYPES:
        return f"{model_type!r} is a recurrent model, whose state would run from one reply into the other"
    for name in ("layer_types", "layers_block_type", "block_types", "hybrid_override_pattern"):
        kinds = getattr(config, name, None)
        if isinstance(kinds, str):  # Nemotron-H's pattern: M = Mamba, * = attention, - = MLP, E = MoE
            kinds = ["mamba" if c == "M" else "attention" for c in kinds if c in "M*"]
        others = sorted({k for k in kinds or () if k not in ATTENTION_LAYER_TYPES and k not in ("mlp", "moe")})
        if others and others != ["sliding_attention"]:
            return f"its layers include {', '.join(map(repr, others))}, which do not follow a 4D attention mask"
    window = getattr(config, "sliding_window", None)
    sliding = isinstance(window, int) and getattr(config, "use_sliding_window", True) is not False
    if sliding and (max_length is None or window < max_length):
        return f"it attends through a sliding window of {window} tokens, which a 4D attention mask bypasses"
    return None


def probe_pairs(model: torch.nn.Module) -> list[dict[str, list[int]]]:
    """Two small random pairs of `PROBE_PAIRS` lengths: packed, the second's row is padded to the first's."""
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    return [
        {name: torch.randint(0, min(vocab, 1000), (n,), generator=generator).tolist()
         for name, n in zip(("prompt_ids", "chosen_ids", "rejected_ids"), lengths)}
        for lengths in PROBE_PAIRS
    ]  # fmt: skip


@torch.no_grad()
def probe_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> ReplyLogps:
    """The reply log-probs of a probe batch, in eval mode (dropout would make two passes differ for no reason)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        return score_batch(model, {k: v.to(device) for k, v in batch.items()}).reply_logps()
    finally:
        model.train(was_training)


def probe_difference(model: torch.nn.Module, a: ReplyLogps, b: ReplyLogps) -> float | None:
    """The largest difference of two probes' log-probs if it is beyond the model dtype's tolerance, else None."""
    difference = max((a.chosen - b.chosen).abs().max().item(), (a.rejected - b.rejected).abs().max().item())
    dtype = next(model.parameters()).dtype
    return difference if difference > PROBE_TOLERANCE.get(dtype, 5e-2) else None


def probe_problem(model: torch.nn.Module) -> str | None:
    """Score two small random pairs in both layouts; a difference means the model leaks across the replies."""
    pairs = probe_pairs(model)
    shared = probe_logps(model, SharedPrefixPreferenceCollator(pad_token_id=0)(pairs))
    plain = probe_logps(model, trl_layout(pairs, pad_token_id=0))
    difference = probe_difference(model, shared, plain)
    if difference is not None:
        return f"a probe pair's reply log-probs differ by {difference:.2g} between the shared-prefix and TRL layouts"
    return None


def use_padding_free_attention(model: torch.nn.Module) -> str | None:
    """Make the model take padding-free shared-prefix batches (`attention_layout`) if it can, exactly; returns why
    not, or None.

    Our GPT-2 takes them as they are. A transformers model on sdpa (or already on our kernel) is put on our kernel,
    `attn_implementation="alignment"` (PyTorch's SDPA underneath, as transformers' "sdpa" calls it), and kept there
    only if a probe pair's log-probs padding-free equal those of the padded rows under its own implementation (its
    layers must pass their keyword arguments down to the attention function); otherwise it is put back. Not with
    weights this process does not hold (ZeRO-3, meta tensors), which the probe needs."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    from ..modeling.hf_attention import ATTN_IMPLEMENTATION

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if takes_attention_layout(base):
        return None
    implementation = getattr(base.config, "_attn_implementation", None)
    if implementation not in ("sdpa", ATTN_IMPLEMENTATION):
        return f"attn_implementation={implementation!r} is not ours or sdpa"
    if is_deepspeed_zero3_enabled() or any(p.is_meta or hasattr(p, "ds_id") for p in base.parameters()):
        return "its weights are partitioned here, and the probe needs them"
    pairs = probe_pairs(base)
    padded = probe_logps(base, SharedPrefixPreferenceCollator(pad_token_id=0)(pairs))
    try:
        base.set_attn_implementation(ATTN_IMPLEMENTATION)
        free = probe_logps(base, SharedPrefixPreferenceCollator(pad_token_id=0, padding_free=True)(pairs))
        difference = probe_difference(base, free, padded)
        problem = None if difference is None else f"a probe pair's log-probs differ by {difference:.2g} without padding"
    except (ValueError, RuntimeError, TypeError) as error:  # a layer that drops the layout: the mask's shape fails
        problem = f"our kernel cannot run it without padding ({error})".splitlines()[0]
    if problem is not None:
        base.set_attn_implementation(implementation)
    setattr(base, PROBED_PADDING_FREE, problem is None)
    return problem


def prefix_sharing_problem(model: torch.nn.Module, max_length: int | None) -> str | None:
    """Why the shared-prefix layout would give this model other log-probs than TRL's layout; None when exact.

    The probe needs the model's weights in place: under DeepSpeed ZeRO-3 they are partitioned, and only the config
    is read."""
    problem = config_problem(model.config, max_length)
    if problem is not None:
        return problem
    from transformers.integrations import is_deepspeed_zero3_enabled

    return None if is_deepspeed_zero3_enabled() else probe_problem(model)

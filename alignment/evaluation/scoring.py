"""Scoring held-out preference pairs: does the policy prefer the chosen replies, against a reference?

`preference_scores` gives the implicit-reward accuracy against a reference (DPO's own measure: β·log π/π_ref higher
for the chosen reply), the mean margin, the mean log-probs, the DPO loss, and the reference-free accuracy (the chosen
reply has the higher per-token-averaged log-prob under the policy alone).

The log-probs come the way the DPO trainer computes them: each pair is one packed sequence [prompt, chosen,
rejected] (`SharedPrefixPreferenceCollator`, the prompt computed once, pairs packed into short rows, and for a
model that takes them, such as our GPT-2, no padding through the model at all) and
only the reply tokens go through the LM head (`layouts.score_batch`). Evaluation adds what a fixed set of pairs
allows (`shared_prefix_logps`): the pairs are tokenised once, in batched tokenizer calls; batches are cut from the
pairs sorted by length (a prompt's pairs kept together, so the collator computes a prompt they share once), so rows
hold almost no padding and the scores are put back in the data's order; policy and reference run on each collated
batch in turn, without autograd; and the head computes log p(target) alone, without the entropy and
top-1 statistics the training head adds for SFT's metrics (`_ReplyHead`). On 40 HH-RLHF pairs a SmolLM2-135M-shaped
Llama computes 3.3x fewer positions than with one padded row a reply (4.4x on 400 pairs) and scores them about 3x
faster on CPU; against the packed path in the data's order, 7% fewer positions and a head a quarter cheaper
(`benchmarks/evaluation_speed.py`).

`prefix_sharing=False` gives one right-padded row per reply instead (`reply_logps`, rows sorted by length), as
does, with one warning line, a model for which the packed layout would not be exact
(`layouts.prefix_sharing_problem`: recurrent or convolutional layers, a sliding window shorter than the pairs, a
model ignoring 4D attention masks). Both layouts give the same numbers (sums taken in float64).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from trl.data_utils import apply_chat_template

from ..modeling.chat_templates import HH_TEMPLATE, is_conversation
from ..training.layouts import ScoredTokens, prefix_sharing_problem, score_batch, takes_attention_layout
from ..training.logprobs import (
    CHUNK_ROWS,
    IGNORE_INDEX,
    HeadTransform,
    _compute_dtype,
    _logits,
    _transformed,
    add_logprob_head,
)
from ..training.losses import ReplyLogps, preference_loss
from ..training.shared_prefix import SharedPrefixPreferenceCollator

logger = logging.getLogger(__name__)
REPLY_FIELDS = ("chosen", "rejected", "chosen_length", "rejected_length")
Entry = tuple[list[int], list[int], list[int]]  # (prompt, chosen, rejected) token ids
MIN_FILL = 0.95  # the least share of a packed batch's positions its pairs fill (the rest is padding)


@torch.no_grad()
def reply_logps(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    replies: Sequence[str],
    batch_size: int = 32,
    progress: Callable[[int], object] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each reply given its prompt (float64 sums of the model's float32 log-probs), and the reply
    lengths in tokens (EOS included), one right-padded row a reply, `batch_size` rows a batch in the given order.

    `progress`, if given, is called with the number of rows after each batch (e.g. a tqdm bar's `update`).
    """
    add_logprob_head(model)
    model.eval()
    device = next(model.parameters()).device
    sums, lengths = [], []
    for start in range(0, len(prompts), batch_size):
        batch_prompts, batch_replies = prompts[start : start + batch_size], replies[start : start + batch_size]
        rows = [_prompt_reply_ids(tokenizer, p, r) for p, r in zip(batch_prompts, batch_replies)]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for i, (ids, n_prompt) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention_mask[i, : len(ids)] = 1
            labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
        token_logps = model(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            labels=labels.to(device),
            token_logps=True,
        )
        sums.append(token_logps.float().cpu().double().sum(-1))  # float64 sums: the order of the terms never shows
        lengths.append((labels[:, 1:] != IGNORE_INDEX).sum(-1))
        if progress is not None:
            progress(len(rows))
    return torch.cat(sums), torch.cat(lengths)


def _prompt_reply_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, reply: str) -> tuple[list[int], int]:
    """Token ids of prompt + reply + EOS, and where the reply starts (as TRL tokenises preference pairs)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt + reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return full, _common_prefix(prompt_ids, full)


def _common_prefix(prompt_ids: list[int], full: list[int]) -> int:
    shared = 0
    while shared < min(len(prompt_ids), len(full)) and prompt_ids[shared] == full[shared]:
        shared += 1
    return shared


def _replies_tokenized(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[dict[str, str]]
) -> list[tuple[tuple[list[int], int], tuple[list[int], int]]]:
    """`_prompt_reply_ids` of each pair's chosen and rejected reply, from three tokenizer calls on lists (a fast
    tokenizer encodes a list in one call into Rust, giving each text the ids it gives it alone)."""

    def ids(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    prompts = ids([row["prompt"] for row in pairs])
    eos = [tokenizer.eos_token_id]
    replies = [
        [full + eos for full in ids([row["prompt"] + row[key] for row in pairs])] for key in ("chosen", "rejected")
    ]
    return [
        ((chosen, _common_prefix(prompt, chosen)), (rejected, _common_prefix(prompt, rejected)))
        for prompt, chosen, rejected in zip(prompts, *replies)
    ]


def _entries(chosen: list[int], n_chosen: int, rejected: list[int], n_rejected: int) -> list[Entry]:
    if chosen[:n_chosen] == rejected[:n_rejected]:
        return [(chosen[:n_chosen], chosen[n_chosen:], rejected[n_rejected:])]
    return [(chosen[:n_chosen], chosen[n_chosen:], []), (rejected[:n_rejected], [], rejected[n_rejected:])]


def pair_entries(tokenizer: PreTrainedTokenizerBase, row: dict[str, str]) -> list[Entry]:
    """A pair as (prompt, chosen, rejected) token ids for `SharedPrefixPreferenceCollator`, tokenised as
    `reply_logps` tokenises each reply (prompt + reply + EOS together, the reply after the common prefix).

    Usually one entry. When a merge across the prompt's end makes the two replies' prompt tokens differ, each reply
    gets its own entry, (prompt, chosen, []) and (prompt, [], rejected), so that its log-prob stays the same.
    """
    return all_pair_entries(tokenizer, [row])[0]


def all_pair_entries(tokenizer: PreTrainedTokenizerBase, pairs: Sequence[dict[str, str]]) -> list[list[Entry]]:
    """`pair_entries` of every pair, tokenised in batched calls."""
    return [_entries(*chosen, *rejected) for chosen, rejected in _replies_tokenized(tokenizer, pairs)]


def pair_batches(entries: Sequence[Sequence[Entry]], batch_size: int) -> list[list[int]]:
    """The pairs' indices in batches of at most `batch_size`, longest first, so that a batch's rows hold little
    padding and its attention spans little more than each pair: a batch ends early where the next pairs would bring
    its tokens below `MIN_FILL` of its rows (a long tail of long pairs would pad the rest). A prompt's pairs (longest
    first) share a batch when they fit one, so that it computes their prompt once."""
    length = [max(len(p) + len(c) + len(r) for p, c, r in pair) for pair in entries]
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, pair in enumerate(entries):
        by_prompt.setdefault(tuple(pair[0][0]), []).append(i)
    groups = sorted((sorted(g, key=lambda i: -length[i]) for g in by_prompt.values()), key=lambda g: -length[g[0]])
    batches: list[list[int]] = []
    for group in groups:
        if batches and len(batches[-1]) + len(group) <= batch_size:
            batch = batches[-1]
            tokens = sum(length[i] for i in batch + group)
            if tokens >= MIN_FILL * (len(batch) + len(group)) * length[batch[0]]:
                batch.extend(group)
                continue
        batches.extend(group[start : start + batch_size] for start in range(0, len(group), batch_size))
    return batches


def packed_batches(
    entries: Sequence[Sequence[Entry]], batch_size: int, pad_token_id: int, padding_free: bool = False
) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """The collated shared-prefix batches of `pair_batches`, each with, for every entry it holds, the index of its
    pair (`padding_free`: the tokens without padding, for models that take `attention_layout`)."""
    collator = SharedPrefixPreferenceCollator(pad_token_id, padding_free=padding_free)
    for batch in pair_batches(entries, batch_size):
        owners = [i for i in batch for _ in entries[i]]
        rows = [
            {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}
            for i in batch
            for prompt, chosen, rejected in entries[i]
        ]
        yield collator(rows), torch.tensor(owners)


class _ReplyHead:
    """A model called as `score_batch` calls one with `add_logprob_head` in the packed layout, whose head computes
    log p(target) = z[target] − logsumexp(z) alone, in the training head's chunks and steps (so the same numbers):
    the training head also takes each scored token's softmax, entropy and top-1 hit (SFT's metrics), which on a
    50k-word vocabulary makes it a third slower (1,600 tokens x GPT-2's head on CPU: 4.1 s against 3.0 s)."""

    def __init__(self, model: PreTrainedModel):
        self.model = model.eval()
        self.transform = HeadTransform.of(model.config)
        self.device = next(model.parameters()).device

    def __call__(self, *, score_positions, score_targets, token_logps=True, **inputs) -> torch.Tensor:
        if token_logps is not True:
            raise ValueError(f"evaluation scores log-probs only, not token_logps={token_logps!r}")
        hidden = self.model.base_model(**inputs, use_cache=False).last_hidden_state
        sources = hidden[score_positions[:, 0], score_positions[:, 1]]
        head = self.model.get_output_embeddings()
        weight, bias = head.weight, getattr(head, "bias", None)
        out = torch.empty(sources.size(0), dtype=_compute_dtype(sources), device=sources.device)
        for start in range(0, sources.size(0), CHUNK_ROWS):
            rows = slice(start, start + CHUNK_ROWS)
            logits = _transformed(_logits(sources[rows], weight, bias), self.transform)
            picked = logits.gather(1, score_targets[rows, None]).squeeze(1)
            out[rows] = picked - _logsumexp_(logits)
        return out


def _logsumexp_(logits: torch.Tensor) -> torch.Tensor:
    """`logits.logsumexp(dim=1)` in torch's own steps, overwriting `logits` rather than allocating a copy of it
    (a chunk of the head's rows, up to 200 MB: on CPU allocating and first touching it costs about a tenth of the
    head's time)."""
    top = logits.amax(dim=1, keepdim=True)
    top.masked_fill_(top.abs() == float("inf"), 0)  # as torch does: a row of -inf keeps -inf, not NaN
    return logits.sub_(top).exp_().sum(dim=1).log_().add_(top.squeeze(1))


def shared_prefix_logps(
    models: Sequence[PreTrainedModel],
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[dict[str, str]],
    batch_size: int = 32,
    progress: Callable[[int], object] | None = None,
    *,
    entries: Sequence[Sequence[Entry]] | None = None,
) -> list[ReplyLogps]:
    """Summed reply log-probs and reply lengths (EOS included) of each pair under each model, in the pairs' order,
    as the DPO trainer's shared-prefix batches compute them: `batch_size` pairs a batch (`packed_batches`), collated
    once and run through every model, without autograd.

    `entries`, the pairs' `all_pair_entries`, saves tokenising them again. `progress`, if given, is called after each
    batch with the number of sequences scored (two a pair and model).
    """
    if entries is None:
        entries = all_pair_entries(tokenizer, pairs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # padding is masked: any id does
    heads = [_ReplyHead(model) for model in models]
    totals = [
        ReplyLogps(*(torch.zeros(len(pairs), dtype=dtype) for dtype in (torch.float64,) * 2 + (torch.long,) * 2))
        for _ in models
    ]
    with torch.no_grad():  # not inference_mode: a model may keep a tensor made here (a RoPE update) for training
        padding_free = all(takes_attention_layout(model) for model in models)
        for batch, owners in packed_batches(entries, batch_size, pad, padding_free):
            on_device: dict[torch.device, dict[str, torch.Tensor]] = {}  # moved once for models on one device
            for head, total in zip(heads, totals):
                if head.device not in on_device:
                    on_device[head.device] = {key: value.to(head.device) for key, value in batch.items()}
                scored = score_batch(head, on_device[head.device])
                by_entry = ScoredTokens(
                    scored.logps.float().cpu().double(), scored.pairs.cpu(), scored.rejected.cpu(), scored.num_pairs
                ).reply_logps()  # summed in float64, as `reply_logps` sums; an entry is a pair or one of its replies
                for name in REPLY_FIELDS:
                    getattr(total, name).index_add_(0, owners, getattr(by_entry, name))
            if progress is not None:
                progress(2 * len(models) * len(set(owners.tolist())))
    return totals


def shared_prefix_problem(
    models: Sequence[PreTrainedModel],
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[dict[str, str]],
    *,
    entries: Sequence[Sequence[Entry]] | None = None,
) -> str | None:
    """Why packing these pairs would not give some model the log-probs of separate rows (the trainer's rule,
    `prefix_sharing_problem`, with the longest sequence of the pairs); None when it is exact for every model."""
    if entries is None:
        entries = all_pair_entries(tokenizer, pairs)
    longest = max(
        len(prompt) + max(len(chosen), len(rejected)) for pair in entries for prompt, chosen, rejected in pair
    )
    for model in models:
        add_logprob_head(model)  # the probe scores through the log-prob head
        problem = prefix_sharing_problem(model, longest)
        if problem is not None:
            return problem
    return None


def text_pairs(pairs: Sequence[dict[str, Any]], tokenizer: PreTrainedTokenizerBase) -> list[dict[str, str]]:
    """The pairs as text: conversational ones rendered as TRL's DPO trainer renders them (the prompt with the
    generation prompt, each reply the rest of its conversation; the `hh` template for a tokenizer without one), less
    a final EOS the template writes, since scoring appends EOS to every reply as TRL does to text pairs."""
    rendered = []
    for row in pairs:
        if is_conversation(row["chosen"]) or is_conversation(row["prompt"]):
            template = {} if tokenizer.chat_template else {"chat_template": HH_TEMPLATE}
            pair = {key: row[key] for key in ("prompt", "chosen", "rejected")}
            row = apply_chat_template(pair, tokenizer, **template)
            if tokenizer.eos_token:
                row = {
                    key: text.removesuffix(tokenizer.eos_token) if key != "prompt" else text
                    for key, text in row.items()
                }
        rendered.append(row)
    return rendered


def fit_pairs(
    pairs: Sequence[dict[str, str]], tokenizer: PreTrainedTokenizerBase, max_length: int | None
) -> tuple[list[dict[str, str]], int]:
    """The pairs whose prompt + chosen and prompt + rejected (EOS included) both fit in `max_length` tokens, and
    how many were dropped: scoring never truncates, so a number always means the whole reply."""
    if max_length is None:
        return list(pairs), 0
    kept = [
        row
        for row, ((chosen, _), (rejected, _)) in zip(pairs, _replies_tokenized(tokenizer, pairs))
        if max(len(chosen), len(rejected)) <= max_length
    ]
    return kept, len(pairs) - len(kept)


@dataclass
class PreferenceScores:
    pairs: int
    accuracy: float  # implicit reward of the chosen reply above the rejected one's (needs a reference)
    margin: float  # mean of β·(chosen log-ratio − rejected log-ratio)
    loss: float  # DPO (sigmoid) loss
    reference_free_accuracy: float  # chosen reply more likely per token under the policy alone
    logps_chosen: float
    logps_rejected: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def scores_from_logps(policy: ReplyLogps, reference: ReplyLogps | None, beta: float) -> PreferenceScores:
    """The scores of pairs from their reply log-probs; without a reference the policy is its own (margins 0)."""
    reference = policy if reference is None else reference
    result = preference_loss(policy, reference, beta=beta)
    chosen_avg, rejected_avg = policy.average()
    return PreferenceScores(
        pairs=policy.chosen.numel(),
        accuracy=result.accuracy.mean().item(),
        margin=result.margin.mean().item(),
        loss=result.loss.item(),
        reference_free_accuracy=(chosen_avg > rejected_avg).float().mean().item(),
        logps_chosen=policy.chosen.mean().item(),
        logps_rejected=policy.rejected.mean().item(),
    )


def preference_scores(
    policy: PreTrainedModel,
    reference: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[dict[str, str]],
    beta: float = 0.1,
    batch_size: int = 32,
    *,
    max_samples: int | None = None,
    progress: bool = False,
    prefix_sharing: bool = True,
) -> PreferenceScores:
    """Score held-out pairs; without a reference, the reward-based figures compare the policy with itself (0).

    `batch_size` counts pairs (with `prefix_sharing`) or rows of one reply each (without). `max_samples` scores the
    first pairs only; `progress` shows a tqdm bar (on stderr) over every scored sequence. `prefix_sharing=False`
    scores each reply in its own padded row, as happens anyway, with a warning, for a model that the packed layout
    would give other log-probs (see the module docstring).
    """
    if max_samples is not None:
        pairs = pairs[:max_samples]
    if not pairs:
        raise ValueError("no preference pairs to score")
    models = [policy] if reference is None or reference is policy else [policy, reference]
    bar = tqdm(total=2 * len(models) * len(pairs), desc="scoring pairs", unit="seq", disable=not progress, leave=False)
    entries = None
    if prefix_sharing:
        entries = all_pair_entries(tokenizer, pairs)  # tokenised once, for the check and the batches
        problem = shared_prefix_problem(models, tokenizer, pairs, entries=entries)
        if problem is not None:
            logger.warning("prefix sharing is off for this model: %s; each reply gets its own padded row", problem)
            prefix_sharing = False
    with bar:
        if prefix_sharing:
            scored = shared_prefix_logps(models, tokenizer, pairs, batch_size, progress=bar.update, entries=entries)
        else:
            scored = [_padded_logps(model, tokenizer, pairs, batch_size, bar.update) for model in models]
    return scores_from_logps(scored[0], scored[-1] if reference is not None else None, beta)


def _padded_logps(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[dict[str, str]],
    batch_size: int,
    progress: Callable[[int], object],
) -> ReplyLogps:
    """The pairs' reply log-probs under one model, each reply in its own right-padded row (`reply_logps`), the rows
    sorted by length so that a batch pads little, the results in the pairs' order."""
    tokenized = _replies_tokenized(tokenizer, pairs)
    prompts = [row["prompt"] for row in pairs]
    sums, lengths = [], []
    for index, key in enumerate(("chosen", "rejected")):
        order = sorted(range(len(pairs)), key=lambda i: -len(tokenized[i][index][0]))
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[order] = torch.arange(len(order))
        logps, length = reply_logps(
            model, tokenizer, [prompts[i] for i in order], [pairs[i][key] for i in order], batch_size, progress
        )
        sums.append(logps[inverse])
        lengths.append(length[inverse])
    return ReplyLogps(sums[0], sums[1], lengths[0], lengths[1])

"""Scoring held-out preference pairs: does the policy prefer the chosen replies, against a reference?

`preference_scores` gives the implicit-reward accuracy against a reference (DPO's own measure: β·log π/π_ref higher
for the chosen reply), the mean margin, the mean log-probs, the DPO loss, and the reference-free accuracy (the chosen
reply has the higher per-token-averaged log-prob under the policy alone).

The log-probs come the way the DPO trainer computes them: each pair is one packed sequence [prompt, chosen,
rejected] (`SharedPrefixPreferenceCollator`, the prompt computed once, pairs packed into rows without padding) and
the model's log-prob head scores only the reply tokens (`layouts.score_batch`); policy and reference run on each
batch in turn, one pass over the data. `prefix_sharing=False` gives one right-padded row per reply instead
(`reply_logps`), as does a model for which the packed layout would not be exact (`layouts.prefix_sharing_problem`:
recurrent or convolutional layers, a sliding window shorter than the pairs, a model ignoring 4D attention masks).
Both layouts give the same numbers (sums taken in float64).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from trl.data_utils import apply_chat_template

from ..modeling.chat_templates import HH_TEMPLATE, is_conversation
from ..training.layouts import ScoredTokens, prefix_sharing_problem, score_batch
from ..training.logprobs import IGNORE_INDEX, add_logprob_head
from ..training.losses import ReplyLogps, preference_loss
from ..training.shared_prefix import SharedPrefixPreferenceCollator

logger = logging.getLogger(__name__)
REPLY_FIELDS = ("chosen", "rejected", "chosen_length", "rejected_length")


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
    lengths in tokens (EOS included), one right-padded row a reply.

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
    shared = 0
    while shared < min(len(prompt_ids), len(full)) and prompt_ids[shared] == full[shared]:
        shared += 1
    return full, shared


def pair_entries(
    tokenizer: PreTrainedTokenizerBase, row: dict[str, str]
) -> list[tuple[list[int], list[int], list[int]]]:
    """A pair as (prompt, chosen, rejected) token ids for `SharedPrefixPreferenceCollator`, tokenised as
    `reply_logps` tokenises each reply (prompt + reply + EOS together, the reply after the common prefix).

    Usually one entry. When a merge across the prompt's end makes the two replies' prompt tokens differ, each reply
    gets its own entry, (prompt, chosen, []) and (prompt, [], rejected), so that its log-prob stays the same.
    """
    chosen, n_chosen = _prompt_reply_ids(tokenizer, row["prompt"], row["chosen"])
    rejected, n_rejected = _prompt_reply_ids(tokenizer, row["prompt"], row["rejected"])
    if chosen[:n_chosen] == rejected[:n_rejected]:
        return [(chosen[:n_chosen], chosen[n_chosen:], rejected[n_rejected:])]
    return [(chosen[:n_chosen], chosen[n_chosen:], []), (rejected[:n_rejected], [], rejected[n_rejected:])]


@torch.no_grad()
def shared_prefix_logps(
    models: Sequence[PreTrainedModel],
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[dict[str, str]],
    batch_size: int = 32,
    progress: Callable[[int], object] | None = None,
) -> list[ReplyLogps]:
    """Summed reply log-probs and reply lengths (EOS included) of each pair under each model, as the DPO trainer's
    shared-prefix batches compute them: `batch_size` pairs a batch, collated once and run through every model.

    `progress`, if given, is called after each batch with the number of sequences scored (two a pair and model).
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # padding is masked: any id does
    collator = SharedPrefixPreferenceCollator(pad)
    for model in models:
        add_logprob_head(model)
        model.eval()
    parts: list[list[ReplyLogps]] = [[] for _ in models]
    for start in range(0, len(pairs), batch_size):
        rows = pairs[start : start + batch_size]
        entries, owners = [], []
        for i, row in enumerate(rows):
            for prompt, chosen, rejected in pair_entries(tokenizer, row):
                entries.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
                owners.append(i)
        batch = collator(entries)
        owner = torch.tensor(owners)
        for model, part in zip(models, parts):
            device = next(model.parameters()).device
            scored = score_batch(model, {key: value.to(device) for key, value in batch.items()})
            scored = ScoredTokens(
                scored.logps.float().cpu().double(), scored.pairs.cpu(), scored.rejected.cpu(), scored.num_pairs
            )  # summed in float64, as `reply_logps` sums
            by_entry = scored.reply_logps()  # an entry is a pair, or one reply of a pair whose prompts differ
            part.append(ReplyLogps(*(
                values.new_zeros(len(rows)).index_add(0, owner, values)
                for values in (getattr(by_entry, name) for name in REPLY_FIELDS)
            )))  # fmt: skip
        if progress is not None:
            progress(2 * len(models) * len(rows))
    return [ReplyLogps(*(torch.cat([getattr(p, name) for p in part]) for name in REPLY_FIELDS)) for part in parts]


def shared_prefix_problem(
    models: Sequence[PreTrainedModel], tokenizer: PreTrainedTokenizerBase, pairs: Sequence[dict[str, str]]
) -> str | None:
    """Why packing these pairs would not give some model the log-probs of separate rows (the trainer's rule,
    `prefix_sharing_problem`, with the longest sequence of the pairs); None when it is exact for every model."""
    longest = max(
        len(prompt) + max(len(chosen), len(rejected))
        for row in pairs
        for prompt, chosen, rejected in pair_entries(tokenizer, row)
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
        row for row in pairs
        if max(len(_prompt_reply_ids(tokenizer, row["prompt"], row[key])[0]) for key in ("chosen", "rejected"))
        <= max_length
    ]  # fmt: skip
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
    if prefix_sharing:
        problem = shared_prefix_problem(models, tokenizer, pairs)
        if problem is not None:
            logger.warning("prefix sharing is off for this model: %s; each reply gets its own padded row", problem)
            prefix_sharing = False
    with bar:
        if prefix_sharing:
            scored = shared_prefix_logps(models, tokenizer, pairs, batch_size, progress=bar.update)
        else:
            scored = [_padded_logps(model, tokenizer, pairs, batch_size, bar.update) for model in models]
    policy_logps = scored[0]
    reference_logps = scored[-1] if reference is not None else policy_logps
    result = preference_loss(policy_logps, reference_logps, beta=beta)
    chosen_avg, rejected_avg = policy_logps.average()
    return PreferenceScores(
        pairs=len(pairs),
        accuracy=result.accuracy.mean().item(),
        margin=result.margin.mean().item(),
        loss=result.loss.item(),
        reference_free_accuracy=(chosen_avg > rejected_avg).float().mean().item(),
        logps_chosen=policy_logps.chosen.mean().item(),
        logps_rejected=policy_logps.rejected.mean().item(),
    )


def _padded_logps(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[dict[str, str]],
    batch_size: int,
    progress: Callable[[int], object],
) -> ReplyLogps:
    """The pairs' reply log-probs under one model, each reply in its own right-padded row (`reply_logps`)."""
    prompts = [row["prompt"] for row in pairs]
    chosen, chosen_length = reply_logps(model, tokenizer, prompts, [r["chosen"] for r in pairs], batch_size, progress)
    rejected, rejected_length = reply_logps(
        model, tokenizer, prompts, [r["rejected"] for r in pairs], batch_size, progress
    )
    return ReplyLogps(chosen, rejected, chosen_length, rejected_length)

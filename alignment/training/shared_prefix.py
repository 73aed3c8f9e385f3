"""Preference batches in which each prompt is computed once and no padding is computed in between.

A stock DPO batch holds every pair twice, [prompt, chosen] and [prompt, rejected], each row padded to the longest:
on HH-RLHF, whose multi-turn prompts are most of the tokens, that is about twice the work. Here the pairs of a batch
that share a prompt (a pair alone, or the up to 6 pairs UltraFeedback-style data draws from a prompt's 4 completions)
are one sequence [prompt, u1, u2, …] over their distinct replies u_i (a reply in several pairs is computed once):

    positions  0 … P-1 | P … P+|u1|-1 | P … P+|u2|-1 | …     (every reply continues from the prompt's end)
    attention  causal, except that a reply never sees another reply

so every reply token sees exactly what it sees in its own [prompt, reply] row, and its log-prob is the same. Replies
are told apart by their tokens after TRL's truncation (`truncate_pair`), so a reply cut short is not the reply it was
cut from. The sequences are packed first-fit into rows as long as the longest of the batch (several to a row, each
its own block of the attention mask), so that attention runs over short rows.

Those rows still hold padding (on HH-RLHF batches of 8 pairs, a fifth of their slots), which every linear layer of a
model would compute. With `padding_free` the model is given the real tokens alone, as one row (1, N), and the
attention rows as `attention_layout` (rows, W): the token each of their slots holds (-1 for padding), for a model
that gathers its queries, keys and values into those rows and scatters the result back (our GPT-2,
`DocumentGroups.from_layout`): the same attention, and no padding through the rest of the model. A prompt's sequence holds at most
`GROUP_WIDTH` times the batch's longest [prompt, chosen, rejected]; further replies open another sequence with the
prompt again, so that many replies to one prompt never make one row (and its dense attention) unboundedly wide.

The log-prob of reply token k comes from the hidden state of the token before it in its own reply, and the first
token of each reply from the last prompt token: `score_positions` lists those (row, column) sources and
`score_targets` the tokens they predict, one entry per token of each pair's chosen and rejected reply (`score_pairs`,
`score_rejected`), in pair order. A token that several pairs share has one source, so the model's log-prob head runs
only on `score_unique` (the first entry of each) and `score_inverse` spreads the results back over all entries.

Batches only share prompts when same-prompt pairs are drawn together: `PromptGroupedSampler` (DPOConfig's
`group_pairs_by_prompt`) keeps a prompt's pairs next to each other in the shuffled order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

GROUP_WIDTH = 2  # a prompt's sequence: at most this many times the batch's longest [prompt, chosen, rejected]


def truncate_pair(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int | None):
    """TRL's `keep_start` truncation of [prompt + chosen] and [prompt + rejected], each to max_length tokens."""
    if max_length is None:
        return prompt, chosen, rejected
    room = max(0, max_length - len(prompt))
    return prompt[:max_length], chosen[:room], rejected[:room]


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group item indices into bins of at most `capacity` (longest first, each into the first bin it fits)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(room):
            if lengths[index] <= free:
                bins[b].append(index)
                room[b] -= lengths[index]
                break
        else:
            bins.append([index])
            room.append(capacity - lengths[index])
    return bins


@dataclass
class PromptSequence:
    """One sequence [prompt, u1, u2, …] of the packed rows: a prompt and replies that each see it and themselves."""

    prompt: list[int]
    replies: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompt) + sum(len(reply) for reply in self.replies)


def prompt_sequences(
    pairs: Sequence[tuple[list[int], list[int], list[int]]], merge: bool = True
) -> tuple[list[PromptSequence], list[tuple[tuple[int, int], tuple[int, int]]]]:
    """The sequences that hold the (truncated) pairs, and where each pair's chosen and rejected reply is in them
    ((sequence, reply) each).

    With `merge`, pairs with the same prompt tokens share a sequence and equal replies are held once; without it,
    each pair is its own [prompt, chosen, rejected] (the layout before prompts were merged, kept for comparison)."""
    if not merge:
        return [PromptSequence(p, [c, r]) for p, c, r in pairs], [((i, 0), (i, 1)) for i in range(len(pairs))]
    capacity = GROUP_WIDTH * max(len(p) + len(c) + len(r) for p, c, r in pairs)
    sequences: list[PromptSequence] = []
    open_for: dict[tuple[int, ...], list[int]] = {}  # prompt -> its sequences
    held: dict[tuple[tuple[int, ...], tuple[int, ...]], tuple[int, int]] = {}  # (prompt, reply) -> where
    where = []
    for prompt, chosen, rejected in pairs:
        key = tuple(prompt)
        slots = []
        for reply in (chosen, rejected):
            slot = held.get((key, tuple(reply)))
            if slot is None:
                own = open_for.setdefault(key, [])
                fits = [s for s in own if len(sequences[s]) + len(reply) <= capacity]
                if not fits:  # a reply always fits a new sequence: prompt + reply <= its pair <= capacity
                    sequences.append(PromptSequence(prompt))
                    own.append(len(sequences) - 1)
                    fits = own[-1:]
                sequences[fits[0]].replies.append(reply)
                slot = held[key, tuple(reply)] = (fits[0], len(sequences[fits[0]].replies) - 1)
            slots.append(slot)
        where.append((slots[0], slots[1]))
    return sequences, where


@dataclass
class SharedPrefixPreferenceCollator:
    """Collate TRL-tokenised pairs (`prompt_ids`, `chosen_ids`, `rejected_ids`) into shared-prefix packed rows.

    Returns `pair_lengths` (pairs,), each pair's tokens as its own [prompt, chosen, rejected] sequence;
    `input_ids`, `position_ids` and a boolean `attention_mask` (rows, 1, L, L) for the model; for the loss,
    `score_positions` (N, 2), `score_targets` (N,), `score_pairs` (N,) and `score_rejected` (N,), one entry per
    reply token of each pair, and, with `merge_prompts`, `score_unique` (U,) and `score_inverse` (N,): the entries
    whose log-probs are computed and, for every entry, which of those it is; and `num_tokens` (1,), what the
    unshared rows would hold, for TRL's token count. Precomputed `ref_chosen_logps` / `ref_rejected_logps` pass
    through.

    `merge_prompts=False` gives each pair its own sequence even when prompts repeat (the earlier layout, for
    comparison; the log-probs are the same). `padding_free=True` gives `input_ids` and `position_ids` as one row of
    the real tokens (1, N), `attention_layout` (rows, L) where each slot of the attention rows takes its token from
    (-1: padding, which sees only itself), and `score_positions` into that one row; `attention_mask` stays the
    attention rows' mask.

    No tensor is 0-d, and `pair_lengths` comes first, so `transformers`' `find_batch_size` (the weight of a batch in
    the evaluation loss) counts pairs, as it does in TRL's layout. The rows cannot be split between processes the
    way accelerate's batch dispatcher splits a batch (the trainer turns dispatching off).
    """

    pad_token_id: int
    max_length: int | None = None
    merge_prompts: bool = True
    padding_free: bool = False

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pairs = [truncate_pair(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"], self.max_length) for e in examples]
        sequences, where = prompt_sequences(pairs, self.merge_prompts)
        lengths = [len(sequence) for sequence in sequences]
        rows = first_fit(lengths, max(lengths))
        width = max(sum(lengths[i] for i in row) for row in rows)

        # per column: its token, position, sequence (padding: an id of its own) and segment (0: the prompt, i + 1:
        # reply i); a query sees a key of its own sequence, at or before it, in its own segment or the prompt
        token_ids = [[self.pad_token_id] * width for _ in rows]
        positions = [[0] * width for _ in rows]
        sequence_of = [list(range(len(sequences), len(sequences) + width)) for _ in rows]
        segments = [[0] * width for _ in rows]
        reply_tokens: dict[tuple[int, int], list[int]] = {}  # (sequence, reply) -> its tokens' scored sources
        sources, targets = [], []
        for r, row in enumerate(rows):
            offset = 0
            for s in row:
                sequence = sequences[s]
                n_prompt, n = len(sequence.prompt), lengths[s]
                token_ids[r][offset : offset + n] = sequence.prompt + sum(sequence.replies, [])
                positions[r][offset : offset + n] = list(range(n_prompt)) + [
                    n_prompt + k for reply in sequence.replies for k in range(len(reply))
                ]
                sequence_of[r][offset : offset + n] = [s] * n
                segments[r][offset : offset + n] = [0] * n_prompt + [
                    i + 1 for i, reply in enumerate(sequence.replies) for _ in reply
                ]
                reply_start = offset + n_prompt
                for i, reply in enumerate(sequence.replies):
                    reply_tokens[s, i] = []
                    for k, token in enumerate(reply):
                        source = reply_start + k - 1 if k > 0 else offset + n_prompt - 1
                        if source < offset:  # no prompt: the first token has no context, as in an unshared row
                            continue
                        reply_tokens[s, i].append(len(sources))
                        sources.append((r, source))
                        targets.append(token)
                    reply_start += len(reply)
                offset += n
        sequence_of, segments = torch.tensor(sequence_of), torch.tensor(segments)
        visible = (
            (sequence_of[:, :, None] == sequence_of[:, None, :])
            & ((segments[:, :, None] == segments[:, None, :]) | (segments[:, None, :] == 0))
            & torch.ones(width, width, dtype=torch.bool).tril()
        )

        inverse, pair_of, is_rejected = [], [], []
        for pair_index, slots in enumerate(where):
            for slot, flag in zip(slots, (False, True)):
                tokens = reply_tokens[slot]
                inverse += tokens
                pair_of += [pair_index] * len(tokens)
                is_rejected += [flag] * len(tokens)
        inverse = torch.tensor(inverse, dtype=torch.long)
        unique = torch.full((len(sources),), len(inverse), dtype=torch.long)  # each source's first entry
        unique.scatter_reduce_(0, inverse, torch.arange(len(inverse)), reduce="amin")
        input_ids, position_ids = torch.tensor(token_ids), torch.tensor(positions)
        sources = torch.tensor(sources, dtype=torch.long).reshape(-1, 2)
        layout = None
        if self.padding_free:  # the real tokens as one row; the attention rows say where each slot's token is
            real = sequence_of < len(sequences)
            layout = torch.full_like(input_ids, -1).masked_scatter_(real, torch.arange(int(real.sum())))
            input_ids, position_ids = input_ids[real][None], position_ids[real][None]
            sources = torch.stack([torch.zeros_like(sources[:, 0]), layout[sources[:, 0], sources[:, 1]]], dim=1)
        batch = {
            "pair_lengths": torch.tensor([len(p) + len(c) + len(r) for p, c, r in pairs], dtype=torch.long),
            "input_ids": input_ids,
            "position_ids": position_ids,
            "attention_mask": visible[:, None],
            "score_positions": sources[inverse],
            "score_targets": torch.tensor(targets, dtype=torch.long)[inverse],
            "score_pairs": torch.tensor(pair_of, dtype=torch.long),
            "score_rejected": torch.tensor(is_rejected, dtype=torch.bool),
            "num_tokens": torch.tensor([sum(2 * len(p) + len(c) + len(r) for p, c, r in pairs)]),
        }
        if layout is not None:
            batch["attention_layout"] = layout
        if self.merge_prompts:
            batch["score_unique"], batch["score_inverse"] = unique, inverse
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([e[key] for e in examples])
        return batch


class PromptGroupedSampler(torch.utils.data.Sampler[int]):
    """A shuffle that keeps each prompt's pairs next to each other (prompts in random order, and a prompt's pairs in
    random order), so that consecutive batches draw several pairs of a prompt and the collator computes it once.

    Seeded by `seed` + the epoch, as accelerate seeds the trainer's random sampler: every process draws the same
    order (each then takes its own batches of it) and a resumed run the same order as the run it resumes."""

    def __init__(self, prompts: Sequence[Sequence[int]], seed: int = 0):
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, prompt in enumerate(prompts):
            groups.setdefault(tuple(prompt), []).append(index)
        self.groups = list(groups.values())
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return sum(len(group) for group in self.groups)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        for g in torch.randperm(len(self.groups), generator=generator).tolist():
            group = self.groups[g]
            yield from (group[i] for i in torch.randperm(len(group), generator=generator).tolist())
        self.epoch += 1

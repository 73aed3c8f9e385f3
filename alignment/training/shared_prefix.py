"""Preference batches in which each prompt is computed once and no padding is computed in between.

A stock DPO batch holds every pair twice, [prompt, chosen] and [prompt, rejected], each row padded to the longest:
on HH-RLHF, whose multi-turn prompts are most of the tokens, that is about twice the work. Here a pair is one
sequence [prompt, chosen, rejected]:

    positions  0 … P-1 | P … P+C-1 | P … P+R-1       (the rejected reply continues from the prompt's end)
    attention  causal, except that rejected tokens never see chosen ones

so every reply token sees exactly what it sees in its own [prompt, reply] row, and its log-prob is the same. Pairs
are packed first-fit into rows as long as the longest pair of the batch (several pairs per row, each its own
block of the attention mask), so there is almost no padding either.

The log-prob of reply token k comes from the hidden state of the token before it in its own reply, and the first
token of each reply from the last prompt token: `score_positions` lists those (row, column) sources and
`score_targets` the tokens they predict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

PROMPT, CHOSEN, REJECTED = 0, 1, 2


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
class SharedPrefixPreferenceCollator:
    """Collate TRL-tokenised pairs (`prompt_ids`, `chosen_ids`, `rejected_ids`) into shared-prefix packed rows.

    Returns `pair_lengths` (pairs,), each pair's tokens in its packed row; `input_ids`, `position_ids` and a boolean
    `attention_mask` (rows, 1, L, L) for the model; for the loss, `score_positions` (N, 2), `score_targets` (N,),
    `score_pairs` (N,) and `score_rejected` (N,); and `num_tokens` (1,), what the unshared rows would hold, for TRL's
    token count. Precomputed `ref_chosen_logps` / `ref_rejected_logps` pass through.

    No tensor is 0-d, and `pair_lengths` comes first, so `transformers`' `find_batch_size` (the weight of a batch in
    the evaluation loss) counts pairs, as it does in TRL's layout. The rows cannot be split between processes the
    way accelerate's batch dispatcher splits a batch (the trainer turns dispatching off).
    """

    pad_token_id: int
    max_length: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pairs = [truncate_pair(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"], self.max_length) for e in examples]
        lengths = [len(p) + len(c) + len(r) for p, c, r in pairs]
        rows = first_fit(lengths, max(lengths))
        width = max(sum(lengths[i] for i in row) for row in rows)

        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros_like(input_ids)
        visible = torch.eye(width, dtype=torch.bool).repeat(len(rows), 1, 1)  # padding sees only itself
        sources, targets, pair_of, is_rejected = [], [], [], []
        for r, row in enumerate(rows):
            offset = 0
            for pair_index in row:
                prompt, chosen, rejected = pairs[pair_index]
                n_prompt, n_chosen, n_rejected = len(prompt), len(chosen), len(rejected)
                n = n_prompt + n_chosen + n_rejected
                block = slice(offset, offset + n)
                input_ids[r, block] = torch.tensor(prompt + chosen + rejected, dtype=torch.long)
                position_ids[r, block] = torch.tensor(
                    list(range(n_prompt + n_chosen)) + list(range(n_prompt, n_prompt + n_rejected))
                )
                causal = torch.ones(n, n, dtype=torch.bool).tril()
                causal[n_prompt + n_chosen :, n_prompt : n_prompt + n_chosen] = False  # rejected never sees chosen
                visible[r, block, block] = causal
                for reply_start, reply, flag in ((n_prompt, chosen, False), (n_prompt + n_chosen, rejected, True)):
                    for k, token in enumerate(reply):
                        source = reply_start + k - 1 if k > 0 else n_prompt - 1
                        if source < 0:  # no prompt: the first token has no context, as in an unshared row
                            continue
                        sources.append((r, offset + source))
                        targets.append(token)
                        pair_of.append(pair_index)
                        is_rejected.append(flag)
                offset += n

        batch = {
            "pair_lengths": torch.tensor(lengths, dtype=torch.long),
            "input_ids": input_ids,
            "position_ids": position_ids,
            "attention_mask": visible[:, None],
            "score_positions": torch.tensor(sources, dtype=torch.long).reshape(-1, 2),
            "score_targets": torch.tensor(targets, dtype=torch.long),
            "score_pairs": torch.tensor(pair_of, dtype=torch.long),
            "score_rejected": torch.tensor(is_rejected, dtype=torch.bool),
            "num_tokens": torch.tensor([sum(2 * len(p) + len(c) + len(r) for p, c, r in pairs)]),
        }
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([e[key] for e in examples])
        return batch

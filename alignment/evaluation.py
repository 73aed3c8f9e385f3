"""What a researcher asks of a trained policy: does it prefer the chosen replies, and what does it say?

* `preference_scores`: on held-out (prompt, chosen, rejected) pairs, the implicit-reward accuracy against a reference
  (DPO's own measure: β·log π/π_ref higher for the chosen reply), the mean margin, the mean log-probs, the DPO loss,
  and reference-free accuracy (the chosen reply has the higher per-token-averaged log-prob under the policy alone).
* `generate`: replies to prompts with the KV cache, greedy or sampled, stopping at end-of-text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .logprobs import IGNORE_INDEX, add_logprob_head
from .losses import ReplyLogps, preference_loss


@torch.no_grad()
def reply_logps(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    replies: Sequence[str],
    batch_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each reply given its prompt, and the reply lengths in tokens (EOS included)."""
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
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), labels=labels.to(device),
            token_logps=True,
        )
        sums.append(token_logps.sum(-1).float().cpu())
        lengths.append((labels[:, 1:] != IGNORE_INDEX).sum(-1))
    return torch.cat(sums), torch.cat(lengths)


def _prompt_reply_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, reply: str) -> tuple[list[int], int]:
    """Token ids of prompt + reply + EOS, and where the reply starts (as TRL tokenises preference pairs)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt + reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    shared = 0
    while shared < min(len(prompt_ids), len(full)) and prompt_ids[shared] == full[shared]:
        shared += 1
    return full, shared


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
) -> PreferenceScores:
    """Score held-out pairs; without a reference, the reward-based figures compare the policy with itself (0)."""
    prompts = [row["prompt"] for row in pairs]

    def logps(model: PreTrainedModel) -> ReplyLogps:
        chosen, chosen_length = reply_logps(model, tokenizer, prompts, [r["chosen"] for r in pairs], batch_size)
        rejected, rejected_length = reply_logps(model, tokenizer, prompts, [r["rejected"] for r in pairs], batch_size)
        return ReplyLogps(chosen, rejected, chosen_length, rejected_length)

    policy_logps = logps(policy)
    reference_logps = logps(reference) if reference is not None else policy_logps
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


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 50,
    do_sample: bool = False,
    temperature: float = 0.9,
    top_k: int = 200,
    top_p: float = 1.0,
    num_return_sequences: int = 1,
    batch_size: int = 32,
) -> list[list[str]]:
    """Replies to each prompt (left-padded batches, KV cache, stop at end-of-text); one list per prompt."""
    model.eval()
    device = next(model.parameters()).device
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    settings = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, num_return_sequences=num_return_sequences,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if do_sample:
        settings.update(temperature=temperature, top_k=top_k, top_p=top_p)
    replies: list[list[str]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True)
            output = model.generate(**batch.to(device), **settings)
            texts = tokenizer.batch_decode(output[:, batch["input_ids"].size(1) :], skip_special_tokens=True)
            replies += [texts[i : i + num_return_sequences] for i in range(0, len(texts), num_return_sequences)]
    finally:
        tokenizer.padding_side = padding_side
    return replies

"""A judged win rate: replies from the policy and from a reference to the same prompts, both scored by a judge (any
`(prompt, reply) -> float` callable, e.g. `reward_model_judge` around a sequence-classification reward model);
win/tie/loss counts and the win rate with a Wilson confidence interval."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..common import HH_HUMAN
from ..modeling.chat_templates import render_prompt
from ..modeling.loading import model_max_length
from ..modeling.tokenizer import ensure_pad_token
from .generation import generate

Judge = Callable[[str, str], float]


def wilson_interval(successes: float, total: float, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion successes/total (successes may be fractional: ties as halves)."""
    if total <= 0:
        return (0.0, 1.0)
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / total
    denominator = 1 + z * z / total
    center = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


@dataclass
class WinRate:
    """How often the policy's reply beat the reference's in the judge's eyes.

    `win_rate` = (wins + ties / 2) / (wins + ties + losses): a tie counts as half a win. `ci_low`/`ci_high` are the
    Wilson score interval at `confidence` for that proportion, taking (wins + ties / 2) successes out of all
    comparisons (ties included, each as half a success). `comparisons` holds every prompt with both replies and
    their scores.
    """

    wins: int
    ties: int
    losses: int
    win_rate: float
    ci_low: float
    ci_high: float
    confidence: float = 0.95
    comparisons: list[dict[str, Any]] = field(default_factory=list, repr=False, compare=False)

    @property
    def total(self) -> int:
        return self.wins + self.ties + self.losses

    def as_dict(self, comparisons: bool = False) -> dict[str, Any]:
        result = {
            name: getattr(self, name)
            for name in ("wins", "ties", "losses", "total", "win_rate", "ci_low", "ci_high", "confidence")
        }
        if comparisons:
            result["comparisons"] = list(self.comparisons)
        return result


def win_rate_from_counts(wins: int, ties: int, losses: int, confidence: float = 0.95) -> WinRate:
    """Win rate with ties counted half, and its Wilson interval (see `WinRate`)."""
    total = wins + ties + losses
    if total == 0:
        raise ValueError("no comparisons: the win rate needs at least one prompt")
    successes = wins + ties / 2
    low, high = wilson_interval(successes, total, confidence)
    return WinRate(wins, ties, losses, successes / total, low, high, confidence)


def _judge_all(judge: Judge, prompts: Sequence[str], replies: Sequence[str]) -> list[float]:
    score_batch = getattr(judge, "score_batch", None)
    if callable(score_batch):
        return [float(s) for s in score_batch(prompts, replies)]
    return [float(judge(p, r)) for p, r in zip(prompts, replies)]


def judged_win_rate(
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str | Sequence[dict[str, Any]]],
    judge: Judge,
    *,
    tie_tolerance: float = 0.0,
    confidence: float = 0.95,
    **generation_kwargs: Any,
) -> WinRate:
    """Generate a reply to each prompt from the policy and from the reference, score both with `judge`
    (`(prompt, reply) -> float`, higher is better) and count wins, ties and losses of the policy.

    A pair whose scores differ by at most `tie_tolerance` is a tie. `generation_kwargs` go to `generate` (both models
    get the same); replies stop at `stop_at`, by default the start of a new HH turn ("\\n\\nHuman:"). The interval
    is the Wilson score interval of (wins + ties / 2) out of all prompts: ties count as half a win (see `WinRate`).
    A judge with a `score_batch(prompts, replies)` method (as `reward_model_judge` returns) is called in batches.
    Conversational prompts (lists of messages) are rendered through the tokenizer's chat template first, so both
    models and the judge see the same text.
    """
    prompts = [render_prompt(tokenizer, prompt) for prompt in prompts]
    if not prompts:
        raise ValueError("no prompts: the win rate needs at least one")
    generation_kwargs.setdefault("stop_at", HH_HUMAN)
    policy_replies = [r[0] for r in generate(policy, tokenizer, prompts, **generation_kwargs)]
    reference_replies = [r[0] for r in generate(reference, tokenizer, prompts, **generation_kwargs)]
    policy_scores = _judge_all(judge, prompts, policy_replies)
    reference_scores = _judge_all(judge, prompts, reference_replies)
    wins = ties = losses = 0
    comparisons = []
    for prompt, mine, theirs, my_score, their_score in zip(
        prompts, policy_replies, reference_replies, policy_scores, reference_scores
    ):
        if abs(my_score - their_score) <= tie_tolerance:
            outcome, ties = "tie", ties + 1
        elif my_score > their_score:
            outcome, wins = "win", wins + 1
        else:
            outcome, losses = "loss", losses + 1
        comparisons.append(
            {
                "prompt": prompt,
                "policy": mine,
                "reference": theirs,
                "policy_score": my_score,
                "reference_score": their_score,
                "outcome": outcome,
            }
        )
    result = win_rate_from_counts(wins, ties, losses, confidence)
    result.comparisons = comparisons
    return result


class RewardModelJudge:
    """A judge around a sequence-classification reward model: the score of prompt + reply is one logit.

    `label_index` picks the logit: by default the only one of a single-output reward model (logits[:, 0]) and the
    last one of a classifier with several labels (e.g. "good" in a bad/good classifier). Texts are right-padded and,
    when too long, cut from the left so the reply is always seen.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        label_index: int | None = None,
        batch_size: int = 16,
        max_length: int | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        ensure_pad_token(tokenizer)  # set on the tokenizer given, as load_tokenizer does
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id  # models find each row's last token with it
        self.label_index = label_index if label_index is not None else -1
        self.batch_size = batch_size
        self.max_length = max_length or model_max_length(model)

    def __call__(self, prompt: str, reply: str) -> float:
        return self.score_batch([prompt], [reply])[0]

    @torch.no_grad()
    def score_batch(self, prompts: Sequence[str], replies: Sequence[str]) -> list[float]:
        device = next(self.model.parameters()).device
        texts = [p + r for p, r in zip(prompts, replies)]
        sides = self.tokenizer.padding_side, self.tokenizer.truncation_side
        self.tokenizer.padding_side, self.tokenizer.truncation_side = "right", "left"
        scores: list[float] = []
        try:
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    texts[start : start + self.batch_size],
                    return_tensors="pt",
                    padding=True,
                    truncation=self.max_length is not None,
                    max_length=self.max_length,
                )
                logits = self.model(**batch.to(device)).logits
                scores += logits[:, self.label_index].float().cpu().tolist()
        finally:
            self.tokenizer.padding_side, self.tokenizer.truncation_side = sides
        return scores


def reward_model_judge(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, **kwargs: Any) -> RewardModelJudge:
    """A `(prompt, reply) -> float` judge from any AutoModelForSequenceClassification reward model (see
    `RewardModelJudge` for `label_index`, `batch_size` and `max_length`)."""
    return RewardModelJudge(model, tokenizer, **kwargs)

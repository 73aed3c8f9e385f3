"""What a researcher asks of a trained policy: does it prefer the chosen replies, and what does it say?

* `preference_scores`: on held-out (prompt, chosen, rejected) pairs, the implicit-reward accuracy against a reference
  (DPO's own measure: β·log π/π_ref higher for the chosen reply), the mean margin, the mean log-probs, the DPO loss,
  and reference-free accuracy (the chosen reply has the higher per-token-averaged log-prob under the policy alone).
* `generate`: replies to prompts with the KV cache, greedy or sampled, stopping at end-of-text.
* `judged_win_rate`: replies from the policy and from a reference to the same prompts, both scored by a judge
  (any `(prompt, reply) -> float` callable, e.g. `reward_model_judge` around a sequence-classification reward
  model); win/tie/loss counts and the win rate with a Wilson confidence interval.
* `load_causal_lm`, `load_preference_pairs`: what the evaluation scripts load, as the training pipeline loads it.
"""

from __future__ import annotations

import argparse

import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .data import HH_ASSISTANT, DatasetSpec, normalize_dataset
from .logprobs import IGNORE_INDEX, add_logprob_head
from .losses import ReplyLogps, preference_loss

HH_HUMAN = "\n\nHuman:"

__all__ = [
    "HH_ASSISTANT",
    "HH_HUMAN",
    "PreferenceScores",
    "RewardModelJudge",
    "WinRate",
    "check_checkpoint",
    "cut_at",
    "fit_pairs",
    "generate",
    "judged_win_rate",
    "load_causal_lm",
    "load_preference_pairs",
    "load_reward_model",
    "model_max_length",
    "preference_scores",
    "reply_logps",
    "reward_model_judge",
    "wilson_interval",
    "win_rate_from_counts",
]


# --- loading -------------------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def check_checkpoint(name_or_path: str, what: str = "model") -> None:
    """Fail in one clear line on a path that is neither a folder nor could be a Hub id ("name" or "owner/name")."""
    path = os.path.expanduser(name_or_path)
    if os.path.isfile(path):
        raise ValueError(f"the {what} should be a checkpoint folder or a Hub id, not a file: {name_or_path}")
    if os.path.isdir(path):
        return
    # "outputs/sft" could be a Hub id, but with a local "outputs/" folder it is surely a mistyped path
    if _HUB_ID.fullmatch(name_or_path) is None or ("/" in name_or_path and os.path.isdir(name_or_path.split("/")[0])):
        raise FileNotFoundError(f"{what} checkpoint not found: no folder {name_or_path}")


def load_causal_lm(
    name_or_path: str,
    *,
    tokenizer_name_or_path: str | None = None,
    trust_remote_code: bool = False,
    dtype: str | None = "float32",
    model_implementation: str = "alignment",
    revision: str | None = None,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM checkpoint (local folder or Hub id) and its tokenizer, loaded as the training pipeline loads them.

    GPT-2 checkpoints (ours or transformers'/OpenAI's) load into our GPT-2 class unless `model_implementation` is
    "transformers"; anything else through `AutoModelForCausalLM`. The tokenizer is `tokenizer_name_or_path`, else
    the checkpoint's own, else GPT-2's. The checkpoint is checked first, so a wrong path gets an error naming it.
    """
    from .configs import ModelArguments
    from .loading import check_compatible, load_model, tokenizer_source
    from .tokenizer import load_tokenizer

    check_checkpoint(os.fspath(name_or_path))
    model_args = ModelArguments(
        model_name_or_path=os.path.expanduser(os.fspath(name_or_path)),
        model_revision=revision,
        dtype=dtype,
        model_implementation=model_implementation,
        tokenizer_name_or_path=tokenizer_name_or_path,
    )
    model = load_model(model_args, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(tokenizer_source(model_args))
    check_compatible(model, tokenizer, None)
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer


def model_max_length(model: PreTrainedModel) -> int | None:
    """How many positions the model has (GPT-2's n_positions, max_position_embeddings elsewhere), if it says."""
    config = model.config.get_text_config()
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def load_preference_pairs(
    path: str | os.PathLike,
    split: str = "test",
    *,
    format: str | None = None,
    config: str | None = None,
    max_samples: int | None = None,
) -> list[dict[str, str]]:
    """One split of a preference source as (prompt, chosen, rejected) rows, in the source's order.

    `path` is anything `alignment.data` reads: a local .jsonl/.json/.parquet/.csv file (one split, so `split` is
    ignored), a folder or a Hub id, in any shape it knows (hh, rm-static, stack-exchange, TRL preference); bad rows
    are dropped with a warning, as in training. `max_samples` keeps the first rows.
    """
    from .data import _read  # reads one split as stored; the public loaders always carve train/test splits

    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be at least 1, got {max_samples}")
    spec = DatasetSpec(path=os.fspath(path), split=split, format=format, name=config)
    local = os.path.isfile(os.path.expanduser(spec.path))
    source = spec.path if local else f"{spec.path} ({split} split)"
    rows, _ = normalize_dataset(_read(spec, split), "preference", format=format, source=source)
    if max_samples is not None:
        rows = rows.select(range(min(max_samples, len(rows))))
    return rows.to_list()


# --- log-probs and preference scores --------------------------------------------------------------------------------


@torch.no_grad()
def reply_logps(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    replies: Sequence[str],
    batch_size: int = 32,
    progress: Callable[[int], object] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each reply given its prompt, and the reply lengths in tokens (EOS included).

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
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), labels=labels.to(device),
            token_logps=True,
        )
        sums.append(token_logps.sum(-1).float().cpu())
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
) -> PreferenceScores:
    """Score held-out pairs; without a reference, the reward-based figures compare the policy with itself (0).

    `max_samples` scores the first pairs only; `progress` shows a tqdm bar (on stderr) over every scored sequence.
    """
    if max_samples is not None:
        pairs = pairs[:max_samples]
    if not pairs:
        raise ValueError("no preference pairs to score")
    prompts = [row["prompt"] for row in pairs]
    models = 1 if reference is None else 2
    bar = tqdm(total=2 * models * len(pairs), desc="scoring pairs", unit="seq", disable=not progress, leave=False)

    def logps(model: PreTrainedModel) -> ReplyLogps:
        chosen, chosen_length = reply_logps(
            model, tokenizer, prompts, [r["chosen"] for r in pairs], batch_size, progress=bar.update
        )
        rejected, rejected_length = reply_logps(
            model, tokenizer, prompts, [r["rejected"] for r in pairs], batch_size, progress=bar.update
        )
        return ReplyLogps(chosen, rejected, chosen_length, rejected_length)

    with bar:
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


# --- generation -----------------------------------------------------------------------------------------------------


def cut_at(text: str, stop: str | None) -> str:
    """`text` up to the first `stop` (e.g. HH_HUMAN: the model starting the user's next turn)."""
    return text.split(stop, 1)[0] if stop else text


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
    stop_at: str | None = None,
    progress: bool = False,
) -> list[list[str]]:
    """Replies to each prompt (left-padded batches, KV cache, stop at end-of-text); one list per prompt.

    `stop_at` cuts each reply at the first occurrence of that text (e.g. `HH_HUMAN`); `progress` shows a tqdm bar.
    Greedy decoding gives one reply per prompt whatever `num_return_sequences` says. Seed with
    `transformers.set_seed` for reproducible samples.
    """
    model.eval()
    device = next(model.parameters()).device
    if not do_sample:
        num_return_sequences = 1
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    settings = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, num_return_sequences=num_return_sequences,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, use_cache=True)
    if do_sample:
        settings.update(temperature=temperature, top_k=top_k, top_p=top_p)
    else:  # a checkpoint's generation_config may ask for sampling settings; greedy ignores them without warnings
        settings.update(temperature=None, top_k=None, top_p=None)
    replies: list[list[str]] = []
    starts = range(0, len(prompts), batch_size)
    try:
        for start in tqdm(starts, desc="generating", unit="batch", disable=not progress, leave=False):
            batch = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True)
            output = model.generate(**batch.to(device), **settings)
            texts = tokenizer.batch_decode(output[:, batch["input_ids"].size(1) :], skip_special_tokens=True)
            texts = [cut_at(text, stop_at) for text in texts]
            replies += [texts[i : i + num_return_sequences] for i in range(0, len(texts), num_return_sequences)]
    finally:
        tokenizer.padding_side = padding_side
    return replies


# --- judged win rate ------------------------------------------------------------------------------------------------

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
        result = {name: getattr(self, name) for name in
                  ("wins", "ties", "losses", "total", "win_rate", "ci_low", "ci_high", "confidence")}
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
    prompts: Sequence[str],
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
    """
    prompts = list(prompts)
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
        comparisons.append({"prompt": prompt, "policy": mine, "reference": theirs,
                            "policy_score": my_score, "reference_score": their_score, "outcome": outcome})
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
        if tokenizer.pad_token is None:  # set on the tokenizer given, as load_tokenizer does
            tokenizer.pad_token = tokenizer.eos_token
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
                batch = self.tokenizer(texts[start : start + self.batch_size], return_tensors="pt", padding=True,
                                       truncation=self.max_length is not None, max_length=self.max_length)
                logits = self.model(**batch.to(device)).logits
                scores += logits[:, self.label_index].float().cpu().tolist()
        finally:
            self.tokenizer.padding_side, self.tokenizer.truncation_side = sides
        return scores


def reward_model_judge(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, **kwargs: Any) -> RewardModelJudge:
    """A `(prompt, reply) -> float` judge from any AutoModelForSequenceClassification reward model (see
    `RewardModelJudge` for `label_index`, `batch_size` and `max_length`)."""
    return RewardModelJudge(model, tokenizer, **kwargs)


def load_reward_model(
    name_or_path: str,
    *,
    tokenizer_name_or_path: str | None = None,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
    **judge_kwargs: Any,
) -> RewardModelJudge:
    """A judge from a reward-model checkpoint (folder or Hub id) loaded with AutoModelForSequenceClassification; its
    tokenizer is `tokenizer_name_or_path`, else the checkpoint's own, else GPT-2's."""
    from transformers import AutoModelForSequenceClassification

    from .loading import TOKENIZER_FILES, checkpoint_model_type
    from .tokenizer import load_tokenizer

    path = os.path.expanduser(os.fspath(name_or_path))
    check_checkpoint(os.fspath(name_or_path), "reward model")
    checkpoint_model_type(path)  # a missing Hub checkpoint gets one line naming it
    model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=trust_remote_code)
    source = tokenizer_name_or_path or path
    if os.path.isdir(source) and not any(os.path.exists(os.path.join(source, f)) for f in TOKENIZER_FILES):
        source = "gpt2"
    if device is not None:
        model.to(device)
    return RewardModelJudge(model, load_tokenizer(source), **judge_kwargs)


def add_loading_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The command-line options of `load_causal_lm`, shared by scripts/generate.py and scripts/evaluate.py."""
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or Hub id (default: the checkpoint's)")
    parser.add_argument("--trust_remote_code", action="store_true", help="allow model code from the checkpoints")
    parser.add_argument("--model_implementation", choices=("alignment", "transformers"), default="alignment",
                        help="GPT-2 checkpoints load into our class ('alignment') or transformers' own")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "auto"))
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")

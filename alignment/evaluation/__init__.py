"""Evaluation: loading checkpoints to evaluate, scoring preference pairs, generation, judged win rates, curves.
May import `alignment.common`, `alignment.modeling`, `alignment.data` and `alignment.training`.

    loading     checkpoints, held-out pairs and reward models, from plain arguments
    scoring     preference pairs scored as the DPO trainer scores them (shared prefix, packed)
    generation  replies with the KV cache
    judging     judged win rates with Wilson intervals; reward-model judges
    plotting    PNG figures of a run's trainer_state.json
    options     what the two commands share: a raising parser, loading options, device, sampling settings
    sampling    the generate command (scripts/generate.py): prompts, samples, the HH chat loop
    report      the evaluate command (scripts/evaluate.py): scores, win rate, the results table
"""

from ..common import HH_ASSISTANT, HH_HUMAN
from ..modeling.loading import model_max_length
from .generation import cut_at, generate
from .judging import (
    RewardModelJudge,
    WinRate,
    judged_win_rate,
    reward_model_judge,
    wilson_interval,
    win_rate_from_counts,
)
from .loading import check_checkpoint, load_causal_lm, load_preference_pairs, load_reward_model
from .scoring import PreferenceScores, fit_pairs, preference_scores, reply_logps, text_pairs

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
    "text_pairs",
    "wilson_interval",
    "win_rate_from_counts",
]

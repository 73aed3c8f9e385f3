"""Preference losses on sequence log-probabilities (Rafailov et al., 2023, and the well-known variants).

Every loss reads the summed reply log-probabilities of the policy (and, except SimPO, of the frozen reference) for
the chosen reply y_w and the rejected reply y_l of each prompt x. The implicit reward of a reply is
β · (log π(y|x) − log π_ref(y|x)); a pair is "correct" when the chosen reply's reward is the higher one.

    sigmoid       −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ),   Δ = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))
                  (ε = label smoothing; ε = 0 is DPO, ε > 0 is conservative DPO)
    hinge         max(0, 1 − βΔ)                                          (SLiC)
    ipo           (Δ̄ − 1/(2β))²,  Δ̄ with per-token averaged log-ratios   (Azar et al., 2023)
    sigmoid_norm  sigmoid loss on per-token averaged log-ratios          (the assignment's `get_log_p` average)
    simpo         −log σ(β·(avg log π(y_w) − avg log π(y_l)) − γ), no reference   (Meng et al., 2024)

RPO (Pang et al., 2024) adds `rpo_alpha` × the mean negative log-likelihood of the chosen reply tokens to any of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "sigmoid_norm", "simpo")
REFERENCE_FREE_LOSS_TYPES = ("simpo",)


@dataclass
class ReplyLogps:
    """Summed log-probs of the chosen and rejected replies of a batch of pairs, and their lengths in tokens."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_length: torch.Tensor
    rejected_length: torch.Tensor

    def average(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.chosen / self.chosen_length.clamp(min=1), self.rejected / self.rejected_length.clamp(min=1)


@dataclass
class PreferenceLoss:
    """Per-pair losses and the implicit rewards behind them (rewards are detached, for logging)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    @property
    def loss(self) -> torch.Tensor:
        return self.losses.mean()

    @property
    def accuracy(self) -> torch.Tensor:
        return (self.chosen_rewards > self.rejected_rewards).float()

    @property
    def margin(self) -> torch.Tensor:
        return self.chosen_rewards - self.rejected_rewards


def smoothed_sigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def preference_loss(
    policy: ReplyLogps,
    reference: ReplyLogps | None,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> PreferenceLoss:
    """The per-pair loss of `loss_type` (see the module docstring)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
    if loss_type == "simpo":
        chosen_avg, rejected_avg = policy.average()
        losses = smoothed_sigmoid_loss(beta * (chosen_avg - rejected_avg) - simpo_gamma, label_smoothing)
        return PreferenceLoss(losses, beta * chosen_avg.detach(), beta * rejected_avg.detach())
    if reference is None:
        raise ValueError(f"loss_type {loss_type!r} needs reference log-probs")

    chosen_logratio = policy.chosen - reference.chosen
    rejected_logratio = policy.rejected - reference.rejected
    if loss_type == "sigmoid":
        losses = smoothed_sigmoid_loss(beta * (chosen_logratio - rejected_logratio), label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * (chosen_logratio - rejected_logratio))
    else:  # the two length-normalised losses
        delta = chosen_logratio / policy.chosen_length.clamp(min=1) - rejected_logratio / policy.rejected_length.clamp(
            min=1
        )
        if loss_type == "ipo":
            losses = (delta - 1 / (2 * beta)) ** 2
        else:
            losses = smoothed_sigmoid_loss(beta * delta, label_smoothing)
    return PreferenceLoss(losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach())

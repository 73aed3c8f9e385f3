"""Preference losses on sequence log-probabilities: DPO (Rafailov et al., 2023) and every variant TRL's `DPOTrainer`
computes, each as TRL computes it, plus conservative DPO and SimPO.

Every loss reads the summed reply log-probabilities of the policy (and, except SimPO, of the frozen reference) for
the chosen reply y_w and the rejected reply y_l of each prompt x. With the log-ratios r_w = log π(y_w) − log π_ref(y_w)
and r_l likewise, Δ = r_w − r_l, and r̄ a log-ratio averaged over the reply's tokens, the per-pair losses are:

    sigmoid       −log σ(βΔ)                                                   DPO (Rafailov et al., 2023)
    cdpo          −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ), ε = label_smoothing         conservative DPO (Mitchell, 2023)
    hinge         max(0, 1 − βΔ)                                               SLiC (Zhao et al., 2023)
    ipo           (r̄_w − r̄_l − 1/(2β))²                                        IPO (Azar et al., 2023), TRL's per-token form
    sigmoid_norm  −log σ(β(r̄_w − r̄_l))                                         length-normalised DPO
    exo_pair      q_w(log q_w − log(1−ε)) + q_l(log q_l − log ε), q_w = σ(βΔ)   EXO (Ji et al., 2024, eq. 16)
    nca_pair      −log σ(βr_w) − ½ log σ(−βr_w) − ½ log σ(−βr_l)               NCA (Chen et al., 2024)
    robust        (−(1−ε) log σ(βΔ) + ε log σ(−βΔ)) / (1 − 2ε)                 robust DPO (Chowdhury et al., 2024)
    bco_pair      −log σ(βr_w) − log σ(−βr_l)                                  BCO on pairs, as TRL 1.16 (no running mean)
    sppo_hard     (r_w − 1/(2β))² + (r_l + 1/(2β))²                            SPPO, hard labels (Wu et al., 2024)
    aot           smoothed sigmoid of β(sort(log π_w − log π_l) − sort(ref))   AOT (Melnyk et al., 2024), sorted in batch
    aot_unpaired  smoothed sigmoid of β(sort(r_w) − sort(r_l))                 AOT, unpaired
    apo_zero      1 − σ(βr_w) + σ(βr_l)                                        APO-zero (D'Oosterlinck et al., 2024, eq. 7)
    apo_down      σ(βr_w) + 1 − σ(βΔ)                                          APO-down (eq. 8)
    discopop      (1−m)·(−log σ(βΔ)) + m·exp(−βΔ), m = σ(βΔ/τ)                DiscoPOP (Chris Lu et al., 2024, eq. 5)
    sft           mean NLL of the batch's chosen reply tokens                  (for mixtures such as MPO)
    simpo         −log σ(β(avg log π(y_w) − avg log π(y_l)) − γ), no reference  SimPO (Meng et al., 2024)

Options, as TRL applies them:

* `f_divergence_type` (f-DPO, Wang et al., 2024) replaces each log-ratio r by f'(e^r) in the losses built on Δ
  (sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop; sft ignores it): `forward_kl` 1 − e^−r,
  `js_divergence` log 2 + log σ(r), `alpha_divergence` (e^{(α−1)r} − 1)/(α−1) with α = f_alpha_divergence_coef
  (exponent clamped at 80, 11 in float16; α = 1 is reverse KL). Its log Z(x) term cancels only in Δ, so the other
  losses have no f-divergence form and refuse it (`F_DIVERGENCE_LOSS_TYPES`).
* `weights` (WPO, Zhou et al., 2024) multiply each pair's loss (`ScoredTokens.wpo_weights`).
* `ld_alpha` (LD-DPO) changes the summed log-probs themselves (`ScoredTokens.reply_logps`).

"smoothed sigmoid" is cdpo's form. As in TRL, `label_smoothing` (ε) is read by cdpo, exo_pair, robust, aot and
aot_unpaired only, and the logged rewards are β·r for every loss (SimPO: β·avg log π). RPO (Pang et al., 2024) adds
`rpo_alpha` × the chosen tokens' mean NLL to any of them; several losses are summed with `loss_weights`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_TYPES = (
    "sigmoid", "cdpo", "hinge", "ipo", "sigmoid_norm", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "simpo",
)  # fmt: skip
REFERENCE_FREE_LOSS_TYPES = ("simpo",)
TRL_LOSS_TYPES = tuple(t for t in LOSS_TYPES if t not in ("cdpo", "simpo"))  # the ones trl.DPOTrainer computes too
SMOOTHED_LOSS_TYPES = ("cdpo", "exo_pair", "robust", "aot", "aot_unpaired")  # the ones reading label_smoothing
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
SORTING_LOSS_TYPES = ("aot", "aot_unpaired")  # they sort the batch, so per-pair (WPO) weights would not line up


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


def f_divergence_score(log_ratio: torch.Tensor, f_divergence_type: str, alpha: float = 1.0) -> torch.Tensor:
    """f'(π/π_ref) written in r = log(π/π_ref), for f-DPO (see the module docstring)."""
    if f_divergence_type == "reverse_kl" or (f_divergence_type == "alpha_divergence" and abs(alpha - 1) < 1e-6):
        return log_ratio
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-log_ratio)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(log_ratio)
    if f_divergence_type == "alpha_divergence":
        t = (alpha - 1) * log_ratio
        clamp_max = 11.0 if t.dtype == torch.float16 else 80.0  # keeps exp(t) finite once cast back
        return (torch.exp(torch.clamp(t.float(), max=clamp_max)) - 1).to(t.dtype) / (alpha - 1)
    raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}; choose one of {F_DIVERGENCE_TYPES}")


def preference_loss(
    policy: ReplyLogps,
    reference: ReplyLogps | None,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    discopop_tau: float = 0.05,
    chosen_nll: torch.Tensor | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 1.0,
    weights: torch.Tensor | None = None,
) -> PreferenceLoss:
    """The per-pair loss of `loss_type` (see the module docstring), times `weights` if given; `chosen_nll` is
    needed by `sft` only."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
    if f_divergence_type != "reverse_kl" and loss_type not in F_DIVERGENCE_LOSS_TYPES:
        raise ValueError(f"f_divergence_type {f_divergence_type!r} has no form for loss_type {loss_type!r}")
    if weights is not None and loss_type in SORTING_LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r} sorts the batch: per-pair (WPO) weights would not line up")
    eps = label_smoothing
    if loss_type == "simpo":
        chosen_avg, rejected_avg = policy.average()
        losses = smoothed_sigmoid_loss(beta * (chosen_avg - rejected_avg) - simpo_gamma, eps)
        losses = losses if weights is None else losses * weights
        return PreferenceLoss(losses, beta * chosen_avg.detach(), beta * rejected_avg.detach())
    if reference is None:
        raise ValueError(f"loss_type {loss_type!r} needs reference log-probs")

    r_w = policy.chosen - reference.chosen
    r_l = policy.rejected - reference.rejected
    s_w = f_divergence_score(r_w, f_divergence_type, f_alpha_divergence_coef)
    s_l = f_divergence_score(r_l, f_divergence_type, f_alpha_divergence_coef)
    logits = beta * (s_w - s_l)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(logits)
    elif loss_type == "cdpo":
        losses = smoothed_sigmoid_loss(logits, eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - logits)
    elif loss_type in ("ipo", "sigmoid_norm"):
        delta = s_w / policy.chosen_length.clamp(min=1) - s_l / policy.rejected_length.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2 if loss_type == "ipo" else -F.logsigmoid(beta * delta)
    elif loss_type == "exo_pair":
        log_pw, log_pl = math.log1p(-eps), math.log(eps)
        q_w, q_l = torch.sigmoid(logits), torch.sigmoid(-logits)
        losses = q_w * (F.logsigmoid(logits) - log_pw) + q_l * (F.logsigmoid(-logits) - log_pl)
    elif loss_type == "nca_pair":
        losses = -F.logsigmoid(beta * r_w) - 0.5 * F.logsigmoid(-beta * r_w) - 0.5 * F.logsigmoid(-beta * r_l)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)
    elif loss_type == "bco_pair":
        losses = -F.logsigmoid(beta * r_w) - F.logsigmoid(-beta * r_l)
    elif loss_type == "sppo_hard":
        losses = (r_w - 0.5 / beta) ** 2 + (r_l + 0.5 / beta) ** 2
    elif loss_type == "aot":
        policy_sorted = torch.sort(policy.chosen - policy.rejected, dim=0).values
        reference_sorted = torch.sort(reference.chosen - reference.rejected, dim=0).values
        losses = smoothed_sigmoid_loss(beta * (policy_sorted - reference_sorted), eps)
    elif loss_type == "aot_unpaired":
        delta = torch.sort(r_w, dim=0).values - torch.sort(r_l, dim=0).values
        losses = smoothed_sigmoid_loss(beta * delta, eps)
    elif loss_type == "apo_zero":
        losses = 1 - torch.sigmoid(beta * r_w) + torch.sigmoid(beta * r_l)
    elif loss_type == "apo_down":
        losses = torch.sigmoid(beta * r_w) + 1 - torch.sigmoid(logits)
    elif loss_type == "discopop":
        modulation = torch.sigmoid(logits / discopop_tau)
        losses = -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation
    else:  # sft
        if chosen_nll is None:
            raise ValueError("loss_type 'sft' needs the chosen tokens' mean NLL (chosen_nll)")
        losses = chosen_nll.expand(r_w.shape)
    if weights is not None:
        losses = losses * weights
    return PreferenceLoss(losses, beta * r_w.detach(), beta * r_l.detach())

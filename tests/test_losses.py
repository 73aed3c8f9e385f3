"""The preference losses against their formulas, written out by hand on a few numbers."""

import math

import pytest
import torch

from alignment.training.losses import ReplyLogps, preference_loss

POLICY = ReplyLogps(torch.tensor([-4.0, -9.0]), torch.tensor([-6.0, -5.0]), torch.tensor([2, 3]), torch.tensor([4, 1]))
REFERENCE = ReplyLogps(
    torch.tensor([-5.0, -8.0]), torch.tensor([-5.5, -6.0]), torch.tensor([2, 3]), torch.tensor([4, 1])
)
BETA = 0.1


def logsigmoid(x):
    return -math.log1p(math.exp(-x))


def test_sigmoid_is_the_dpo_loss_and_rewards():
    result = preference_loss(POLICY, REFERENCE, beta=BETA)
    # pair 0: Δ = (-4 + 5) - (-6 + 5.5) = 1.5 ; pair 1: Δ = (-9 + 8) - (-5 + 6) = -2
    expected = [-logsigmoid(BETA * 1.5), -logsigmoid(BETA * -2.0)]
    torch.testing.assert_close(result.losses, torch.tensor(expected))
    torch.testing.assert_close(result.chosen_rewards, torch.tensor([0.1, -0.1]))
    torch.testing.assert_close(result.rejected_rewards, torch.tensor([-0.05, 0.1]))
    torch.testing.assert_close(result.accuracy, torch.tensor([1.0, 0.0]))


def test_loss_is_ln2_when_policy_equals_reference():
    result = preference_loss(POLICY, POLICY, beta=BETA)
    torch.testing.assert_close(result.loss, torch.tensor(math.log(2)))
    assert result.accuracy.sum() == 0  # equal rewards are not a win


def test_label_smoothing_is_conservative_dpo():
    eps = 0.2
    result = preference_loss(POLICY, REFERENCE, beta=BETA, loss_type="cdpo", label_smoothing=eps)
    x = BETA * 1.5
    torch.testing.assert_close(result.losses[0], torch.tensor(-(1 - eps) * logsigmoid(x) - eps * logsigmoid(-x)))


def test_hinge_and_ipo():
    hinge = preference_loss(POLICY, REFERENCE, beta=BETA, loss_type="hinge")
    torch.testing.assert_close(hinge.losses, torch.tensor([1 - 0.15, 1 + 0.2]))
    ipo = preference_loss(POLICY, REFERENCE, beta=BETA, loss_type="ipo")
    # per-token averaged log-ratios: pair 0: 1/2 - (-0.5)/4 = 0.625 ; pair 1: -1/3 - 1/1
    expected = [(0.625 - 1 / (2 * BETA)) ** 2, (-1 / 3 - 1 - 1 / (2 * BETA)) ** 2]
    torch.testing.assert_close(ipo.losses, torch.tensor(expected))


def test_length_normalised_sigmoid_and_simpo():
    norm = preference_loss(POLICY, REFERENCE, beta=BETA, loss_type="sigmoid_norm")
    torch.testing.assert_close(norm.losses[0], torch.tensor(-logsigmoid(BETA * 0.625)))
    simpo = preference_loss(POLICY, None, beta=2.0, loss_type="simpo", simpo_gamma=0.5)
    # averages: pair 0: -2 vs -1.5 ; pair 1: -3 vs -5
    torch.testing.assert_close(simpo.losses, torch.tensor([-logsigmoid(2.0 * -0.5 - 0.5), -logsigmoid(2.0 * 2 - 0.5)]))
    torch.testing.assert_close(simpo.chosen_rewards, torch.tensor([-4.0, -6.0]))


def test_prompt_terms_cancel():
    """Adding the same prompt log-prob to chosen and rejected (policy and reference alike) leaves the loss as is."""
    prompt_policy, prompt_reference = torch.tensor([-30.0, -12.0]), torch.tensor([-28.0, -13.0])

    def with_prompt(logps, prompt):
        return ReplyLogps(logps.chosen + prompt, logps.rejected + prompt, logps.chosen_length, logps.rejected_length)

    for loss_type in ("sigmoid", "hinge"):
        reply_only = preference_loss(POLICY, REFERENCE, beta=BETA, loss_type=loss_type)
        whole = preference_loss(
            with_prompt(POLICY, prompt_policy), with_prompt(REFERENCE, prompt_reference), beta=BETA, loss_type=loss_type
        )
        torch.testing.assert_close(whole.losses, reply_only.losses, atol=1e-5, rtol=0)


def test_reference_losses_need_a_reference_and_types_are_checked():
    with pytest.raises(ValueError, match="needs reference"):
        preference_loss(POLICY, None, beta=BETA, loss_type="sigmoid")
    with pytest.raises(ValueError, match="unknown loss_type"):
        preference_loss(POLICY, REFERENCE, beta=BETA, loss_type="kto")


def test_chosen_nll_is_the_token_mean():
    """RPO's term: the mean NLL over the chosen replies' tokens of the batch; rejected tokens do not count."""
    from alignment.training.dpo import ScoredTokens

    # pair 0's chosen reply scored -1 and -2, pair 1's -3; the rejected tokens (-5, -7) are left out
    scored = ScoredTokens(
        logps=torch.tensor([-1.0, -2.0, -5.0, -3.0, -7.0]),
        pairs=torch.tensor([0, 0, 0, 1, 1]),
        rejected=torch.tensor([False, False, True, False, True]),
        num_pairs=2,
    )
    torch.testing.assert_close(scored.chosen_nll(), torch.tensor(2.0))


LN2 = math.log(2)
EPS = 0.1
STEP_ZERO = {  # policy == reference (every log-ratio 0), β = 0.1: what each formula gives
    "sigmoid": LN2,
    "cdpo": LN2,
    "hinge": 1.0,
    "ipo": (1 / (2 * BETA)) ** 2,
    "sigmoid_norm": LN2,
    "exo_pair": 0.5 * (-LN2 - math.log(1 - EPS)) + 0.5 * (-LN2 - math.log(EPS)),
    "nca_pair": 2 * LN2,
    "robust": LN2,
    "bco_pair": 2 * LN2,
    "sppo_hard": 2 * (0.5 / BETA) ** 2,
    "aot": LN2,
    "aot_unpaired": LN2,
    "apo_zero": 1.0,
    "apo_down": 1.0,
    "discopop": 0.5 * LN2 + 0.5,
}


@pytest.mark.parametrize("loss_type", list(STEP_ZERO))
def test_step_zero_values_fixed_by_the_formulas(loss_type):
    smoothing = EPS if loss_type in ("cdpo", "exo_pair", "robust", "aot", "aot_unpaired") else 0.0
    result = preference_loss(POLICY, POLICY, beta=BETA, loss_type=loss_type, label_smoothing=smoothing)
    torch.testing.assert_close(result.losses, torch.full((2,), STEP_ZERO[loss_type]))
    for f_divergence in ("forward_kl", "js_divergence", "alpha_divergence"):  # f'(1) = 0 for each: same values
        if loss_type in ("sigmoid", "hinge", "ipo", "robust", "discopop"):
            again = preference_loss(
                POLICY,
                POLICY,
                beta=BETA,
                loss_type=loss_type,
                label_smoothing=smoothing,
                f_divergence_type=f_divergence,
            )
            torch.testing.assert_close(again.losses, result.losses)

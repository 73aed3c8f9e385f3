"""DPO's variants beyond the loss formula: LD-DPO, WPO, f-DPO, TR-DPO; and every loss learns.

Parity of each with stock TRL on one batch is in `test_dpo_trainer.py::test_every_trl_loss_type_equals_stock_trl`;
here: the per-token pieces against hand computation, TR-DPO over several steps (against TRL and its formula) and
across a resume, the combinations refused, and a few steps of training on a separable batch for every loss.
"""

import copy
import math

import datasets
import pytest
import torch
import trl

from alignment.training import DPOTrainer
from alignment.training.configs import DPOConfig
from alignment.training.dpo import SYNCED_REFERENCE_FILE
from alignment.training.layouts import ScoredTokens
from alignment.training.losses import LOSS_TYPES, ReplyLogps, f_divergence_score, preference_loss
from tests.conftest import tiny_causal_lms
from tests.test_dpo_trainer import batch_of, config, data, trained_pair

# two pairs; tokens listed reply by reply, out of order between replies (as a packed batch may list them)
TOKENS = ScoredTokens(
    logps=torch.tensor([-1.0, -2.0, -3.0, -0.5, -0.25, -4.0, -1.5, -2.5, -0.75]),
    pairs=torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1]),
    rejected=torch.tensor([False, False, True, True, True, True, False, True, True]),
    num_pairs=2,
    log_sum_sq=torch.tensor([-0.5, -1.0, -1.0, -0.2, -0.1, -2.0, -1.0, -1.0, -0.5]),
)


def test_ld_alpha_weighs_tokens_past_the_shorter_reply():
    # pair 0: chosen (-1, -2), rejected (-3, -0.5, -0.25): shared length 2, the rejected reply's 3rd token is tail
    # pair 1: chosen (-1.5), rejected (-4, -2.5, -0.75): shared length 1
    plain = TOKENS.reply_logps()
    torch.testing.assert_close(plain.chosen, torch.tensor([-3.0, -1.5]))
    torch.testing.assert_close(plain.rejected, torch.tensor([-3.75, -7.25]))
    ld = TOKENS.reply_logps(ld_alpha=0.5)
    torch.testing.assert_close(ld.chosen, torch.tensor([-3.0, -1.5]))
    torch.testing.assert_close(ld.rejected, torch.tensor([-3.5 - 0.125, -4.0 - 0.5 * 3.25]))
    torch.testing.assert_close(ld.rejected_length, plain.rejected_length)  # the lengths stay the replies' own
    torch.testing.assert_close(TOKENS.reply_logps(ld_alpha=1.0).rejected, plain.rejected)


def test_wpo_weights_are_the_product_of_the_replies_mean_aligned_probabilities():
    def w(logps, log_sum_sq):
        return math.exp(sum(a - b for a, b in zip(logps, log_sum_sq)) / len(logps))

    expected = [
        w([-1.0, -2.0], [-0.5, -1.0]) * w([-3.0, -0.5, -0.25], [-1.0, -0.2, -0.1]),
        w([-1.5], [-1.0]) * w([-4.0, -2.5, -0.75], [-2.0, -1.0, -0.5]),
    ]
    torch.testing.assert_close(TOKENS.wpo_weights(), torch.tensor(expected))


def test_f_divergence_scores_are_the_derivatives_of_f():
    r = torch.tensor([-1.0, 0.0, 2.0])
    t = r.exp()
    torch.testing.assert_close(f_divergence_score(r, "reverse_kl"), r)
    torch.testing.assert_close(f_divergence_score(r, "forward_kl"), 1 - 1 / t)
    torch.testing.assert_close(f_divergence_score(r, "js_divergence"), torch.log(2 * t / (t + 1)))
    torch.testing.assert_close(f_divergence_score(r, "alpha_divergence", 0.5), (t ** (-0.5) - 1) / -0.5)
    torch.testing.assert_close(f_divergence_score(r, "alpha_divergence", 1.0), r)  # the limit: reverse KL
    # the sigmoid loss on f-scores, with the rewards still β·log-ratio
    policy = ReplyLogps(torch.tensor([-2.0]), torch.tensor([-3.0]), torch.tensor([2]), torch.tensor([3]))
    reference = ReplyLogps(torch.tensor([-2.5]), torch.tensor([-2.0]), torch.tensor([2]), torch.tensor([3]))
    result = preference_loss(policy, reference, beta=0.1, f_divergence_type="forward_kl")
    delta = (1 - math.exp(-0.5)) - (1 - math.exp(1.0))
    torch.testing.assert_close(result.losses, torch.tensor([math.log1p(math.exp(-0.1 * delta))]))
    torch.testing.assert_close(result.chosen_rewards, torch.tensor([0.05]))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"loss_type": ["nca_pair"], "f_divergence_type": "js_divergence"}, "has no form for loss_type"),
        ({"f_divergence_type": "chi2"}, "unknown f_divergence_type"),
        ({"loss_type": ["aot"], "use_weighting": True}, "sort the batch"),
        ({"ld_alpha": 1.5}, r"ld_alpha must be in \[0, 1\]"),
        ({"loss_type": ["simpo"], "sync_ref_model": True}, "no reference model to sync"),
        ({"sync_ref_model": True, "precompute_ref_log_probs": True}, "precomputed reference log-probs stale"),
    ],
    ids=["f-nca", "f-unknown", "wpo-aot", "ld-range", "sync-simpo", "sync-precompute"],
)
def test_combinations_trl_refuses_are_refused_in_one_line(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message) as error:
        config(tmp_path, **settings)
    assert "\n" not in str(error.value)


def test_sync_ref_model_with_lora_is_refused_as_trl_does(tmp_path, gpt2_tokenizer):
    from peft import LoraConfig

    with pytest.raises(NotImplementedError, match="sync_ref_model=True` while using a PEFT model"):
        DPOTrainer(
            tiny_causal_lms()["ours"](),
            args=config(tmp_path, sync_ref_model=True),
            peft_config=LoraConfig(r=4, target_modules=["c_attn"], task_type="CAUSAL_LM"),
            train_dataset=data(),
            processing_class=gpt2_tokenizer,
        )


def tr_dpo_config(tmp_path, config_class=DPOConfig, **overrides):
    settings = dict(
        sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.6, max_steps=3, learning_rate=1e-2
    )
    return config(tmp_path, config_class, **{**settings, **overrides})


def test_tr_dpo_reference_is_the_mixup_and_equals_stock_trl(tmp_path, gpt2_tokenizer):
    policy, reference = trained_pair()
    ours = DPOTrainer(
        copy.deepcopy(policy),
        copy.deepcopy(reference),
        tr_dpo_config(tmp_path / "ours", max_steps=1),
        train_dataset=data(),
        processing_class=gpt2_tokenizer,
    )
    ours.train()
    for (name, mixed), stepped, before in zip(
        ours.ref_model.named_parameters(), ours.model.parameters(), reference.parameters()
    ):
        torch.testing.assert_close(mixed, 0.6 * stepped + 0.4 * before, msg=name)

    runs = []
    for name, trainer_class, config_class in (("ours", DPOTrainer, DPOConfig), ("trl", trl.DPOTrainer, trl.DPOConfig)):
        trainer = trainer_class(
            copy.deepcopy(policy),
            copy.deepcopy(reference),
            # SGD: Adam would turn the rounding noise of near-zero gradients (attention key biases) into full steps
            tr_dpo_config(tmp_path / f"{name}-3", config_class, ref_model_sync_steps=2, optim="sgd", learning_rate=1.0),
            train_dataset=data(),
            processing_class=gpt2_tokenizer,
        )
        trainer.train()
        runs.append(trainer)
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e] for t in runs]
    assert len(losses[0]) == 3 and losses[0][2] != pytest.approx(losses[0][1], abs=1e-4)
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)  # step 3 reads the reference synced at step 2
    for a, b in zip(runs[0].ref_model.parameters(), runs[1].ref_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_tr_dpo_resumes_with_the_synced_reference(tmp_path, gpt2_tokenizer):
    """Its checkpoints keep the synced reference: a resumed run ends where the uninterrupted one does."""
    policy, reference = trained_pair()

    def trainer(out):
        args = tr_dpo_config(out, max_steps=4, save_strategy="steps", save_steps=2)
        return DPOTrainer(
            copy.deepcopy(policy), copy.deepcopy(reference), args, train_dataset=data(), processing_class=gpt2_tokenizer
        )

    whole = trainer(tmp_path / "whole")
    whole.train()
    checkpoint = tmp_path / "whole" / "run" / "checkpoint-2"
    assert (checkpoint / SYNCED_REFERENCE_FILE).is_file()
    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for a, b in zip(resumed.ref_model.parameters(), whole.ref_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for a, b in zip(resumed.model.parameters(), whole.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


SEPARABLE = [
    {"prompt": f"\n\nHuman: Say yes {i}.\n\nAssistant:", "chosen": " yes", "rejected": " no, I will not."}
    for i in range(4)
]
LEARNING_CASES = {
    **{name: {"loss_type": [name]} for name in LOSS_TYPES},
    "cdpo": {"loss_type": ["cdpo"], "label_smoothing": 0.1},
    "exo_pair": {"loss_type": ["exo_pair"], "label_smoothing": 1e-3},
    "f-js_divergence": {"f_divergence_type": "js_divergence"},
    "wpo": {"use_weighting": True},
    "ld_alpha": {"ld_alpha": 0.5},
    "rpo": {"rpo_alpha": 1.0},
}


LOSS_DEFAULTS = {
    "loss_type": ["sigmoid"], "label_smoothing": 0.0, "f_divergence_type": "reverse_kl", "use_weighting": False,
    "ld_alpha": None, "rpo_alpha": None,
}  # fmt: skip


def test_every_loss_and_option_decreases_on_a_separable_batch(tmp_path, gpt2_tokenizer):
    """Eight Adam steps on one batch of four pairs (chosen ' yes', rejected a long refusal), from a frozen-copy
    reference: every loss ends lower than it starts. One trainer serves every case (its loss settings are read from
    `args` at each step); the policy restarts from the same weights each time."""
    torch.manual_seed(0)
    trainer = DPOTrainer(
        tiny_causal_lms()["ours"](),
        args=config(tmp_path, beta=0.5),
        train_dataset=datasets.Dataset.from_list(SEPARABLE),
        processing_class=gpt2_tokenizer,
    )
    start = copy.deepcopy(trainer.model.state_dict())
    batch = batch_of(trainer)
    failed = {}
    for case, settings in LEARNING_CASES.items():
        for key, value in {**LOSS_DEFAULTS, **settings}.items():
            setattr(trainer.args, key, value)
        trainer.model.load_state_dict(start)
        optimizer = torch.optim.Adam(trainer.model.parameters(), lr=5e-3)
        losses = []
        for _ in range(8):
            loss = trainer.compute_loss(trainer.model, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        if not (all(map(math.isfinite, losses)) and losses[-1] < losses[0] - 1e-3):
            failed[case] = losses
    assert not failed, failed


def test_trls_spelling_of_rpo_equals_rpo_alpha(tmp_path, gpt2_tokenizer):
    """`loss_type: [sigmoid, sft]` with `loss_weights: [1, α]` (TRL's RPO) is our `rpo_alpha: α`: same loss and
    gradients on the same batch."""
    policy, reference = trained_pair()
    trainers = [
        DPOTrainer(
            copy.deepcopy(policy),
            copy.deepcopy(reference),
            config(tmp_path / name, **settings),
            train_dataset=data(),
            processing_class=gpt2_tokenizer,
        )
        for name, settings in (
            ("trl", {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.7]}),
            ("ours", {"rpo_alpha": 0.7}),
        )
    ]
    losses = [t.compute_loss(t.model, trainers[0]._prepare_inputs(trainers[0].data_collator(
        [trainers[0].train_dataset[i] for i in range(4)]))) for t in trainers]  # fmt: skip
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=0)
    for loss in losses:
        loss.backward()
    for a, b in zip(trainers[0].model.parameters(), trainers[1].model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)

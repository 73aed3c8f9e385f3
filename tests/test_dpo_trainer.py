"""Our DPO trainer: parity with stock TRL, the reference it builds, variants, and any causal LM."""

import copy
import math

import datasets
import pytest
import torch
import trl

from alignment.configs import DPOConfig
from alignment.logprobs import add_logprob_head
from alignment.losses import preference_loss
from alignment.trainers import DPOTrainer
from tests.conftest import preference_rows, tiny_causal_lms

METRICS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"]


def config(tmp_path, config_class=DPOConfig, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=2, logging_steps=1,
        report_to="none", save_strategy="no", learning_rate=1e-3, bf16=False, seed=0, beta=0.1,
    )
    return config_class(**{**settings, **overrides})


def first_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def trained_pair(seed=0):
    """A policy that differs from its reference, so the rewards are not all zero."""
    torch.manual_seed(seed)
    reference = tiny_causal_lms()["ours"]()
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy, reference


def test_loss_and_metrics_equal_stock_trl(tmp_path, gpt2_tokenizer):
    data = datasets.Dataset.from_list(preference_rows())
    policy, reference = trained_pair()
    ours = DPOTrainer(copy.deepcopy(policy), copy.deepcopy(reference), config(tmp_path), train_dataset=data,
                      processing_class=gpt2_tokenizer)
    stock = trl.DPOTrainer(copy.deepcopy(policy), copy.deepcopy(reference), config(tmp_path, trl.DPOConfig),
                           train_dataset=data, processing_class=gpt2_tokenizer)
    batch = first_batch(ours)
    assert torch.equal(batch["input_ids"], first_batch(stock)["input_ids"])
    ours_loss = ours.compute_loss(ours.model, batch)
    stock_loss = stock.compute_loss(stock.model, batch)
    assert abs(ours_loss.item() - stock_loss.item()) <= 1e-5
    assert abs(ours_loss.item() - math.log(2)) > 1e-3  # the policy really differs from the reference
    for name in METRICS:
        assert abs(ours._metrics["train"][name][-1] - stock._metrics["train"][name][-1]) <= 1e-5, name
    ours_loss.backward()
    stock_loss.backward()
    for (name, a), b in zip(ours.model.named_parameters(), stock.model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_step_zero_loss_is_ln2_with_a_frozen_copy_as_reference(tmp_path, gpt2_tokenizer):
    torch.manual_seed(0)
    model = tiny_causal_lms()["ours"]()  # built in memory: stock TRL could not reload it by name
    trainer = DPOTrainer(model, args=config(tmp_path), train_dataset=datasets.Dataset.from_list(preference_rows()),
                         processing_class=gpt2_tokenizer)
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())
    before = copy.deepcopy(trainer.ref_model.state_dict())
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert abs(logs[0]["loss"] - math.log(2)) <= 1e-5
    assert all(torch.equal(before[k], v) for k, v in trainer.ref_model.state_dict().items())  # stayed frozen
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())  # policy moved


def test_prompt_terms_cancel_with_real_log_probs(tmp_path, gpt2_tokenizer):
    policy, reference = trained_pair()
    trainer = DPOTrainer(policy, reference, config(tmp_path), train_dataset=datasets.Dataset.from_list(preference_rows()),
                         processing_class=gpt2_tokenizer)
    batch = first_batch(trainer)
    with torch.no_grad():
        logps = {name: trainer.token_logps(model, {**batch, "completion_mask": batch["attention_mask"]})
                 for name, model in (("policy", trainer.model), ("reference", trainer.ref_model))}
    reply, whole = trainer.reply_mask(batch), batch["attention_mask"][:, 1:].bool()

    def loss(mask):
        return preference_loss(
            trainer.reply_logps(logps["policy"], mask), trainer.reply_logps(logps["reference"], mask), beta=0.1
        ).loss

    assert abs(loss(reply).item() - loss(whole).item()) <= 1e-5
    assert not torch.equal(reply, whole)


@pytest.mark.parametrize("model_name", ["ours", "transformers-gpt2", "transformers-llama"])
def test_trains_any_causal_lm(tmp_path, gpt2_tokenizer, model_name):
    torch.manual_seed(0)
    trainer = DPOTrainer(tiny_causal_lms()[model_name](), args=config(tmp_path),
                         train_dataset=datasets.Dataset.from_list(preference_rows()), processing_class=gpt2_tokenizer)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert abs(losses[0] - math.log(2)) <= 1e-5


@pytest.mark.parametrize(
    "overrides",
    [
        {"loss_type": ["sigmoid"], "label_smoothing": 0.1},
        {"loss_type": ["ipo"]},
        {"loss_type": ["hinge"]},
        {"loss_type": ["sigmoid_norm"]},
        {"loss_type": ["simpo"], "simpo_gamma": 0.3, "beta": 2.0},
        {"loss_type": ["sigmoid"], "rpo_alpha": 0.5},
    ],
    ids=["cdpo", "ipo", "hinge", "sigmoid_norm", "simpo", "rpo"],
)
def test_variants_compute_their_loss(tmp_path, gpt2_tokenizer, overrides):
    policy, reference = trained_pair()
    args = config(tmp_path, **overrides)
    trainer = DPOTrainer(policy, reference, args, train_dataset=datasets.Dataset.from_list(preference_rows()),
                         processing_class=gpt2_tokenizer)
    if args.reference_free:
        assert trainer.ref_model is None
    batch = first_batch(trainer)
    loss = trainer.compute_loss(trainer.model, batch)
    mask = trainer.reply_mask(batch)
    with torch.no_grad():
        pol_tokens = trainer.token_logps(trainer.model, batch)
        pol = trainer.reply_logps(pol_tokens, mask)
        ref = None if args.reference_free else trainer.reply_logps(trainer.token_logps(reference, batch), mask)
    expected = preference_loss(pol, ref, beta=args.beta, loss_type=args.loss_type[0],
                               label_smoothing=args.label_smoothing, simpo_gamma=args.simpo_gamma).loss
    if args.rpo_alpha:
        chosen_tokens, chosen_mask = pol_tokens.chunk(2)[0], mask.chunk(2)[0]
        expected = expected + args.rpo_alpha * -(chosen_tokens * chosen_mask).sum() / chosen_mask.sum()
        assert trainer._metrics["train"]["nll_loss"]
    assert abs(loss.item() - expected.item()) <= 1e-5
    loss.backward()


def test_lora_reference_is_the_base_model_with_the_adapter_off(tmp_path, gpt2_tokenizer):
    from peft import LoraConfig

    torch.manual_seed(0)
    model = tiny_causal_lms()["ours"]()
    original = add_logprob_head(copy.deepcopy(model))  # LoRA wraps `model` in place
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], task_type="CAUSAL_LM")
    trainer = DPOTrainer(model, args=config(tmp_path, learning_rate=1e-2), peft_config=peft_config,
                         train_dataset=datasets.Dataset.from_list(preference_rows()), processing_class=gpt2_tokenizer)
    assert trainer.ref_model is None  # no second copy of the weights
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    trainer.train()
    batch = first_batch(trainer)
    with torch.no_grad():
        reference = trainer.reference_logps(batch)
        base = trainer.reply_logps(trainer.token_logps(original, batch), trainer.reply_mask(batch))
        with trainer.model.disable_adapter():
            plain = trainer.reply_logps(trainer.token_logps(trainer.model, batch), trainer.reply_mask(batch))
        policy = trainer.reply_logps(trainer.token_logps(trainer.model, batch), trainer.reply_mask(batch))
    torch.testing.assert_close(reference.chosen, plain.chosen)
    torch.testing.assert_close(reference.chosen, base.chosen)
    assert not torch.allclose(policy.chosen, reference.chosen)  # the adapter learned something


def test_config_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match="beta must be > 0"):
        config(tmp_path, beta=0.0)
    with pytest.raises(ValueError, match="unknown loss_type"):
        config(tmp_path, loss_type=["nca"])

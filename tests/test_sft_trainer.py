"""Our SFT trainer: packed windows whose documents never meet, and a logged loss equal to the objective."""

import math

import datasets
import pytest
import torch
import trl

from alignment.training import PackedDocumentsCollator, SFTTrainer
from alignment.training.configs import SFTConfig
from tests.conftest import tiny_causal_lms

EOS = 50256


def config(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=2,
        max_steps=2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        learning_rate=1e-3,
        bf16=False,
        seed=0,
        max_length=24,
        packing=True,  # the assignment's windows, as our SFT recipes set them
        packing_strategy="wrapped",
    )
    return SFTConfig(**{**settings, **overrides})


def dialogues(n=10):
    return [{"text": f"\n\nHuman: What is {i} + {i % 3}?\n\nAssistant: {i + i % 3}"} for i in range(n)]


def test_collator_restarts_positions_after_each_eos():
    collate = PackedDocumentsCollator(eos_token_id=EOS, pad_token_id=EOS)
    batch = collate([{"input_ids": [5, 6, EOS, 7, 8, 9, EOS, 4]}, {"input_ids": [1, 2, EOS]}])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 0, 0, 0, 0, 0]]
    assert batch["input_ids"][1].tolist() == [1, 2, EOS, EOS, EOS, EOS, EOS, EOS]
    # first token of every document and the padding are never targets
    assert batch["labels"].tolist() == [[-100, 6, EOS, -100, 8, 9, EOS, -100], [-100, 2, EOS] + [-100] * 5]


def direct_objective(model, batch):
    """Cross-entropy of each document on its own (unpacked, no masks needed), averaged over the scored tokens."""
    total, count = 0.0, 0
    for ids, labels, positions in zip(batch["input_ids"], batch["labels"], batch["position_ids"]):
        starts = (positions == 0).nonzero().flatten().tolist() + [len(ids)]
        for start, end in zip(starts, starts[1:]):
            doc, doc_labels = ids[start:end], labels[start:end]
            if end - start < 2:
                continue
            logits = model(doc[None]).logits[0, :-1]
            targets = doc_labels[1:]
            scored = targets != -100
            total = total + torch.nn.functional.cross_entropy(logits[scored], targets[scored], reduction="sum")
            count += int(scored.sum())
    return total / count


@pytest.mark.parametrize("model_name", ["ours", "transformers-gpt2", "transformers-llama"])
def test_logged_loss_equals_the_objective(tmp_path, gpt2_tokenizer, model_name):
    torch.manual_seed(0)
    model = tiny_causal_lms()[model_name]()
    trainer = SFTTrainer(
        model,
        args=config(tmp_path),
        train_dataset=datasets.Dataset.from_list(dialogues()),
        processing_class=gpt2_tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["position_ids"] == 0).sum() > batch["input_ids"].size(0)  # windows really hold several documents
    with torch.no_grad():
        expected = direct_objective(trainer.model, batch).item()
    trainer.train()
    first_logged = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
    assert abs(first_logged - expected) <= 1e-5
    assert all(math.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)


def test_completion_only_loss_scores_only_replies(tmp_path, gpt2_tokenizer):
    rows = [{"prompt": f"\n\nHuman: What is {i} + 1?\n\nAssistant:", "completion": f" {i + 1}"} for i in range(8)]
    torch.manual_seed(0)
    trainer = SFTTrainer(
        tiny_causal_lms()["ours"](),
        args=config(tmp_path, completion_only_loss=True),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=gpt2_tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    scored = batch["input_ids"][batch["labels"] != -100].tolist()
    assert set(scored) <= {gpt2_tokenizer.encode(f" {i + 1}")[0] for i in range(8)} | {EOS}
    with torch.no_grad():
        expected = direct_objective(trainer.model, batch).item()
        got = trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch)).item()
    assert abs(got - expected) <= 1e-5


def test_stock_sft_trainer_gets_the_same_loss(tmp_path, gpt2_tokenizer):
    """Same windows through stock TRL's loss (its fused LM head) and ours: equal loss and gradients."""
    torch.manual_seed(0)
    model = tiny_causal_lms()["ours"]()
    ours = SFTTrainer(
        model,
        args=config(tmp_path),
        train_dataset=datasets.Dataset.from_list(dialogues()),
        processing_class=gpt2_tokenizer,
    )
    batch = ours._prepare_inputs(next(iter(ours.get_train_dataloader())))
    ours_loss = ours.compute_loss(ours.model, dict(batch))
    ours_loss.backward()
    ours_grads = [p.grad.clone() for p in ours.model.parameters()]
    ours.model.zero_grad()
    stock_loss = trl.SFTTrainer.compute_loss(ours, ours.model, dict(batch))
    stock_loss.backward()
    assert abs(ours_loss.item() - stock_loss.item()) <= 1e-5
    for (name, p), grad in zip(ours.model.named_parameters(), ours_grads):
        torch.testing.assert_close(grad, p.grad, atol=1e-6, rtol=1e-4, msg=name)

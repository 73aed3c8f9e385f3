"""The trainers carry their own safety: built from Python, with no pipeline around them, `DPOTrainer` and
`SFTTrainer` stop on a non-finite loss naming the batch's rows, and save a checkpoint and stop on SIGTERM."""

import os
import re
import signal

import pytest
import torch
from conftest import preference_rows
from datasets import Dataset
from transformers import TrainerCallback

from alignment import AlignmentGPT2Config, AlignmentGPT2ForCausalLM
from alignment.training import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer, TrainingInterrupted
from alignment.training.checkpoints import incomplete_reason, last_complete_checkpoint
from alignment.training.safety import SOURCE_ROW, NonFiniteLossError

SETTINGS = dict(
    max_steps=4,
    per_device_train_batch_size=2,
    learning_rate=1e-3,
    report_to="none",
    save_strategy="no",
    logging_steps=1,
    use_cpu=True,
    bf16=False,
    activation_checkpointing=False,
    seed=0,
)


def tiny_model():
    torch.manual_seed(0)
    return AlignmentGPT2ForCausalLM(
        AlignmentGPT2Config(vocab_size=50257, n_positions=64, n_embd=16, n_layer=1, n_head=2)
    )


def build(stage, tmp_path, gpt2_tokenizer, **overrides):
    if stage == "dpo":
        args = DPOConfig(output_dir=str(tmp_path / "dpo"), max_length=48, **{**SETTINGS, **overrides})
        return DPOTrainer(
            tiny_model(),
            args=args,
            train_dataset=Dataset.from_list(preference_rows(8)),
            processing_class=gpt2_tokenizer,
        )
    rows = [{"text": r["prompt"] + r["chosen"]} for r in preference_rows(8)]
    args = SFTConfig(output_dir=str(tmp_path / "sft"), max_length=32, packing=False, **{**SETTINGS, **overrides})
    return SFTTrainer(tiny_model(), args=args, train_dataset=Dataset.from_list(rows), processing_class=gpt2_tokenizer)


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_nonfinite_loss_guard_through_the_class_alone(stage, tmp_path, gpt2_tokenizer, monkeypatch):
    trainer_class = SFTTrainer if stage == "sft" else DPOTrainer
    compute_loss = trainer_class.compute_loss

    def poisoned(self, model, inputs, *args, **kwargs):
        loss = compute_loss(self, model, inputs, *args, **kwargs)
        return loss * float("nan") if self.state.global_step == 2 else loss  # the 3rd update

    monkeypatch.setattr(trainer_class, "compute_loss", poisoned)
    trainer = build(stage, tmp_path, gpt2_tokenizer, save_strategy="steps", save_steps=1)
    assert SOURCE_ROW in trainer.train_dataset.column_names  # the rows are numbered by the trainer itself
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(NonFiniteLossError) as error:
        trainer.train()
    message = str(error.value)
    match = re.search(r"non-finite loss \(nan\) at step 3, batch from training rows \[([\d, ]+)\]", message)
    assert match, message
    assert len(match.group(1).split(", ")) == 2  # the batch's two rows
    checkpoint = tmp_path / stage / "checkpoint-2"
    assert f"the last good checkpoint, {checkpoint}, is intact" in message
    assert last_complete_checkpoint(tmp_path / stage) == checkpoint and incomplete_reason(checkpoint) is None
    after = dict(trainer.model.named_parameters())
    assert all(torch.isfinite(p).all() for p in after.values())  # the poisoned update never happened
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the two good updates did


class SendSigterm(TrainerCallback):
    """SIGTERM to this process in the middle of the second optimizer step."""

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 1:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_sigterm_saves_a_checkpoint_through_the_class_alone(stage, tmp_path, gpt2_tokenizer):
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    trainer = build(stage, tmp_path, gpt2_tokenizer)
    trainer.add_callback(SendSigterm())
    with pytest.raises(TrainingInterrupted) as stopped:
        trainer.train()
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    checkpoint = tmp_path / stage / "checkpoint-2"
    assert f"training stopped at step 2; checkpoint saved in {checkpoint}" in str(stopped.value)
    assert incomplete_reason(checkpoint) is None and trainer.state.global_step == 2
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_the_token_count_continues_after_a_resume(stage, tmp_path, gpt2_tokenizer):
    def logged_tokens(trainer):
        return [(e["step"], e["num_tokens"]) for e in trainer.state.log_history if "num_tokens" in e]

    whole = build(stage, tmp_path / "whole", gpt2_tokenizer, save_strategy="steps", save_steps=2)
    whole.train()
    resumed = build(stage, tmp_path / "whole", gpt2_tokenizer, save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / stage / "checkpoint-2"))
    expected = dict(logged_tokens(whole))
    got = dict(logged_tokens(resumed))
    assert got[4] == expected[4] and got[4] > expected[2] > 0, (got, expected)

"""Our GPT-2 under stock TRL 1.16 trainers, which patch the forward with a fused LM head over `base_model`."""

import copy
import math

import datasets
import torch
import trl

from tests.conftest import preference_rows, tiny_causal_lms

COMMON = dict(
    per_device_train_batch_size=4,
    max_steps=3,
    logging_steps=1,
    report_to="none",
    save_strategy="no",
    learning_rate=1e-3,
    bf16=False,
    use_cpu=True,
)


def finite_losses(trainer):
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return len(losses) == 3 and all(math.isfinite(x) for x in losses)


def test_stock_sft_trainer_runs_our_model_packed_and_padded(tmp_path, gpt2_tokenizer):
    rows = [{"text": f"\n\nHuman: Say {i}.\n\nAssistant: {i}"} for i in range(16)]
    for packing in (False, True):  # padded batches, and TRL's padding-free bfd packing
        torch.manual_seed(0)
        args = trl.SFTConfig(output_dir=str(tmp_path / f"sft{packing}"), packing=packing, max_length=32, **COMMON)
        trainer = trl.SFTTrainer(
            tiny_causal_lms()["ours"](),
            args=args,
            processing_class=gpt2_tokenizer,
            train_dataset=datasets.Dataset.from_list(rows),
        )
        trainer.train()
        assert finite_losses(trainer)


def test_stock_dpo_trainer_runs_our_model(tmp_path, gpt2_tokenizer):
    torch.manual_seed(0)
    model = tiny_causal_lms()["ours"]()
    args = trl.DPOConfig(output_dir=str(tmp_path / "dpo"), **COMMON)
    trainer = trl.DPOTrainer(
        model,
        ref_model=copy.deepcopy(model),
        args=args,
        processing_class=gpt2_tokenizer,
        train_dataset=datasets.Dataset.from_list(preference_rows()),
    )
    trainer.train()
    assert finite_losses(trainer)
    first = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert abs(first["loss"] - math.log(2)) < 1e-4

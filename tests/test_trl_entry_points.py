"""TRL's own ways of building a trainer work with ours too: the model as a folder name, no `processing_class` (the
model's tokenizer is loaded), a plain `TrainingArguments`, and TRL's refusals kept (precompute on an iterable)."""

import datasets
import pytest
import torch
import transformers
import trl

from alignment.training import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
from tests.conftest import preference_rows, tiny_causal_lms

COMMON = dict(
    per_device_train_batch_size=2,
    max_steps=1,
    report_to="none",
    save_strategy="no",
    bf16=False,
    use_cpu=True,
    max_length=48,
)


@pytest.fixture
def model_folder(tmp_path, gpt2_tokenizer):
    torch.manual_seed(0)
    folder = tmp_path / "tiny-llama"
    tiny_causal_lms()["transformers-llama"]().save_pretrained(folder)
    gpt2_tokenizer.save_pretrained(folder)
    return str(folder)


def test_dpo_from_a_model_name_and_no_tokenizer(model_folder, tmp_path):
    trainer = DPOTrainer(
        model_folder,
        args=DPOConfig(output_dir=str(tmp_path / "dpo"), **COMMON),
        train_dataset=datasets.Dataset.from_list(preference_rows(4)),
    )
    assert isinstance(trainer.model, transformers.LlamaForCausalLM)
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    assert trainer.processing_class.eos_token_id == 50256
    trainer.train()
    assert trainer.state.global_step == 1


def test_sft_with_no_tokenizer_and_with_plain_training_arguments(model_folder, tmp_path):
    rows = datasets.Dataset.from_list([{"text": r["prompt"] + r["chosen"]} for r in preference_rows(4)])
    packed = SFTTrainer(model_folder, args=SFTConfig(output_dir=str(tmp_path / "sft"), **COMMON), train_dataset=rows)
    assert packed.processing_class is not None
    packed.train()
    plain_args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "plain"),
        per_device_train_batch_size=2,
        max_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
    )
    plain = SFTTrainer(model_folder, args=plain_args, train_dataset=rows)
    plain.train()
    assert plain.state.global_step == 1


def test_precompute_on_an_iterable_dataset_is_refused_as_trl_refuses_it(tmp_path, gpt2_tokenizer):
    def trainer(trainer_class, config_class):
        torch.manual_seed(0)
        iterable = datasets.Dataset.from_list(preference_rows(4)).to_iterable_dataset()
        args = config_class(
            output_dir=str(tmp_path / trainer_class.__module__),
            precompute_ref_log_probs=True,
            **{**COMMON, "max_steps": 2},
        )
        return trainer_class(
            tiny_causal_lms()["ours"](), args=args, train_dataset=iterable, processing_class=gpt2_tokenizer
        )

    with pytest.raises(Exception) as stock:
        trainer(trl.DPOTrainer, trl.DPOConfig)
    with pytest.raises(type(stock.value)) as ours:
        trainer(DPOTrainer, DPOConfig)
    assert str(ours.value) == str(stock.value) and "IterableDataset" in str(ours.value)


def test_mask_columns_without_labels_are_refused_as_trl_refuses_them(tmp_path, gpt2_tokenizer):
    """A pre-tokenised dataset with a completion mask but no labels, preparation skipped: TRL refuses it rather than
    train on every token; our packed-window collator would have trained on every token, so it is refused too."""
    rows = datasets.Dataset.from_list([{"input_ids": [1, 2, 3, 50256], "completion_mask": [0, 0, 1, 1]}] * 4)
    messages = []
    for trainer_class, config_class in ((trl.SFTTrainer, trl.SFTConfig), (SFTTrainer, SFTConfig)):
        args = config_class(
            output_dir=str(tmp_path / trainer_class.__module__),
            packing=True,
            packing_strategy="wrapped",
            dataset_kwargs={"skip_prepare_dataset": True},
            **COMMON,
        )
        with pytest.raises(ValueError, match="has mask columns but no 'labels'") as refused:
            trainer_class(tiny_causal_lms()["ours"](), args=args, train_dataset=rows, processing_class=gpt2_tokenizer)
        messages.append(str(refused.value))
    assert messages[0] == messages[1]

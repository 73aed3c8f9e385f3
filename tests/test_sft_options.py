"""SFT options TRL honours are honoured here too, on the same batch and weights as stock `trl.SFTTrainer`: the DFT
loss, label smoothing, a custom `compute_loss_func` and the MoE router auxiliary loss; and the metrics TRL logs
(`mean_token_accuracy`, `entropy`, `aux_loss`) are logged with TRL's values. DPO refuses the MoE auxiliary loss in
one clear line rather than dropping it."""

import copy

import datasets
import pytest
import torch
import transformers
import trl

from alignment.training import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
from tests.conftest import preference_rows, tiny_causal_lms

COMMON = dict(
    per_device_train_batch_size=4,
    max_steps=1,
    logging_steps=1,
    report_to="none",
    save_strategy="no",
    bf16=False,
    use_cpu=True,
    seed=0,
    max_length=32,
    packing=False,
)


def texts(n=8):
    return datasets.Dataset.from_list(
        [{"text": f"\n\nHuman: What is {i} + {i % 3}?\n\nAssistant: {i + i % 3}"} for i in range(n)]
    )


def mixtral():
    return transformers.MixtralForCausalLM(
        transformers.MixtralConfig(
            vocab_size=50257,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            max_position_embeddings=64,
            output_router_logits=True,
            router_aux_loss_coef=0.02,
            bos_token_id=50256,
            eos_token_id=50256,
        )
    )


def smoothed_ce(outputs, labels, num_items_in_batch=None):
    """A custom loss a user might pass: cross-entropy with the logits halved."""
    logits = outputs.logits[:, :-1] / 2
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))


CASES = {
    "nll": ({}, {}),
    "dft": ({"loss_type": "dft"}, {}),
    "label_smoothing": ({"label_smoothing_factor": 0.1}, {}),
    "compute_loss_func": ({}, {"compute_loss_func": smoothed_ce}),
}


def pair_of_trainers(tmp_path, gpt2_tokenizer, model, config_overrides=None, trainer_kwargs=None):
    config_overrides, trainer_kwargs = config_overrides or {}, trainer_kwargs or {}
    kwargs = dict(train_dataset=texts(), processing_class=gpt2_tokenizer, **trainer_kwargs)
    ours = SFTTrainer(
        copy.deepcopy(model), args=SFTConfig(output_dir=str(tmp_path / "a"), **COMMON, **config_overrides), **kwargs
    )
    stock = trl.SFTTrainer(
        copy.deepcopy(model), args=trl.SFTConfig(output_dir=str(tmp_path / "b"), **COMMON, **config_overrides), **kwargs
    )
    return ours, stock


def same_batch_loss(ours, stock):
    examples = [stock.train_dataset[i] for i in range(4)]
    losses = []
    for trainer in (ours, stock):
        batch = trainer._prepare_inputs(trainer.data_collator([dict(e) for e in examples]))
        losses.append(trainer.compute_loss(trainer.model, batch))
    return losses


@pytest.mark.parametrize("case", list(CASES))
def test_sft_loss_and_metrics_equal_stock_trl(case, tmp_path, gpt2_tokenizer):
    torch.manual_seed(0)
    config_overrides, trainer_kwargs = CASES[case]
    ours, stock = pair_of_trainers(
        tmp_path, gpt2_tokenizer, tiny_causal_lms()["ours"](), config_overrides, trainer_kwargs
    )
    (a, b) = same_batch_loss(ours, stock)
    assert abs(a.item() - b.item()) <= 1e-5, (a.item(), b.item())
    for name in ("mean_token_accuracy", "entropy", "num_tokens"):
        assert abs(ours._metrics["train"][name][-1] - stock._metrics["train"][name][-1]) <= 1e-4, name
    a.backward()
    b.backward()
    for (name, x), y in zip(ours.model.named_parameters(), stock.model.parameters()):
        torch.testing.assert_close(x.grad, y.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_options_change_the_loss_so_the_parity_above_means_something(tmp_path, gpt2_tokenizer):
    torch.manual_seed(0)
    model = tiny_causal_lms()["ours"]()
    values = {}
    for case, (config_overrides, trainer_kwargs) in CASES.items():
        ours, _ = pair_of_trainers(tmp_path / case, gpt2_tokenizer, model, config_overrides, trainer_kwargs)
        values[case] = same_batch_loss(ours, ours)[0].item()
    assert len({round(v, 4) for v in values.values()}) == len(CASES), values


def test_moe_auxiliary_loss_is_honoured_in_sft_and_in_dpo(tmp_path, gpt2_tokenizer):
    torch.manual_seed(0)
    ours, stock = pair_of_trainers(tmp_path, gpt2_tokenizer, mixtral())
    a, b = same_batch_loss(ours, stock)
    assert abs(a.item() - b.item()) <= 1e-5
    assert (
        ours._metrics["train"]["aux_loss"] and ours._metrics["train"]["aux_loss"] == stock._metrics["train"]["aux_loss"]
    )

    model = mixtral()
    settings = dict(per_device_train_batch_size=2, report_to="none", bf16=False, use_cpu=True, max_length=32)
    pairs = datasets.Dataset.from_list(preference_rows(4))
    dpo = {}
    for name, trainer_class, config_class in (("ours", DPOTrainer, DPOConfig), ("trl", trl.DPOTrainer, trl.DPOConfig)):
        dpo[name] = trainer_class(
            copy.deepcopy(model),
            ref_model=copy.deepcopy(model),
            args=config_class(output_dir=str(tmp_path / f"dpo-{name}"), **settings),
            train_dataset=pairs,
            processing_class=gpt2_tokenizer,
        )
    assert not dpo["ours"].prefix_sharing  # the auxiliary loss is TRL's, on TRL's rows
    examples = [dpo["trl"].train_dataset[i] for i in range(4)]
    losses = {}
    for name, trainer in dpo.items():
        batch = trainer._prepare_inputs(trainer.data_collator([dict(e) for e in examples]))
        losses[name] = trainer.compute_loss(trainer.model, batch)
    assert abs(losses["ours"].item() - losses["trl"].item()) <= 1e-6
    aux = [trainer._metrics["train"]["aux_loss"] for trainer in dpo.values()]
    assert aux[0] and aux[0] == aux[1]

    with pytest.raises(ValueError, match=r"router auxiliary loss .* has no \['simpo'\]"):
        DPOTrainer(
            copy.deepcopy(model),
            args=DPOConfig(output_dir=str(tmp_path / "simpo"), loss_type=["simpo"], **settings),
            train_dataset=pairs,
            processing_class=gpt2_tokenizer,
        )

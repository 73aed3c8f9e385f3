"""Prefix sharing is never silently wrong: on models whose token mixers do not follow a 4D attention mask
(convolutions, state-space layers, sliding windows) our DPO trainer falls back to TRL's layout with one log line,
and its loss equals stock TRL's on every model; attention-only models keep the shared-prefix layout."""

import copy
import logging

import datasets
import pytest
import torch
import transformers
import trl

from alignment.training import DPOConfig, DPOTrainer, layouts
from alignment.training.shared_prefix import SharedPrefixPreferenceCollator
from tests.conftest import preference_rows, tiny_causal_lms

VOCAB = 50257
SPECIAL = dict(bos_token_id=50256, eos_token_id=50256, pad_token_id=50256)
SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    **SPECIAL,
)


def lfm2():
    return transformers.Lfm2ForCausalLM(
        transformers.Lfm2Config(num_hidden_layers=3, layer_types=["conv", "full_attention", "conv"], **SIZES)
    )


def nemotron_h():
    return transformers.NemotronHForCausalLM(
        transformers.NemotronHConfig(
            num_hidden_layers=3,
            layers_block_type=["mamba", "attention", "mlp"],
            mamba_num_heads=4,
            mamba_head_dim=8,
            ssm_state_size=8,
            n_groups=1,
            **SIZES,
        )
    )


def mistral_sliding():
    return transformers.MistralForCausalLM(transformers.MistralConfig(num_hidden_layers=2, sliding_window=8, **SIZES))


MODELS = {
    "lfm2": (lfm2, "'conv'"),
    "nemotron-h": (nemotron_h, "'linear_attention'"),
    "mistral-sliding-window": (mistral_sliding, "sliding window of 8 tokens"),
    "llama": (tiny_causal_lms()["transformers-llama"], None),
    "ours": (tiny_causal_lms()["ours"], None),
}


def settings(tmp_path, config_class):
    return config_class(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        max_steps=1,
        report_to="none",
        save_strategy="no",
        bf16=False,
        use_cpu=True,
        seed=0,
        beta=0.1,
        max_length=64,
    )


@pytest.mark.parametrize("name", list(MODELS))
def test_dpo_loss_equals_stock_trl_on_every_kind_of_model(name, tmp_path, gpt2_tokenizer, caplog):
    build, reason = MODELS[name]
    torch.manual_seed(0)
    reference = build().float()
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    data = datasets.Dataset.from_list(preference_rows(8))
    with caplog.at_level(logging.WARNING, logger="alignment.training.dpo"):
        ours = DPOTrainer(
            copy.deepcopy(policy),
            copy.deepcopy(reference),
            settings(tmp_path, DPOConfig),
            train_dataset=data,
            processing_class=gpt2_tokenizer,
        )
    stock = trl.DPOTrainer(
        copy.deepcopy(policy),
        copy.deepcopy(reference),
        settings(tmp_path, trl.DPOConfig),
        train_dataset=data,
        processing_class=gpt2_tokenizer,
    )
    lines = [r.getMessage() for r in caplog.records if "prefix_sharing is off" in r.getMessage()]
    if reason is None:
        assert lines == [] and ours.prefix_sharing
        assert isinstance(ours.data_collator, SharedPrefixPreferenceCollator)
    else:
        assert len(lines) == 1 and reason in lines[0], lines
        assert not ours.prefix_sharing and not isinstance(ours.data_collator, SharedPrefixPreferenceCollator)

    examples = [ours.train_dataset[i] for i in range(4)]
    ours_batch = ours._prepare_inputs(ours.data_collator([dict(e) for e in examples]))
    stock_batch = stock._prepare_inputs(stock.data_collator([stock.train_dataset[i] for i in range(4)]))
    ours_loss = ours.compute_loss(ours.model, ours_batch).item()
    stock_loss = stock.compute_loss(stock.model, stock_batch).item()
    assert abs(ours_loss - stock_loss) <= 1e-5, (ours_loss, stock_loss)


def test_the_probe_finds_a_leaking_model_that_its_config_does_not_reveal(monkeypatch):
    """Without the config rules, the probe alone still sees LFM2's convolutions carry state across replies."""
    from alignment.training.logprobs import add_logprob_head

    torch.manual_seed(0)
    monkeypatch.setattr(layouts, "config_problem", lambda config, max_length: None)
    leaking = add_logprob_head(lfm2().float())
    assert "differ by" in layouts.prefix_sharing_problem(leaking, 64)
    exact = add_logprob_head(tiny_causal_lms()["transformers-llama"]())
    assert layouts.prefix_sharing_problem(exact, 64) is None
    assert exact.training  # the probe puts the training mode back


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"model_type": "mamba"}, "recurrent"),
        ({"layer_types": ["full_attention", "sliding_attention"], "sliding_window": 4096}, None),
        ({"sliding_window": 16, "use_sliding_window": False}, None),
        ({"sliding_window": 16}, "sliding window of 16"),
        ({"hybrid_override_pattern": "M-M*-"}, "'mamba'"),
    ],
)
def test_config_rules(fields, expected):
    config = type("Config", (), {"model_type": "x", **fields})()
    problem = layouts.config_problem(config, max_length=1024)
    assert (problem is None) if expected is None else (expected in problem), problem

"""Our DPO trainer: parity with stock TRL, the shared-prefix layout, the reference it builds, variants, any LM."""

import copy
import logging
import math

import datasets
import pytest
import torch
import trl

from alignment import ATTN_IMPLEMENTATION
from alignment.training import DPOTrainer
from alignment.training.configs import DPOConfig
from alignment.training.logprobs import add_logprob_head
from alignment.training.losses import TRL_LOSS_TYPES, preference_loss
from tests.conftest import preference_rows, tiny_causal_lms

METRICS = [
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
]


def config(tmp_path, config_class=DPOConfig, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        max_steps=2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        learning_rate=1e-3,
        bf16=False,
        seed=0,
        beta=0.1,
    )
    return config_class(**{**settings, **overrides})


def batch_of(trainer, n=4):
    """The same n prepared examples, collated in this trainer's own layout."""
    return trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(n)]))


def trained_pair(seed=0, model_name="ours"):
    """A policy that differs from its reference, so the rewards are not all zero."""
    torch.manual_seed(seed)
    reference = tiny_causal_lms()[model_name]()
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy, reference


def data():
    return datasets.Dataset.from_list(preference_rows())


@pytest.mark.parametrize("prefix_sharing", [True, False], ids=["shared-prefix", "trl-layout"])
@pytest.mark.parametrize("model_name", ["ours", "transformers-llama"])
def test_loss_metrics_and_gradients_equal_stock_trl(tmp_path, gpt2_tokenizer, prefix_sharing, model_name):
    policy, reference = trained_pair(model_name=model_name)
    ours = DPOTrainer(
        copy.deepcopy(policy),
        copy.deepcopy(reference),
        config(tmp_path, prefix_sharing=prefix_sharing),
        train_dataset=data(),
        processing_class=gpt2_tokenizer,
    )
    stock = trl.DPOTrainer(
        copy.deepcopy(policy),
        copy.deepcopy(reference),
        config(tmp_path, trl.DPOConfig),
        train_dataset=data(),
        processing_class=gpt2_tokenizer,
    )
    ours_batch, stock_batch = batch_of(ours), batch_of(stock)
    if prefix_sharing:  # each prompt once, no padding between pairs
        assert ours_batch["input_ids"].numel() < stock_batch["attention_mask"].sum()
    ours_loss = ours.compute_loss(ours.model, ours_batch)
    stock_loss = stock.compute_loss(stock.model, stock_batch)
    assert abs(ours_loss.item() - stock_loss.item()) <= 1e-5
    assert abs(ours_loss.item() - math.log(2)) > 1e-3  # the policy really differs from the reference
    for name in METRICS + ["num_tokens"]:
        assert abs(ours._metrics["train"][name][-1] - stock._metrics["train"][name][-1]) <= 1e-5, name
    ours_loss.backward()
    stock_loss.backward()
    for (name, a), b in zip(ours.model.named_parameters(), stock.model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_shared_prefix_with_truncation_and_several_pairs_per_row(tmp_path, gpt2_tokenizer):
    rows = preference_rows(6)
    rows[0]["prompt"] = rows[0]["prompt"] * 4  # a long prompt: its pair fills a row, and its replies get cut
    policy, reference = trained_pair()
    kwargs = dict(train_dataset=datasets.Dataset.from_list(rows), processing_class=gpt2_tokenizer)
    shared = DPOTrainer(copy.deepcopy(policy), copy.deepcopy(reference), config(tmp_path, max_length=80), **kwargs)
    plain = DPOTrainer(
        copy.deepcopy(policy), copy.deepcopy(reference), config(tmp_path, max_length=80, prefix_sharing=False), **kwargs
    )
    shared_batch, plain_batch = batch_of(shared, 6), batch_of(plain, 6)
    assert shared_batch["attention_mask"].size(0) < 6  # pairs packed several to a row
    assert (plain_batch["attention_mask"].sum(-1) == 80).any()  # some replies really were truncated
    a = shared.scored_tokens(shared.model, shared_batch).reply_logps()
    b = plain.scored_tokens(plain.model, plain_batch).reply_logps()
    for field in ("chosen", "rejected", "chosen_length", "rejected_length"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), atol=1e-5, rtol=0)
    shared.compute_loss(shared.model, shared_batch).backward()
    plain.compute_loss(plain.model, plain_batch).backward()
    for (name, x), y in zip(shared.model.named_parameters(), plain.model.parameters()):
        torch.testing.assert_close(x.grad, y.grad, atol=1e-5, rtol=1e-4, msg=name)


def drop_the_layout(attention: torch.nn.Module) -> None:
    """A layer that does not pass its keyword arguments on to the attention function, as some architectures do."""
    forward = attention.forward
    attention.forward = lambda *args, attention_layout=None, **kwargs: forward(*args, **kwargs)


@pytest.mark.parametrize("model_name", ["ours", "transformers-llama", "transformers-llama-dropping-the-layout"])
def test_padding_free_batches_give_the_padded_rows_results(tmp_path, gpt2_tokenizer, model_name, caplog):
    """Our GPT-2, and a transformers Llama moved from sdpa onto our kernel (one log line), are given the real tokens
    alone and the attention rows apart (`attention_layout`): the same log-probs, loss and gradients as the padded
    rows. A model whose layers would not pass the layout on keeps the padded rows and sdpa, said in one line."""
    rows = preference_rows(6)
    rows[0]["prompt"] = rows[0]["prompt"] * 3  # one long pair, so the others' rows are padded up to it
    dropping = model_name.endswith("dropping-the-layout")
    policy, reference = trained_pair(model_name=model_name.removesuffix("-dropping-the-layout"))
    if dropping:
        for model in (policy, reference):
            for layer in model.model.layers:
                drop_the_layout(layer.self_attn)
    with caplog.at_level(logging.INFO, logger="alignment.training.dpo"):
        trainer = DPOTrainer(
            policy, reference, config(tmp_path), train_dataset=datasets.Dataset.from_list(rows),
            processing_class=gpt2_tokenizer,
        )  # fmt: skip
    examples = [trainer.train_dataset[i] for i in range(6)]
    implementations = {m.config._attn_implementation for m in (trainer.model, trainer.ref_model)}
    if dropping:
        assert not trainer.data_collator.padding_free and implementations == {"sdpa"}
        assert "attention_layout" not in trainer.data_collator(examples)
        assert "keep their padding: our kernel cannot run it without padding" in caplog.text
        return
    assert trainer.data_collator.padding_free
    if model_name == "transformers-llama":
        assert (
            implementations == {ATTN_IMPLEMENTATION} and "so that shared-prefix batches carry no padding" in caplog.text
        )
    padded_collator = copy.copy(trainer.data_collator)
    padded_collator.padding_free = False
    free, padded = (trainer._prepare_inputs(c(examples)) for c in (trainer.data_collator, padded_collator))
    layout = free["attention_layout"]
    assert layout.shape == padded["input_ids"].shape and free["input_ids"].shape == (1, int((layout >= 0).sum()))
    assert free["input_ids"].numel() < 0.9 * padded["input_ids"].numel()  # the padding really is gone
    assert torch.equal(free["input_ids"][0], padded["input_ids"][layout >= 0])
    losses, grads = [], []
    for batch in (free, padded):
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in trainer.model.parameters()])
    assert abs(losses[0] - math.log(2)) > 1e-3 and abs(losses[0] - losses[1]) <= 1e-6
    for (name, _), a, b in zip(trainer.model.named_parameters(), *grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_step_zero_loss_is_ln2_with_a_frozen_copy_as_reference(tmp_path, gpt2_tokenizer):
    torch.manual_seed(0)
    model = tiny_causal_lms()["ours"]()  # built in memory: stock TRL could not reload it by name
    trainer = DPOTrainer(model, args=config(tmp_path), train_dataset=data(), processing_class=gpt2_tokenizer)
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
    trainer = DPOTrainer(
        policy, reference, config(tmp_path, prefix_sharing=False), train_dataset=data(), processing_class=gpt2_tokenizer
    )
    batch = batch_of(trainer)
    whole = {**batch, "completion_mask": batch["attention_mask"]}  # score prompt and reply tokens
    with torch.no_grad():

        def loss(inputs):
            return preference_loss(
                trainer.scored_tokens(trainer.model, inputs).reply_logps(),
                trainer.scored_tokens(trainer.ref_model, inputs).reply_logps(),
                beta=0.1,
            ).loss

        assert abs(loss(batch).item() - loss(whole).item()) <= 1e-5
    assert not torch.equal(batch["completion_mask"], batch["attention_mask"])


@pytest.mark.parametrize("model_name", ["ours", "transformers-gpt2", "transformers-llama"])
def test_trains_any_causal_lm(tmp_path, gpt2_tokenizer, model_name):
    torch.manual_seed(0)
    trainer = DPOTrainer(
        tiny_causal_lms()[model_name](), args=config(tmp_path), train_dataset=data(), processing_class=gpt2_tokenizer
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert abs(losses[0] - math.log(2)) <= 1e-5


@pytest.mark.parametrize(
    "overrides",
    [
        {"loss_type": ["cdpo"], "label_smoothing": 0.1},
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
    trainer = DPOTrainer(policy, reference, args, train_dataset=data(), processing_class=gpt2_tokenizer)
    if args.reference_free:
        assert trainer.ref_model is None
    batch = batch_of(trainer)
    loss = trainer.compute_loss(trainer.model, batch)
    with torch.no_grad():
        scored = trainer.scored_tokens(trainer.model, batch)
        ref = None if args.reference_free else trainer.scored_tokens(add_logprob_head(reference), batch).reply_logps()
    expected = preference_loss(
        scored.reply_logps(),
        ref,
        beta=args.beta,
        loss_type=args.loss_type[0],
        label_smoothing=args.label_smoothing,
        simpo_gamma=args.simpo_gamma,
    ).loss
    if args.rpo_alpha:
        expected = expected + args.rpo_alpha * -scored.logps[~scored.rejected].mean()
        assert trainer._metrics["train"]["nll_loss"]
    assert abs(loss.item() - expected.item()) <= 1e-5
    loss.backward()


def test_lora_reference_is_the_base_model_with_the_adapter_off(tmp_path, gpt2_tokenizer):
    from peft import LoraConfig

    torch.manual_seed(0)
    model = tiny_causal_lms()["ours"]()
    original = add_logprob_head(copy.deepcopy(model))  # LoRA wraps `model` in place
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], task_type="CAUSAL_LM")
    trainer = DPOTrainer(
        model,
        args=config(tmp_path, learning_rate=1e-2),
        peft_config=peft_config,
        train_dataset=data(),
        processing_class=gpt2_tokenizer,
    )
    assert trainer.ref_model is None  # no second copy of the weights
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    trainer.train()
    batch = batch_of(trainer)
    with torch.no_grad():
        reference = trainer.reference_logps(batch, None)
        base = trainer.scored_tokens(original, batch).reply_logps()
        policy = trainer.scored_tokens(trainer.model, batch).reply_logps()
    torch.testing.assert_close(reference.chosen, base.chosen)
    assert not torch.allclose(policy.chosen, reference.chosen)  # the adapter learned something


def test_config_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match="beta must be > 0"):
        config(tmp_path, beta=0.0)
    with pytest.raises(ValueError, match="unknown loss_type"):
        config(tmp_path, loss_type=["nca"])


def test_precomputed_reference_logps_are_cached_on_disk(tmp_path, gpt2_tokenizer, monkeypatch):
    policy, reference = trained_pair()
    calls = []

    def run(rows):
        args = config(tmp_path, precompute_ref_log_probs=True, ref_logps_cache_dir=str(tmp_path / "cache"))
        trainer = DPOTrainer(
            copy.deepcopy(reference),
            None,
            args,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=gpt2_tokenizer,
        )
        return trainer, trainer.train_dataset

    original = DPOTrainer.compute_ref_log_probs
    monkeypatch.setattr(DPOTrainer, "compute_ref_log_probs", lambda *a: calls.append(1) or original(*a))
    first_trainer, first = run(preference_rows())
    computed = len(calls)
    assert computed > 0 and len(list((tmp_path / "cache").iterdir())) == 1
    _, second = run(preference_rows())
    assert len(calls) == computed  # read back, not recomputed
    assert second["ref_chosen_logps"] == first["ref_chosen_logps"]
    assert second["ref_rejected_logps"] == first["ref_rejected_logps"]
    # the cached values are the reference's log-probs, and the loss from them equals the live reference's
    batch = batch_of(first_trainer)
    with torch.no_grad():
        live = first_trainer.scored_tokens(add_logprob_head(reference), batch).reply_logps()
    torch.testing.assert_close(batch["ref_chosen_logps"], live.chosen, atol=1e-5, rtol=0)
    changed = preference_rows()
    changed[0]["chosen"] = " something else"
    run(changed)
    assert len(calls) > computed and len(list((tmp_path / "cache").iterdir())) == 2  # new data, new key


TRL_LOSS_CASES = {
    **{
        name: {"loss_type": [name]}
        for name in sorted(set(TRL_LOSS_TYPES) - {"exo_pair", "robust", "aot", "aot_unpaired"})
    },
    "exo_pair": {"loss_type": ["exo_pair"], "label_smoothing": 1e-3},
    "robust": {"loss_type": ["robust"], "label_smoothing": 0.1},
    "aot": {"loss_type": ["aot"], "label_smoothing": 0.1},
    "aot_unpaired": {"loss_type": ["aot_unpaired"], "label_smoothing": 0.1},
    "mpo": {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
    "discopop-tau": {"loss_type": ["discopop"], "discopop_tau": 0.5},
    "f-forward_kl": {"loss_type": ["sigmoid"], "f_divergence_type": "forward_kl"},
    "f-js_divergence": {"loss_type": ["ipo", "hinge"], "f_divergence_type": "js_divergence"},
    "f-alpha_divergence": {
        "loss_type": ["sigmoid_norm", "robust", "exo_pair", "discopop", "sft"],
        "label_smoothing": 0.1,
        "f_divergence_type": "alpha_divergence",
        "f_alpha_divergence_coef": 0.3,
    },
    "wpo": {"loss_type": ["sigmoid", "bco_pair"], "use_weighting": True},  # TRL 1.16 fails on WPO with sft
    "ld_alpha": {"loss_type": ["sigmoid", "ipo", "nca_pair"], "ld_alpha": 0.3},
    "wpo-ld_alpha": {"loss_type": ["apo_zero"], "use_weighting": True, "ld_alpha": 0.0},
}


TRL_ATTRIBUTES = {  # where stock TRL keeps each setting once its __init__ has read it
    "loss_type": "loss_types",
    "loss_weights": "loss_weights",
    "label_smoothing": "label_smoothing",
    "f_divergence_type": "f_divergence_type",
    "f_alpha_divergence_coef": "f_alpha_divergence_coef",
    "use_weighting": "use_weighting",
    "ld_alpha": "ld_alpha",
}
DEFAULT_LOSS_SETTINGS = {
    "loss_type": ["sigmoid"], "loss_weights": None, "label_smoothing": 0.0, "f_divergence_type": "reverse_kl",
    "f_alpha_divergence_coef": 1.0, "use_weighting": False, "ld_alpha": None, "discopop_tau": 0.05,
}  # fmt: skip


@pytest.fixture(scope="module")
def trainer_pairs(tmp_path_factory, gpt2_tokenizer):
    """Ours and stock TRL's trainer on the same policy, reference and batch, per (model, layout): built once, each
    loss case then set on both (WPO's log Σp² is asked of TRL's kernel at build time, so it is built with it)."""
    pairs = {}
    for model_name, prefix_sharing in LAYOUTS:
        policy, reference = trained_pair(model_name=model_name)
        folder = tmp_path_factory.mktemp(f"{model_name}-{prefix_sharing}")
        pairs[model_name, prefix_sharing] = [
            trainer_class(
                copy.deepcopy(policy),
                copy.deepcopy(reference),
                config(folder / name, config_class, **extra),
                train_dataset=data(),
                processing_class=gpt2_tokenizer,
            )
            for name, trainer_class, config_class, extra in (
                ("ours", DPOTrainer, DPOConfig, {"prefix_sharing": prefix_sharing}),
                ("trl", trl.DPOTrainer, trl.DPOConfig, {"use_weighting": True}),
            )
        ]
    return pairs


def set_loss(trainers, settings):
    ours, stock = trainers
    settings = {**DEFAULT_LOSS_SETTINGS, **settings}
    for key, value in settings.items():
        setattr(ours.args, key, value)
        setattr(stock.args, key, value)
        if key in TRL_ATTRIBUTES:
            setattr(
                stock,
                TRL_ATTRIBUTES[key],
                value if key != "loss_weights" else value or [1.0] * len(settings["loss_type"]),
            )


LAYOUTS = [("ours", True), ("ours", False), ("transformers-llama", True), ("transformers-llama", False)]


@pytest.mark.parametrize(
    ("model_name", "prefix_sharing"),
    LAYOUTS,
    ids=["ours-shared-prefix", "ours-trl-layout", "llama-shared-prefix", "llama-trl-layout"],
)
@pytest.mark.parametrize("case", list(TRL_LOSS_CASES))
def test_every_trl_loss_type_equals_stock_trl(trainer_pairs, case, model_name, prefix_sharing):
    """Loss (to 1e-5, relative above 1), logged metrics and gradients equal stock TRL's on the same batch."""
    trainers = trainer_pairs[model_name, prefix_sharing]
    set_loss(trainers, TRL_LOSS_CASES[case])
    for trainer in trainers:
        trainer.model.zero_grad(set_to_none=True)
    losses = [trainer.compute_loss(trainer.model, batch_of(trainer)) for trainer in trainers]
    assert abs(losses[0].item() - losses[1].item()) <= 1e-5 * max(1.0, abs(losses[1].item())), losses
    for name in METRICS:
        assert abs(trainers[0]._metrics["train"][name][-1] - trainers[1]._metrics["train"][name][-1]) <= 1e-5, name
    for loss in losses:
        loss.backward()
    for (name, a), b in zip(trainers[0].model.named_parameters(), trainers[1].model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_label_smoothing_is_refused_where_trl_ignores_it(tmp_path):
    with pytest.raises(ValueError, match=r"label_smoothing is read only by .*for conservative DPO use loss_type: cdpo"):
        config(tmp_path, loss_type=["sigmoid"], label_smoothing=0.1)
    with pytest.raises(ValueError, match="exo_pair needs label_smoothing > 0"):
        config(tmp_path, loss_type=["exo_pair"])

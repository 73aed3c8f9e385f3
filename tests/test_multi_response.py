"""Multi-response prefix sharing: the pairs of a batch that share a prompt are one sequence [prompt, u1, u2, …] over
their distinct replies, and every pair's log-probs, loss and gradients equal those of the per-pair layout
([prompt, chosen, rejected] each) and of TRL's padded rows; `group_pairs_by_prompt` brings a prompt's pairs into
the same batches."""

import copy
import itertools
import math

import datasets
import pytest
import torch
import trl

from alignment.training import DPOTrainer
from alignment.training.configs import DPOConfig
from alignment.training.layouts import score_batch, trl_layout
from alignment.training.logprobs import add_logprob_head
from alignment.training.losses import ReplyLogps, preference_loss
from alignment.training.shared_prefix import (
    GROUP_WIDTH,
    PromptGroupedSampler,
    SharedPrefixPreferenceCollator,
    prompt_sequences,
    truncate_pair,
)
from tests.conftest import tiny_causal_lms

MAX_LENGTH = 26  # cuts prompt A's two longest completions and makes prompt C's first two replies equal
FIELDS = ("chosen", "rejected", "chosen_length", "rejected_length")


def pair(prompt, chosen, rejected):
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}


def token_pairs():
    """Pairs in a shuffled order: prompt A with 4 completions and all 6 pairs of them (each completion in 3 pairs),
    a singleton, prompt B with a pair whose chosen == rejected and a pair sharing that reply, prompt C whose first
    two replies differ only after MAX_LENGTH, and a pair with no prompt; precomputed reference log-probs on each."""
    generator = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(0, 1000, (n,), generator=generator).tolist()

    prompt_a, completions = ids(20), [ids(n) for n in (7, 5, 9, 6)]
    rows = [pair(prompt_a, completions[i], completions[j]) for i, j in itertools.combinations(range(4), 2)]
    rows.append(pair(ids(12), ids(6), ids(4)))
    prompt_b, same = ids(15), ids(5)
    rows += [pair(prompt_b, same, same), pair(prompt_b, ids(8), same)]
    prompt_c, start = ids(20), ids(6)
    rows += [pair(prompt_c, start + ids(2), ids(3)), pair(prompt_c, start + ids(1), ids(3))]
    rows.append(pair([], ids(4), ids(3)))
    order = torch.randperm(len(rows), generator=generator).tolist()
    return [{**rows[i], "ref_chosen_logps": -float(i), "ref_rejected_logps": -2.0 * i} for i in order], prompt_c


def scored_and_gradients(model, batch, reference):
    """Per-pair log-probs (plain and LD-DPO's), WPO's weights, and the loss and gradients of DPO's loss plus a
    WPO-weighted LD-DPO loss (which read WPO's log Σp² and ld_alpha's per-token index)."""
    scored = score_batch(model, batch, with_log_sum_sq=True)
    plain, shortened, weights = scored.reply_logps(), scored.reply_logps(ld_alpha=0.3), scored.wpo_weights()
    loss = (
        preference_loss(plain, reference, beta=0.1).loss
        + preference_loss(shortened, reference, beta=0.1, weights=weights).loss
    )
    names, parameters = zip(*model.named_parameters())
    gradients = dict(zip(names, torch.autograd.grad(loss, parameters)))
    detached = [ReplyLogps(*(getattr(logps, f).detach() for f in FIELDS)) for logps in (plain, shortened)]
    return (*detached, weights, loss.detach(), gradients)


@pytest.mark.parametrize(
    ("model_name", "max_length"),
    [("ours", None), ("ours", MAX_LENGTH), ("transformers-gpt2", MAX_LENGTH), ("transformers-llama", MAX_LENGTH)],
    ids=["ours-whole", "ours-truncated", "gpt2-truncated", "llama-truncated"],
)
def test_merged_layout_equals_per_pair_and_trl_layouts(model_name, max_length):
    torch.manual_seed(0)
    model = add_logprob_head(tiny_causal_lms()[model_name]().eval())
    examples, prompt_c = token_pairs()
    merged = SharedPrefixPreferenceCollator(0, max_length)(examples)
    per_pair = SharedPrefixPreferenceCollator(0, max_length, merge_prompts=False)(examples)
    truncated = [dict(zip(("prompt_ids", "chosen_ids", "rejected_ids"), truncate_pair(
        e["prompt_ids"], e["chosen_ids"], e["rejected_ids"], max_length))) for e in examples]  # fmt: skip
    padded = trl_layout(truncated, pad_token_id=0)

    # the prompt is computed once per group and each distinct reply once, with the batch's counts unchanged
    assert merged["input_ids"].numel() < 0.6 * per_pair["input_ids"].numel()
    assert len(merged["score_unique"]) < 0.6 * len(merged["score_inverse"])
    for key in ("pair_lengths", "num_tokens", "ref_chosen_logps", "ref_rejected_logps"):
        assert torch.equal(merged[key], per_pair[key]), key
    assert merged["ref_chosen_logps"].tolist() == [e["ref_chosen_logps"] for e in examples]  # in pair order
    sequences, _ = prompt_sequences([tuple(e.values()) for e in truncated])
    assert len(sequences) == 5  # prompts A, B, C, the singleton and the empty prompt
    (replies_c,) = [s.replies for s in sequences if s.prompt == prompt_c]
    assert len(replies_c) == (3 if max_length else 4)  # cut to the same tokens, C's first two replies are one

    reference = ReplyLogps(merged["ref_chosen_logps"], merged["ref_rejected_logps"], None, None)
    results = {
        name: scored_and_gradients(model, batch, reference)
        for name, batch in (("merged", merged), ("per-pair", per_pair), ("trl", padded))
    }
    for other in ("per-pair", "trl"):
        (a_plain, a_short, a_weights, a_loss, a_grads), (b_plain, b_short, b_weights, b_loss, b_grads) = (
            results["merged"], results[other],
        )  # fmt: skip
        for field in FIELDS:
            torch.testing.assert_close(getattr(a_plain, field), getattr(b_plain, field), atol=1e-5, rtol=0)
            torch.testing.assert_close(getattr(a_short, field), getattr(b_short, field), atol=1e-5, rtol=0)
        torch.testing.assert_close(a_weights, b_weights, atol=1e-5, rtol=1e-5)
        assert abs(a_loss.item() - b_loss.item()) <= 1e-5
        for name, grad in a_grads.items():
            torch.testing.assert_close(grad, b_grads[name], atol=1e-5, rtol=1e-4, msg=f"{other}: {name}")
    plain = results["merged"][0]
    assert (plain.chosen == plain.rejected).any() and not torch.allclose(plain.chosen, plain.rejected)


def test_many_replies_to_one_prompt_open_more_sequences_and_stay_exact():
    """A prompt's sequence holds at most GROUP_WIDTH times the longest pair; the replies beyond it go into another
    sequence with the prompt again, and the log-probs do not change."""
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 1000, (4,), generator=generator).tolist()
    replies = [torch.randint(0, 1000, (6,), generator=generator).tolist() for _ in range(10)]
    examples = [pair(prompt, replies[i], replies[i + 1]) for i in range(0, 10, 2)]  # 5 pairs, 10 distinct replies
    merged = SharedPrefixPreferenceCollator(0)(examples)
    sequences, _ = prompt_sequences([tuple(e.values()) for e in examples])
    assert [len(s) for s in sequences] == [4 + 24, 4 + 24, 4 + 12]  # capacity 2 × 16 = 32: four replies a sequence
    assert merged["input_ids"].size(1) <= GROUP_WIDTH * 16
    torch.manual_seed(0)
    model = add_logprob_head(tiny_causal_lms()["ours"]().eval())
    with torch.no_grad():
        a = score_batch(model, merged).reply_logps()
        b = score_batch(model, trl_layout(examples, pad_token_id=0)).reply_logps()
    for field in FIELDS:
        torch.testing.assert_close(getattr(a, field), getattr(b, field), atol=1e-5, rtol=0)


# --- the trainer, against stock TRL ---------------------------------------------------------------------------


def ultrafeedback_like(prompts=4):
    """4 completions per prompt and all 6 pairs of them, in prompt order, as text."""
    rows = []
    for p in range(prompts):
        prompt = f"\n\nHuman: What is {p} + {p + 2}? Please answer briefly and show the steps.\n\nAssistant:"
        completions = [
            f" {2 * p + 2}",
            f" It is {2 * p + 3}, I think.",
            f" {p} plus {p + 2} makes {2 * p + 2}.",
            " No.",
        ]
        for i, j in itertools.combinations(range(4), 2):
            rows.append({"prompt": prompt, "chosen": completions[i], "rejected": completions[j]})
    return datasets.Dataset.from_list(rows)


def config(tmp_path, config_class=DPOConfig, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=8, max_steps=2, logging_steps=1,
        report_to="none", save_strategy="no", learning_rate=1e-3, bf16=False, seed=0, beta=0.1,
    )  # fmt: skip
    return config_class(**{**settings, **overrides})


def trained_pair(model_name):
    torch.manual_seed(0)
    reference = tiny_causal_lms()[model_name]()
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy, reference


def test_trainer_loss_metrics_and_gradients_equal_stock_trl(tmp_path, gpt2_tokenizer):
    """With truncation and precomputed reference log-probs (computed by each trainer over its own batches)."""
    extra = {"max_length": 30, "precompute_ref_log_probs": True}
    policy, reference = trained_pair("ours")
    kwargs = dict(train_dataset=ultrafeedback_like(2), processing_class=gpt2_tokenizer)
    cache = {"ref_logps_cache_dir": str(tmp_path / "cache")}
    ours = DPOTrainer(
        copy.deepcopy(policy), copy.deepcopy(reference), config(tmp_path / "ours", **extra, **cache), **kwargs
    )
    stock = trl.DPOTrainer(
        copy.deepcopy(policy), copy.deepcopy(reference), config(tmp_path / "trl", trl.DPOConfig, **extra), **kwargs
    )
    examples = [ours.train_dataset[i] for i in range(8)]  # prompt 0's 6 pairs and 2 of prompt 1's
    ours_batch = ours._prepare_inputs(ours.data_collator(examples))
    stock_batch = stock._prepare_inputs(stock.data_collator([stock.train_dataset[i] for i in range(8)]))
    collator = ours.data_collator
    per_pair = SharedPrefixPreferenceCollator(collator.pad_token_id, collator.max_length, False, collator.padding_free)
    assert ours_batch["input_ids"].numel() < 0.6 * per_pair(examples)["input_ids"].numel()
    assert (stock_batch["attention_mask"].sum(-1) == extra["max_length"]).any()  # replies really were cut
    assert "ref_chosen_logps" in ours_batch
    ours_loss = ours.compute_loss(ours.model, ours_batch)
    stock_loss = stock.compute_loss(stock.model, stock_batch)
    assert abs(ours_loss.item() - stock_loss.item()) <= 1e-5
    assert abs(ours_loss.item() - math.log(2)) > 1e-3  # the policy really differs from the reference
    for name in ("rewards/chosen", "rewards/margins", "logps/chosen", "logps/rejected", "num_tokens"):
        assert abs(ours._metrics["train"][name][-1] - stock._metrics["train"][name][-1]) <= 1e-5, name
    ours_loss.backward()
    stock_loss.backward()
    for (name, a), b in zip(ours.model.named_parameters(), stock.model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


# --- grouping a prompt's pairs into the same batches ----------------------------------------------------------


def test_prompt_grouped_sampler_keeps_a_prompts_pairs_together_in_a_seeded_order():
    prompts = [[p] for p in (0, 1, 0, 2, 1, 0, 3, 2)]
    sampler = PromptGroupedSampler(prompts, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(8)) and len(sampler) == 8
    runs = [prompts[i][0] for i in first]
    assert [k for k, _ in itertools.groupby(runs)] == list(dict.fromkeys(runs))  # each prompt in one run
    second = list(sampler)  # the next epoch: another order
    assert second != first
    again = PromptGroupedSampler(prompts, seed=3)
    again.set_epoch(1)
    assert list(again) == second  # seed + epoch fix the order, as a resumed run needs
    assert list(PromptGroupedSampler(prompts, seed=4)) != first


def test_group_pairs_by_prompt_batches_a_prompts_pairs_together(tmp_path, gpt2_tokenizer):
    torch.manual_seed(0)
    args = config(tmp_path, group_pairs_by_prompt=True, per_device_train_batch_size=6, max_steps=1)
    trainer = DPOTrainer(
        tiny_causal_lms()["ours"](), args=args, train_dataset=ultrafeedback_like(4), processing_class=gpt2_tokenizer
    )
    loader = trainer.get_train_dataloader()
    prompts = trainer.train_dataset["prompt_ids"]
    batches = list(loader.batch_sampler)
    assert len(batches) == 4 and all(len({tuple(prompts[i]) for i in batch}) == 1 for batch in batches)
    loader.set_epoch(1)  # the trainer's epoch reaches the sampler
    assert list(loader.batch_sampler) != batches
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 1 and abs(losses[0] - math.log(2)) <= 1e-5


def test_group_pairs_by_prompt_is_refused_where_it_cannot_work(tmp_path, gpt2_tokenizer):
    with pytest.raises(ValueError, match="group_pairs_by_prompt only pays with prefix_sharing"):
        config(tmp_path, group_pairs_by_prompt=True, prefix_sharing=False)
    with pytest.raises(ValueError, match="group_pairs_by_prompt is its own shuffle.*'group_by_length'"):
        config(tmp_path, group_pairs_by_prompt=True, train_sampling_strategy="group_by_length")
    stream = ultrafeedback_like(1).to_iterable_dataset()
    with pytest.raises(ValueError, match="group_pairs_by_prompt needs a map-style dataset"):
        DPOTrainer(
            tiny_causal_lms()["ours"](),
            args=config(tmp_path, group_pairs_by_prompt=True),
            train_dataset=stream,
            processing_class=gpt2_tokenizer,
        )

"""Scoring pairs the trainer's way (shared prefix, packed, one pass for policy and reference) against the padded
rows of `reply_logps`: the same numbers, whatever the model, the batch size, or how the prompt tokenises.

`python -m tests.test_scoring` prints how much faster the shared-prefix path is (a benchmark, not a test)."""

import dataclasses
import logging
import time

import pytest
import torch
import transformers

from alignment.evaluation import preference_scores, reply_logps
from alignment.evaluation.scoring import _prompt_reply_ids, pair_entries, shared_prefix_logps
from alignment.training.shared_prefix import SharedPrefixPreferenceCollator
from tests.conftest import preference_rows, tiny_causal_lms

# The replies' prompt tokens differ: a merge across the prompt's end ("Assistant: " + "Hello" is " Hello"; "wor" +
# "ld" is "world") takes the prompt's last token for one reply and not for the other.
MERGING_PAIRS = [
    {"prompt": "\n\nHuman: Say hi.\n\nAssistant: ", "chosen": "Hello", "rejected": "\nNo thanks."},
    {"prompt": "\n\nHuman: Finish the word: hello wor", "chosen": "ld", "rejected": " there, I think."},
]


def pairs():
    rows = preference_rows(7)
    return rows[:3] + MERGING_PAIRS[:1] + rows[3:] + MERGING_PAIRS[1:]


def models(name, seed=0):
    torch.manual_seed(seed)
    policy = tiny_causal_lms()[name]().eval()
    reference = tiny_causal_lms()[name]().eval()
    return policy, reference


def test_merging_pairs_get_one_entry_per_reply(gpt2_tokenizer):
    for row in MERGING_PAIRS:
        (prompt_c, chosen, none), (prompt_r, nothing, rejected) = pair_entries(gpt2_tokenizer, row)
        assert prompt_c != prompt_r and none == [] and nothing == []
        assert gpt2_tokenizer.decode(prompt_c + chosen) == row["prompt"] + row["chosen"] + "<|endoftext|>"
        assert gpt2_tokenizer.decode(prompt_r + rejected) == row["prompt"] + row["rejected"] + "<|endoftext|>"
    assert len(pair_entries(gpt2_tokenizer, preference_rows(1)[0])) == 1


@pytest.mark.parametrize("name", list(tiny_causal_lms()))
def test_shared_prefix_equals_padded_rows(gpt2_tokenizer, name):
    policy, reference = models(name)
    rows = pairs()
    for batch_size in (3, len(rows)):  # fewer pairs a batch than pairs, and all at once
        (ours, theirs) = shared_prefix_logps([policy, reference], gpt2_tokenizer, rows, batch_size=batch_size)
        for model, logps in ((policy, ours), (reference, theirs)):
            for key in ("chosen", "rejected"):
                sums, lengths = reply_logps(
                    model, gpt2_tokenizer, [r["prompt"] for r in rows], [r[key] for r in rows], batch_size=batch_size
                )
                torch.testing.assert_close(getattr(logps, key), sums, atol=1e-5, rtol=0)
                assert torch.equal(getattr(logps, f"{key}_length"), lengths)
        for reference_model in (reference, None):
            shared = preference_scores(policy, reference_model, gpt2_tokenizer, rows, beta=0.5, batch_size=batch_size)
            padded = preference_scores(
                policy, reference_model, gpt2_tokenizer, rows, beta=0.5, batch_size=batch_size, prefix_sharing=False
            )
            for field in dataclasses.fields(shared):
                a, b = getattr(shared, field.name), getattr(padded, field.name)
                assert abs(a - b) <= 1e-5, (field.name, a, b)
    assert 0 < shared.reference_free_accuracy < 1  # the figures are not trivially equal


def test_one_pass_over_the_batches_without_gradients(gpt2_tokenizer):
    policy, reference = models("ours")
    calls = []
    for label, model in (("policy", policy), ("reference", reference)):
        model.transformer.register_forward_hook(lambda *_, label=label: calls.append(label))
    rows = pairs()
    logps = shared_prefix_logps([policy, reference], gpt2_tokenizer, rows, batch_size=4)
    assert calls == ["policy", "reference"] * 3  # each batch of 4 pairs collated once, run through both models
    assert not any(part.chosen.requires_grad for part in logps)
    calls.clear()
    preference_scores(policy, reference, gpt2_tokenizer, rows, batch_size=4, prefix_sharing=False)
    assert calls == ["policy"] * 6 + ["reference"] * 6  # chosen rows, rejected rows, per model


def test_a_model_the_packed_layout_would_not_fit_gets_padded_rows(gpt2_tokenizer, caplog):
    torch.manual_seed(0)
    mistral = transformers.MistralForCausalLM(
        transformers.MistralConfig(
            vocab_size=50257,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            sliding_window=8,
        )
    ).eval()  # pairs are longer than 8
    rows = pairs()
    with caplog.at_level(logging.WARNING, logger="alignment.evaluation.scoring"):
        scores = preference_scores(mistral, None, gpt2_tokenizer, rows, batch_size=4)
    assert "prefix sharing is off for this model" in caplog.text and "sliding window of 8" in caplog.text
    assert scores == preference_scores(mistral, None, gpt2_tokenizer, rows, batch_size=4, prefix_sharing=False)


def benchmark(num_pairs=64, batch_size=16, n_layer=6, n_embd=512, repeats=1):
    """Seconds per `preference_scores` call, padded rows against shared prefix, on HH-like synthetic pairs (GPT-2
    small's vocabulary, 6 layers x 512 by default, random weights). Wall and CPU seconds, best of `repeats`
    interleaved runs."""
    from alignment import AlignmentGPT2Config, AlignmentGPT2ForCausalLM
    from alignment.modeling.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("gpt2")
    torch.manual_seed(0)
    config = AlignmentGPT2Config(
        vocab_size=50257, n_positions=1024, n_embd=n_embd, n_layer=n_layer, n_head=max(1, n_embd // 64)
    )
    policy, reference = AlignmentGPT2ForCausalLM(config).eval(), AlignmentGPT2ForCausalLM(config).eval()
    words = [
        "the",
        "of",
        "and",
        "a",
        "to",
        "in",
        "is",
        "you",
        "that",
        "it",
        "he",
        "was",
        "for",
        "on",
        "are",
        "as",
        "with",
        "his",
        "they",
        "I",
        "at",
        "be",
        "this",
        "have",
        "from",
    ]
    rows = []
    for i in range(num_pairs):
        turns = "".join(
            f"\n\nHuman: {' '.join(words[(i + t + k) % len(words)] for k in range(20 + t))}"
            f"\n\nAssistant: {' '.join(words[(2 * i + k) % len(words)] for k in range(25))}"
            for t in range(3 + i % 3)
        )
        rows.append(
            {
                "prompt": f"{turns}\n\nHuman: What now?\n\nAssistant:",
                "chosen": " " + " ".join(words[(i + k) % len(words)] for k in range(20 + i % 20)),
                "rejected": " No, " + " ".join(words[(3 * i + k) % len(words)] for k in range(30 + i % 25)),
            }
        )
    n_tokens = sum(len(tokenizer(r["prompt"])["input_ids"]) for r in rows) / num_pairs
    print(
        f"{num_pairs} pairs, prompts of {n_tokens:.0f} tokens on average; GPT-2 {config.n_layer} layers x "
        f"{config.n_embd}; batch_size {batch_size}; {torch.get_num_threads()} CPU threads"
    )
    padded_tokens = shared_tokens = 0  # positions through each model, padding included
    collator = SharedPrefixPreferenceCollator(tokenizer.pad_token_id)
    for start in range(0, num_pairs, batch_size):
        batch = rows[start : start + batch_size]
        for key in ("chosen", "rejected"):
            padded_tokens += len(batch) * max(len(_prompt_reply_ids(tokenizer, r["prompt"], r[key])[0]) for r in batch)
        entries = [
            dict(zip(("prompt_ids", "chosen_ids", "rejected_ids"), e))
            for r in batch
            for e in pair_entries(tokenizer, r)
        ]
        shared_tokens += collator(entries)["input_ids"].numel()
    print(
        f"positions a model computes: {padded_tokens} padded, {shared_tokens} shared "
        f"({padded_tokens / shared_tokens:.2f}x fewer)"
    )
    wall, cpu = {False: float("inf"), True: float("inf")}, {False: float("inf"), True: float("inf")}
    for prefix_sharing in (False, True):  # warm-up
        preference_scores(policy, reference, tokenizer, rows[:2], batch_size=batch_size, prefix_sharing=prefix_sharing)
    for _ in range(repeats):  # interleaved, best of `repeats`: other processes only ever slow a run down
        for prefix_sharing in (False, True):
            start, start_cpu = time.perf_counter(), time.process_time()
            scores = preference_scores(
                policy, reference, tokenizer, rows, batch_size=batch_size, prefix_sharing=prefix_sharing
            )
            wall[prefix_sharing] = min(wall[prefix_sharing], time.perf_counter() - start)
            cpu[prefix_sharing] = min(cpu[prefix_sharing], time.process_time() - start_cpu)
            print(
                f"prefix_sharing={prefix_sharing!s:5}  best {wall[prefix_sharing]:6.2f} s wall, "
                f"{cpu[prefix_sharing]:6.2f} s CPU  {scores}"
            )
    print(
        f"speed-up {wall[False] / wall[True]:.2f}x wall, {cpu[False] / cpu[True]:.2f}x CPU "
        f"(policy and reference, {num_pairs} pairs)"
    )


if __name__ == "__main__":
    import sys

    benchmark(*map(int, sys.argv[1:]))  # [num_pairs [batch_size [n_layer [n_embd [repeats]]]]]

"""Scoring pairs the trainer's way (shared prefix, packed, one pass for policy and reference) against the padded
rows of `reply_logps`: the same numbers, whatever the model, the batch size, or how the prompt tokenises.

How much faster the shared-prefix path is: `python -m benchmarks.evaluation_speed` (a benchmark, not a test)."""

import dataclasses
import logging

import pytest
import torch

from alignment.evaluation import preference_scores, reply_logps
from alignment.evaluation.scoring import pair_entries, shared_prefix_logps
from tests.conftest import preference_rows, sliding_window_mistral, tiny_causal_lms

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
    mistral = sliding_window_mistral().eval()  # pairs are longer than 8
    rows = pairs()
    with caplog.at_level(logging.WARNING, logger="alignment.evaluation.scoring"):
        scores = preference_scores(mistral, None, gpt2_tokenizer, rows, batch_size=4)
    assert "prefix sharing is off for this model" in caplog.text and "sliding window of 8" in caplog.text
    assert scores == preference_scores(mistral, None, gpt2_tokenizer, rows, batch_size=4, prefix_sharing=False)

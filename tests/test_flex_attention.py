"""FlexAttention, measured as a lever for packed shared-prefix rows (`benchmarks/flex_attention.py`): its block mask
states the collator's visibility rule, its forward equals the formula, and on CPU torch refuses its backward (why
training here stays on SDPA; the day torch supports it, the last test says so)."""

import itertools
import warnings

import pytest
import torch

from alignment.modeling.attention import reference_attention, sdpa_attention
from alignment.training.shared_prefix import SharedPrefixPreferenceCollator
from benchmarks import flex_attention as bench

flex = pytest.importorskip("torch.nn.attention.flex_attention")


def test_the_dense_rule_is_the_collators_mask():
    # one row, sequences [prompt, chosen, rejected] of two pairs with different prompts, then nothing: the labels
    # the benchmark would give that layout make the mask the collator makes
    pairs = [([1, 2, 3], [4, 5], [6]), ([7, 8], [9], [10, 11, 12])]
    examples = [dict(prompt_ids=p, chosen_ids=c, rejected_ids=r) for p, c, r in pairs]
    batch = SharedPrefixPreferenceCollator(pad_token_id=0)(examples)
    rows = batch["attention_mask"].shape[0]
    assert rows == 2  # first-fit into rows as long as the longest sequence: one sequence a row
    sequence_ids = torch.tensor([[0] * 6, [1] * 6])
    reply_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 0, 1, 2, 2, 2]])
    assert torch.equal(bench.dense_mask(sequence_ids, reply_ids), batch["attention_mask"])


def test_labels_and_dense_mask_follow_the_rule_pair_by_pair():
    sequence_ids, reply_ids = bench.token_labels(rows=2, length=40, sequences=3)
    dense = bench.dense_mask(sequence_ids, reply_ids)
    for b, q, k in itertools.product(range(2), range(40), range(40)):
        same = sequence_ids[b, q] == sequence_ids[b, k]
        own = reply_ids[b, k] == 0 or reply_ids[b, k] == reply_ids[b, q]
        assert bool(dense[b, 0, q, k]) == bool(k <= q and same and own), (b, q, k)
    assert dense.any(-1).all()  # padding columns see themselves: no empty query row
    assert (reply_ids == 2).any() and not dense[:, 0][(reply_ids[:, :, None] == 2) & (reply_ids[:, None, :] == 1)].any()


def test_flex_forward_under_the_block_mask_equals_the_formula():
    torch.manual_seed(0)
    sequence_ids, reply_ids = bench.token_labels(rows=2, length=64, sequences=3)
    query, key, value = (torch.randn(2, 2, 64, 8) for _ in range(3))
    visible = bench.dense_mask(sequence_ids, reply_ids)
    mask = flex.create_block_mask(
        lambda b, h, q, k: bench.visible_rule(sequence_ids, reply_ids, b, q, k), 2, None, 64, 64, device="cpu",
        BLOCK_SIZE=16,
    )  # fmt: skip
    assert mask.sparsity() > 30  # hidden blocks are skipped, not computed
    expected = reference_attention(query, key, value, visible)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unfused (uncompiled) path, on purpose: no compile in the suite
        out = flex.flex_attention(query, key, value, block_mask=mask)
    assert (out - expected).abs().max() <= 1e-5
    assert (sdpa_attention(query, key, value, visible) - expected).abs().max() <= 1e-5


def test_flex_backward_on_cpu_is_refused_by_torch():
    sequence_ids, reply_ids = bench.token_labels(rows=1, length=32, sequences=2)
    mask = flex.create_block_mask(
        lambda b, h, q, k: bench.visible_rule(sequence_ids, reply_ids, b, q, k), 1, None, 32, 32, device="cpu",
        BLOCK_SIZE=16,
    )  # fmt: skip
    query, key, value = (torch.randn(1, 2, 32, 8) for _ in range(3))
    refusal = bench.flex_backward_refusal(query, key, value, mask)
    assert "does not support backward on CPU" in refusal  # if this fails, torch now trains with it: measure again

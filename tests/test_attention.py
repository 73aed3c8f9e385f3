"""The kernel against the formula: fast path vs reference, masks, gradients, rows without keys, dropout."""

import math

import pytest
import torch

from alignment.modeling.attention import attend, attention, build_visibility_mask, group_documents

B, H, T, D = 3, 4, 9, 16


def qkv(seed=0, t=T, s=None, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    s = t if s is None else s
    q = torch.randn(B, H, t, D, generator=g)
    k = torch.randn(B, H, s, D, generator=g)
    v = torch.randn(B, H, s, D, generator=g)
    return [x.requires_grad_(requires_grad) for x in (q, k, v)]


def left_padding():
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :5] = 0
    return mask


def right_padding():
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -2:] = 0
    mask[2, -6:] = 0
    return mask


def packed_segments():
    return torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2], [0] * 9, [0, 1, 1, 1, 1, 1, 1, 1, 1]])


CASES = {
    "no mask": dict(causal=False),
    "causal": dict(causal=True),
    "causal+left padding": dict(causal=True, attention_mask=left_padding()),
    "causal+right padding": dict(causal=True, attention_mask=right_padding()),
    "packed segments": dict(causal=True, segment_ids=packed_segments()),
    "segments+padding": dict(causal=True, segment_ids=packed_segments(), attention_mask=right_padding()),
}


def loop_attention(q, k, v, visible):
    """An independent statement of the formula: for each query, softmax over exactly the keys it can see."""
    out = torch.zeros_like(q)
    visible = visible.expand(q.size(0), q.size(1), q.size(2), k.size(2))
    for b in range(q.size(0)):
        for h in range(q.size(1)):
            for i in range(q.size(2)):
                keys = visible[b, h, i].nonzero().flatten()
                if len(keys) == 0:
                    continue
                scores = k[b, h, keys] @ q[b, h, i] / math.sqrt(q.size(-1))
                out[b, h, i] = torch.softmax(scores, dim=0) @ v[b, h, keys]
    return out


@pytest.mark.parametrize("case", CASES)
def test_reference_is_the_formula(case):
    q, k, v = qkv()
    masks = CASES[case]
    visible = build_visibility_mask(T, T, **masks)
    if visible is None:
        visible = torch.ones(1, 1, T, T, dtype=torch.bool)
    expected = loop_attention(q.double(), k.double(), v.double(), visible)
    got = attention(q.double(), k.double(), v.double(), implementation="reference", **masks)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_fast_path_matches_reference_values_and_gradients(case):
    masks = CASES[case]
    q1, k1, v1 = qkv(requires_grad=True)
    q2, k2, v2 = qkv(requires_grad=True)
    fast = attention(q1, k1, v1, implementation="sdpa", **masks)
    ref = attention(q2, k2, v2, implementation="reference", **masks)
    assert (fast - ref).abs().max().item() <= 1e-6
    weights = torch.randn_like(fast)
    (fast * weights).sum().backward()
    (ref * weights).sum().backward()
    for name, a, b in (("q", q1, q2), ("k", k1, k2), ("v", v1, v2)):
        assert (a.grad - b.grad).abs().max().item() <= 1e-5, name


def test_auto_uses_the_fast_path():
    q, k, v = qkv()
    assert torch.equal(attention(q, k, v), attention(q, k, v, implementation="sdpa"))


@pytest.mark.parametrize("implementation", ["sdpa", "reference"])
def test_rows_that_see_no_key_are_zero_and_finite(implementation):
    q, k, v = qkv(requires_grad=True)
    mask = left_padding()  # with causality, the first query of a left-padded row sees only padding
    out = attention(q, k, v, attention_mask=mask, implementation=implementation)
    assert torch.isfinite(out).all()
    assert torch.count_nonzero(out[1, :, :3]) == 0 and torch.count_nonzero(out[2, :, :5]) == 0
    assert torch.count_nonzero(out[0]) == out[0].numel()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_arbitrary_mask_shared_prompt_two_replies():
    """[prompt | reply A | reply B]: B sees the prompt but not A; equals attention over [prompt | B] alone."""
    p, a, b = 4, 3, 2
    n = p + a + b
    q, k, v = qkv(t=n)
    allowed = torch.ones(n, n, dtype=torch.bool)
    allowed[p + a :, p : p + a] = False  # reply B must not see reply A
    shared = attention(q, k, v, mask=allowed[None, None])
    keep = list(range(p)) + list(range(p + a, n))
    alone = attention(q[:, :, keep], k[:, :, keep], v[:, :, keep])
    torch.testing.assert_close(shared[:, :, p + a :], alone[:, :, p:], atol=1e-6, rtol=0)
    torch.testing.assert_close(shared[:, :, : p + a], attention(q[:, :, : p + a], k[:, :, : p + a], v[:, :, : p + a]))


def test_queries_after_a_cache_are_the_last_positions():
    q, k, v = qkv(t=T)
    full = attention(q, k, v)
    for tail in (1, 3):
        part = attention(q[:, :, -tail:], k, v, implementation="sdpa")
        ref = attention(q[:, :, -tail:], k, v, implementation="reference")
        torch.testing.assert_close(part, full[:, :, -tail:], atol=1e-6, rtol=0)
        torch.testing.assert_close(ref, full[:, :, -tail:], atol=1e-6, rtol=0)


@pytest.mark.parametrize("implementation", ["sdpa", "reference"])
def test_dropout_on_probabilities(implementation):
    q, k, v = qkv(t=4)
    v = torch.ones_like(v)  # each output coordinate is then the sum of the kept (rescaled) probabilities
    torch.manual_seed(0)
    dropped = attention(q, k, v, dropout_p=0.5, implementation=implementation)
    assert not torch.allclose(dropped, attention(q, k, v, implementation=implementation))
    torch.manual_seed(0)
    mean = torch.stack([attention(q, k, v, dropout_p=0.3, implementation=implementation) for _ in range(400)]).mean(0)
    torch.testing.assert_close(mean, torch.ones_like(mean), atol=0.15, rtol=0)  # unbiased: E[sum of probs] = 1
    assert torch.count_nonzero(attention(q, k, v, dropout_p=1.0, implementation=implementation)) == 0


def test_unknown_implementation_is_rejected():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="unknown attention implementation"):
        attention(q, k, v, implementation="magic")


def test_documents_are_regrouped_into_short_rows_of_whole_documents():
    segments = torch.tensor([[0, 0, 1, 2, 2, 2, 3, 3], [0, 0, 0, 1, 1, 2, 2, 2]])  # documents of 2,1,3,2 and 3,2,3
    groups = group_documents(segments)
    assert (groups.count, groups.length) == (6, 3)  # [2, 1] [3] [2] | [3] [2] [3]; 6 · 3² · 2 <= 2 · 8²
    tokens = torch.arange(16).view(2, 8)
    short_rows = groups.gather(tokens)
    assert short_rows.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 0], [8, 9, 10], [11, 12, 0], [13, 14, 15]]
    assert torch.equal(groups.scatter(short_rows, 2, 8), tokens)  # every token back in place, padding dropped
    visible = groups.visible[:, 0]
    assert visible[0].tolist() == [[True, False, False], [True, True, False], [False, False, True]]
    assert visible.any(dim=-1).all()  # a padding slot sees itself, so no row is empty


@pytest.mark.parametrize(
    "segments",
    [
        torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1]]),  # one long document: 2 short rows of 6 are no cheaper than 8²
        torch.tensor([[0, 0, 1, 1, 0, 0, 2, 2]]),  # an id that comes back: one document in two runs
    ],
)
def test_regrouping_is_refused_where_it_saves_nothing_or_would_split_a_document(segments):
    assert group_documents(segments) is None


@pytest.mark.parametrize("implementation", ["sdpa", "reference"])
def test_short_rows_give_the_packed_rows_values_and_gradients(implementation):
    segments = torch.tensor(
        [[0] * 5 + [1] * 3 + [2] * 7 + [3] * 2 + [4] * 6 + [5] * 1, [0] * 4 + [1] * 6 + [2] * 7 + [3] * 7]
    )
    groups = group_documents(segments)
    assert groups is not None and groups.count * groups.length**2 * 2 <= 2 * 24**2
    q, k, v = qkv(3, t=24, requires_grad=True)
    q, k, v = (x[:2].detach().requires_grad_() for x in (q, k, v))
    dense = attention(q, k, v, segment_ids=segments, implementation=implementation)
    dense_grads = torch.autograd.grad(dense.square().sum(), (q, k, v))

    def short_rows(x):  # (B, heads, S, d) -> (count, heads, length, d), as our GPT-2 gathers its q, k, v
        return groups.gather(x.transpose(1, 2)).transpose(1, 2)

    out = attend(short_rows(q), short_rows(k), short_rows(v), groups.visible, implementation=implementation)
    grouped = groups.scatter(out.transpose(1, 2), 2, 24).transpose(1, 2)
    grouped_grads = torch.autograd.grad(grouped.square().sum(), (q, k, v))
    torch.testing.assert_close(grouped, dense, atol=1e-6, rtol=0)
    for got, expected in zip(grouped_grads, dense_grads):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)

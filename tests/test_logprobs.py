"""The chunked log-prob head against the plain log_softmax-and-gather computation: values and gradients."""

import pytest
import torch
import transformers

from alignment import AlignmentGPT2Config, AlignmentGPT2ForCausalLM
from alignment.training.logprobs import (
    IGNORE_INDEX,
    HeadTransform,
    add_logprob_head,
    logprobs_of_targets,
    token_logps_from_hidden,
)


def naive(hidden, weight, targets, bias=None):
    logits = hidden @ weight.t() + (0 if bias is None else bias)
    return torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk_rows", [3, 1024])
def test_values_and_gradients_match_the_naive_computation(with_bias, chunk_rows):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 8, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(13, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 13, (10,), generator=g)
    ours = logprobs_of_targets(hidden, weight, targets, bias, chunk_rows)
    torch.testing.assert_close(ours, naive(hidden, weight, targets, bias), atol=1e-12, rtol=0)
    inputs = (hidden, weight) + ((bias,) if with_bias else ())
    assert torch.autograd.gradcheck(
        lambda h, w, *b: logprobs_of_targets(h, w, targets, b[0] if b else None, chunk_rows), inputs
    )


def test_only_labelled_positions_are_scored_and_nothing_scored_still_backpropagates():
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    head = torch.nn.Linear(8, 11, bias=False)
    labels = torch.tensor([[IGNORE_INDEX, 3, 4, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX] * 4 + [7]])
    logps = token_logps_from_hidden(hidden, labels, head)
    full = torch.log_softmax(head(hidden[:, :-1]), -1)
    assert logps.shape == (2, 4)
    torch.testing.assert_close(logps[0, 0], full[0, 0, 3])
    torch.testing.assert_close(logps[1, 3], full[1, 3, 7])
    assert logps[0, 2:].abs().sum() == 0 and logps[1, :3].abs().sum() == 0
    nothing = token_logps_from_hidden(hidden, torch.full_like(labels, IGNORE_INDEX), head)
    nothing.sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() == 0


def test_patched_forward_returns_token_logps_and_keeps_the_original():
    torch.manual_seed(0)
    model = add_logprob_head(
        AlignmentGPT2ForCausalLM(AlignmentGPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2))
    )
    ids = torch.randint(0, 50, (2, 6))
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX
    logits = model(ids).logits
    assert logits.shape == (2, 6, 50)
    got = model(ids, labels=labels, token_logps=True)
    expected = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1) * (labels[:, 1:] != -100)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert add_logprob_head(model) is model  # idempotent


@pytest.mark.parametrize(
    "transform", [HeadTransform(scale=0.25), HeadTransform(softcap=2.0), HeadTransform(scale=3.0, softcap=1.5)]
)
def test_scaled_and_softcapped_heads_match_the_naive_computation(transform):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 6, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (7,), generator=g)
    z = (hidden @ weight.t()) * transform.scale
    if transform.softcap is not None:
        z = transform.softcap * torch.tanh(z / transform.softcap)
    expected = torch.log_softmax(z, -1).gather(-1, targets[:, None]).squeeze(-1)
    ours = logprobs_of_targets(hidden, weight, targets, None, 3, transform)
    torch.testing.assert_close(ours, expected, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(
        lambda h, w: logprobs_of_targets(h, w, targets, None, 3, transform), (hidden, weight)
    )


def tiny_gemma2():
    config = transformers.Gemma2Config(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=32,
        final_logit_softcapping=0.1,
    )
    return transformers.Gemma2ForCausalLM(config)


def tiny_cohere():
    config = transformers.CohereConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        logit_scale=0.5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return transformers.CohereForCausalLM(config)


@pytest.mark.parametrize("build", [tiny_gemma2, tiny_cohere], ids=["gemma2-softcap", "cohere-logit-scale"])
def test_head_variants_of_real_models_match_their_own_logits(build):
    """Gemma 2 soft-caps its logits, Cohere scales them: our head must give what the model's own logits give,
    values and gradients (the case `add_logprob_head` used to get wrong)."""
    torch.manual_seed(0)
    model = build().float()
    model.config.use_cache = False
    transform = HeadTransform.of(model.config)
    assert transform != HeadTransform()
    ids = torch.randint(0, 64, (2, 9))
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX
    scored = labels[:, 1:] != IGNORE_INDEX

    output = model(ids, output_hidden_states=True)
    expected = torch.log_softmax(output.logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)[scored]
    raw = torch.log_softmax(model.lm_head(output.hidden_states[-1][:, :-1]), -1).gather(-1, ids[:, 1:, None])
    assert (raw.squeeze(-1)[scored] - expected).abs().max() > 1e-2  # the variant matters at these values
    expected.sum().backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    add_logprob_head(model)
    got = model(ids, labels=labels, token_logps=True)[scored]
    torch.testing.assert_close(got, expected.detach(), atol=1e-5, rtol=0)
    got.sum().backward()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("transform", [HeadTransform(), HeadTransform(scale=3.0, softcap=1.5)], ids=["plain", "capped"])
@pytest.mark.parametrize("weights", ["uniform", "per-token"])
def test_gradients_taken_in_the_forward_pass_for_a_uniform_loss_are_exact(monkeypatch, transform, weights):
    """With `uniform=True` the head takes Σ log-probs' gradients from its forward softmax and the backward pass only
    scales them (no second pass of the head); a loss that weighs tokens unevenly falls back to the recomputation.
    Both give the naive computation's gradients."""
    from alignment.training import logprobs

    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(10, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 6, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (10,), generator=g)
    token_weights = (
        torch.full((10,), -0.3, dtype=torch.float64)
        if weights == "uniform"
        else torch.rand(10, generator=g, dtype=torch.float64)
    )
    z = (hidden @ weight.t() + bias) * transform.scale
    if transform.softcap is not None:
        z = transform.softcap * torch.tanh(z / transform.softcap)
    expected_logps = torch.log_softmax(z, -1).gather(-1, targets[:, None]).squeeze(-1)
    expected = torch.autograd.grad((expected_logps * token_weights).sum(), (hidden, weight, bias))

    head_passes = []
    counted = logprobs._logits
    monkeypatch.setattr(logprobs, "_logits", lambda *a: head_passes.append(1) or counted(*a))
    logps = logprobs._ChunkedTokenLogProbs.apply(hidden, weight, bias, targets, 4, transform, False, True)[0]
    forward_passes = len(head_passes)
    got = torch.autograd.grad((logps * token_weights).sum(), (hidden, weight, bias))
    torch.testing.assert_close(logps, expected_logps, atol=1e-12, rtol=0)
    for ours, naive_grad in zip(got, expected):
        torch.testing.assert_close(ours, naive_grad, atol=1e-12, rtol=0)
    assert forward_passes == 3  # 10 rows in chunks of 4
    assert len(head_passes) - forward_passes == (0 if weights == "uniform" else 3)

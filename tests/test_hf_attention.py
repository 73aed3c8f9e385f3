"""Any transformers model runs on our kernel with attn_implementation="alignment" and matches its sdpa logits."""

import pytest
import torch
import transformers

import alignment  # noqa: F401  (registers the kernel)
from alignment import ATTN_IMPLEMENTATION
from tests.conftest import TINY


def with_implementation(model_class, config, implementation):
    torch.manual_seed(0)
    config._attn_implementation = implementation
    return model_class(config).eval()


def inputs(vocab):
    ids = torch.randint(0, vocab, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, -5:] = 0  # right padding
    return ids, mask


@pytest.mark.parametrize(
    "model_class, config",
    [
        (transformers.GPT2LMHeadModel, lambda: transformers.GPT2Config(**TINY)),
        (
            transformers.LlamaForCausalLM,
            lambda: transformers.LlamaConfig(
                vocab_size=97,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=64,
            ),
        ),
    ],
    ids=["gpt2", "llama-gqa"],
)
def test_transformers_models_run_on_our_kernel(model_class, config, monkeypatch):
    import alignment.modeling.hf_attention as hf_attention

    calls = []
    kernel = hf_attention.attention
    monkeypatch.setattr(hf_attention, "attention", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    ours = with_implementation(model_class, config(), ATTN_IMPLEMENTATION)
    sdpa = with_implementation(model_class, config(), "sdpa")
    assert ours.config._attn_implementation == ATTN_IMPLEMENTATION
    ids, mask = inputs(97)
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            got, expected = ours(ids, **kwargs).logits, sdpa(ids, **kwargs).logits
            real = kwargs.get("attention_mask", torch.ones_like(ids)).bool()
            assert (got[real] - expected[real]).abs().max().item() <= 1e-5
        generated = ours.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        expected = sdpa.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, expected)
    assert len(calls) > 0  # the kernel really ran


def test_from_pretrained_accepts_our_implementation(gpt2_checkpoint):
    model = transformers.AutoModelForCausalLM.from_pretrained(gpt2_checkpoint, attn_implementation=ATTN_IMPLEMENTATION)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION

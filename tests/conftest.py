"""Shared fixtures: tiny GPT-2 configs and a random transformers GPT-2 checkpoint saved to a temporary folder,
a faithful stand-in for the official `gpt2` checkpoint's format."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `examples` is importable as a package in tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the Hub is unreachable from CI machines; fail fast, never hang
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402  (the Hugging Face libraries read the variables above when imported)
import torch  # noqa: E402
import transformers  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # `make test` runs one test process per core: a core each
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

TINY = {
    "vocab_size": 97,
    "n_positions": 64,
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 4,
    "bos_token_id": 96,
    "eos_token_id": 96,
}


@pytest.fixture
def tiny_hf_config():
    return transformers.GPT2Config(**TINY, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)


@pytest.fixture
def hf_gpt2(tiny_hf_config):
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(tiny_hf_config).eval()


@pytest.fixture
def gpt2_checkpoint(tmp_path, hf_gpt2):
    """A transformers GPT-2 saved like the official checkpoints (Conv1D weights, `transformer.h.N.*` names)."""
    folder = tmp_path / "hf-gpt2"
    hf_gpt2.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """The real GPT-2 tokenizer, built offline from the BPE ranks (cached after the first run)."""
    from alignment.modeling.tokenizer import load_tokenizer

    return load_tokenizer("gpt2")


def sliding_window_mistral():
    """A tiny transformers Mistral over GPT-2's vocabulary whose sliding window (8) test pairs outrun: a model the
    packed shared-prefix layout would not score exactly (a 4D mask bypasses the window)."""
    import transformers

    config = transformers.MistralConfig(
        vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, sliding_window=8, bos_token_id=50256, eos_token_id=50256,
    )  # fmt: skip
    return transformers.MistralForCausalLM(config)


def tiny_causal_lms():
    """Three small causal LMs over GPT-2's vocabulary: ours, transformers' GPT-2 and a transformers Llama."""
    from alignment import AlignmentGPT2Config, AlignmentGPT2ForCausalLM

    vocab = 50257
    return {
        "ours": lambda: AlignmentGPT2ForCausalLM(
            AlignmentGPT2Config(vocab_size=vocab, n_positions=128, n_embd=32, n_layer=2, n_head=4)
        ),
        "transformers-gpt2": lambda: transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                vocab_size=vocab,
                n_positions=128,
                n_embd=32,
                n_layer=2,
                n_head=4,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                resid_pdrop=0.0,
            )
        ),
        "transformers-llama": lambda: transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                vocab_size=vocab,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=128,
                bos_token_id=50256,
                eos_token_id=50256,
            )
        ),
    }


def preference_rows(n=12):
    """Tiny preference data in TRL's format, replies of different lengths."""
    rows = []
    for i in range(n):
        a, b = i % 7, (3 * i) % 5
        prompt = f"\n\nHuman: What is {a} + {b}? Please answer briefly.\n\nAssistant:"
        rows.append({"prompt": prompt, "chosen": f" {a + b}", "rejected": f" It is {a + b + 1}, I think."})
    return rows

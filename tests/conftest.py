"""Shared fixtures: tiny GPT-2 configs and a random transformers GPT-2 checkpoint saved to a temporary folder,
a faithful stand-in for the official `gpt2` checkpoint's format."""

import os

import pytest
import torch
import transformers

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the Hub is unreachable from CI machines; fail fast, never hang
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = {"vocab_size": 97, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4, "bos_token_id": 96, "eos_token_id": 96}


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

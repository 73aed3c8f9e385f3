"""Load a tokenizer, rebuilding GPT-2's offline when the Hugging Face Hub cannot be reached.

Every GPT-2 size shares one byte-level BPE tokenizer. OpenAI's rank table for it
(`whisper/assets/gpt2.tiktoken`) ships inside the `openai-whisper` source distribution on
PyPI, so a machine that can reach PyPI but not the Hub can still rebuild the exact
Hugging Face files (`vocab.json`, `vocab.bpe`) from it. Whisper itself is never installed
or imported: pip only downloads the sdist and we read that one file out of the tarball.

GPT-2's tokenizer has no chat template of its own; `load_tokenizer` gives it the `hh` one (the HH-RLHF text this
project trains on, see `chat_templates.py`), so conversations render as the data does. Tokenizers that bring a
template keep theirs.

CLI: `python -m alignment.modeling.tokenizer --save DIR [--name gpt2]` writes a tokenizer folder
that `load_tokenizer(DIR)` (or any `AutoTokenizer`) can load on a machine with no network.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from itertools import pairwise
from pathlib import Path

from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ..common import default_cache_dir, hub_reachable
from .chat_templates import HH_TEMPLATE

logger = logging.getLogger(__name__)

GPT2_NAMES = frozenset(
    prefix + size for prefix in ("", "openai-community/") for size in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
)
EOS_TOKEN = "<|endoftext|>"
EOS_TOKEN_ID = 50256
WHISPER_SDIST = "openai-whisper==20250625"
RANKS_MEMBER = "whisper/assets/gpt2.tiktoken"
# Pinned so a changed or corrupted download fails loudly instead of yielding a subtly different tokenizer.
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
# GPT-2's ids of " the", "Human" and "Assistant": together with end-of-text they tell its vocabulary apart.
GPT2_PROBE_IDS = {"Ġthe": 262, "Human": 20490, "Assistant": 48902}

# A dead network otherwise costs pip up to PIP_DEFAULT_TIMEOUT seconds times several retries.
PIP_TIMEOUT_S = 15
PIP_RETRIES = 2
PIP_DEADLINE_S = 300


class TokenizerUnavailableError(OSError):
    """No source could provide the tokenizer; the message says how to supply a local folder."""


def _unavailable(name: str, reason: str) -> TokenizerUnavailableError:
    """One-line error that always ends with the fix, so users need not read a traceback."""
    return TokenizerUnavailableError(
        f"Cannot load tokenizer {name!r}: {reason}. Pass a local tokenizer folder instead, e.g. one "
        f"written by `python -m alignment.modeling.tokenizer --save DIR --name {name}` or by "
        f"`AutoTokenizer.from_pretrained({name!r}).save_pretrained(DIR)` on a machine that has it."
    )


def _download_ranks() -> bytes:
    """Download (never install) the `openai-whisper` sdist with pip and return its GPT-2 rank file."""
    failed = f"rebuilding it offline needs `pip download {WHISPER_SDIST}`, which failed"
    with tempfile.TemporaryDirectory() as download_dir:
        # `--no-binary openai-whisper` rather than `:all:` lets pip take wheels for the build tools that
        # read the sdist's metadata; explicit timeout/retries override a long PIP_DEFAULT_TIMEOUT.
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "openai-whisper",
            "--quiet", "--timeout", str(PIP_TIMEOUT_S), "--retries", str(PIP_RETRIES),
            "--dest", download_dir, WHISPER_SDIST,
        ]  # fmt: skip
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            raise _unavailable("gpt2", f"{failed} (no answer within {PIP_DEADLINE_S} s)") from None
        if result.returncode != 0:
            last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise _unavailable("gpt2", f"{failed} ({last_line})")
        (sdist,) = Path(download_dir).glob("*.tar.gz")
        with tarfile.open(sdist, "r:gz") as tar:
            # Read the one member into memory: nothing from the archive ever touches the file system.
            for member in tar:
                if member.isfile() and member.name.split("/", 1)[-1] == RANKS_MEMBER:
                    return tar.extractfile(member).read()
    raise RuntimeError(f"{sdist.name} has no {RANKS_MEMBER}")


def fetch_gpt2_ranks(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the cached GPT-2 rank file (`base64(token_bytes) rank` per line), downloading it once."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / "gpt2.tiktoken"
    if path.is_file():
        return path
    logger.info("Downloading the GPT-2 BPE ranks from the %s sdist on PyPI", WHISPER_SDIST)
    data = _download_ranks()
    if hashlib.sha256(data).hexdigest() != RANKS_SHA256:
        raise RuntimeError(f"{RANKS_MEMBER} in {WHISPER_SDIST} does not have the pinned sha256 {RANKS_SHA256}")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cache, delete=False) as tmp:
        tmp.write(data)
    os.replace(tmp.name, path)
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which lets vocab.json and merges be plain text."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    for offset, byte in enumerate(byte for byte in range(256) if byte not in mapping):
        mapping[byte] = chr(256 + offset)
    return mapping


def _recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge that created each multi-byte token, in rank order.

    Running byte-level BPE on a token's bytes with only the merges learned before it
    (ranks < its own) stops at exactly two parts: the pair whose merge is that token.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = [bytes([byte]) for byte in token]
        while len(parts) > 2:
            pair_ranks = [ranks.get(left + right, rank) for left, right in pairwise(parts)]
            best = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
            if pair_ranks[best] >= rank:
                raise ValueError(f"rank {rank} ({token!r}) cannot be built from earlier merges")
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
        merges.append((parts[0], parts[1]))
    return merges


def _write_gpt2_files(ranks_path: Path, out_dir: Path) -> None:
    """Write the Hugging Face `vocab.json` and `vocab.bpe` for GPT-2, checking the merges byte for byte."""
    ranks = {}
    for line in ranks_path.read_bytes().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    if sorted(ranks.values()) != list(range(EOS_TOKEN_ID)):
        raise ValueError(f"{ranks_path} should hold ranks 0..{EOS_TOKEN_ID - 1} exactly once each")

    to_unicode = _bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(to_unicode[byte] for byte in token)

    vocab = {text(token): rank for token, rank in ranks.items()} | {EOS_TOKEN: EOS_TOKEN_ID}
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = "".join(f"{text(left)} {text(right)}\n" for left, right in _recover_merges(ranks))
    bpe_path = out_dir / "vocab.bpe"
    bpe_path.write_text("#version: 0.2\n" + merges, encoding="utf-8", newline="\n")
    if hashlib.sha256(bpe_path.read_bytes()).hexdigest() != VOCAB_BPE_SHA256:
        raise RuntimeError(f"Rebuilt {bpe_path} differs from GPT-2's (sha256 {VOCAB_BPE_SHA256} expected)")


def build_gpt2_tokenizer(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder holding GPT-2's tokenizer rebuilt from the public ranks, built once and then reused.

    The folder is assembled in a temporary directory and renamed into place, so an
    interrupted build never leaves a half-written cache behind.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / "gpt2-tokenizer"
    if target.is_dir():
        return target
    ranks_path = fetch_gpt2_ranks(cache)
    staging = Path(tempfile.mkdtemp(prefix=".gpt2-tokenizer-", dir=cache))
    try:
        _write_gpt2_files(ranks_path, staging)
        tokenizer = GPT2TokenizerFast(
            vocab=str(staging / "vocab.json"),
            merges=str(staging / "vocab.bpe"),
            bos_token=EOS_TOKEN,
            eos_token=EOS_TOKEN,
            unk_token=EOS_TOKEN,
            model_max_length=1024,
            add_prefix_space=False,
        )
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first; its folder is just as good
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _load(name_or_path: str, cache_dir: str | os.PathLike | None) -> PreTrainedTokenizerFast:
    """Local folder, then the Hub (or only its local cache when offline), then the offline GPT-2 build."""
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        return AutoTokenizer.from_pretrained(folder)
    online = hub_reachable()  # one quick probe: unreachable, huggingface_hub retries for ~50 s
    try:
        return AutoTokenizer.from_pretrained(name_or_path, local_files_only=not online)
    except OSError as hub_error:
        if name_or_path not in GPT2_NAMES:
            reason = "it is not a local folder and the Hugging Face Hub " + (
                "did not provide it" if online else "is unreachable (or HF_HUB_OFFLINE is set)"
            )
            raise _unavailable(name_or_path, reason) from hub_error
        logger.info(
            "The Hub did not provide %r (%s): using GPT-2's tokenizer rebuilt offline",
            name_or_path,
            type(hub_error).__name__,
        )
    return AutoTokenizer.from_pretrained(build_gpt2_tokenizer(cache_dir))


def load_tokenizer(
    name_or_path: str = "gpt2",
    *,
    padding_side: str = "right",
    pad_token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> PreTrainedTokenizerFast:
    """Load a tokenizer ready for batching: a pad token is always set, defaulting to EOS.

    `name_or_path` is a local tokenizer folder or a Hub name; GPT-2 names also work with no
    Hub access (see the module docstring). A `pad_token` missing from the vocabulary is added,
    so the model's embeddings then need resizing to `len(tokenizer)`. `cache_dir` holds the
    offline GPT-2 build (default `$ALIGNMENT_CACHE` or `~/.cache/alignment`). GPT-2's tokenizer
    without a chat template gets the `hh` one.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    tokenizer = _load(name_or_path, cache_dir)
    if pad_token is not None:
        tokenizer.add_special_tokens({"pad_token": pad_token})
    else:
        ensure_pad_token(tokenizer)
    if tokenizer.chat_template is None and has_gpt2_vocabulary(tokenizer):
        tokenizer.chat_template = HH_TEMPLATE
    tokenizer.padding_side = padding_side
    for loading_detail in ("local_files_only", "is_local"):  # how it was loaded here, not how to load it elsewhere
        tokenizer.init_kwargs.pop(loading_detail, None)
    return tokenizer


def has_gpt2_vocabulary(tokenizer: PreTrainedTokenizerBase) -> bool:
    """GPT-2's BPE (a Hub name, the offline build, or a checkpoint folder saved with it): end-of-text at 50256 and
    GPT-2's ids for a few common tokens. Tokens added on top (e.g. a pad token) do not matter."""
    vocabulary = tokenizer.get_vocab()
    return vocabulary.get(EOS_TOKEN) == EOS_TOKEN_ID and all(
        vocabulary.get(token) == token_id for token, token_id in GPT2_PROBE_IDS.items()
    )


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Batches need a pad token; GPT-2 has none, so padding is end-of-text (the padded positions are never scored)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def main(argv: list[str] | None = None) -> None:
    """Write a tokenizer folder, e.g. to carry GPT-2's tokenizer to a machine with no network at all."""
    parser = argparse.ArgumentParser(description="Save a tokenizer folder for use on machines without network.")
    parser.add_argument("--save", required=True, metavar="DIR", help="folder to write the tokenizer to")
    parser.add_argument("--name", default="gpt2", help="Hub name or local folder (default: gpt2)")
    args = parser.parse_args(argv)
    try:
        tokenizer = load_tokenizer(args.name)
    except TokenizerUnavailableError as err:
        raise SystemExit(f"error: {err}") from None
    tokenizer.save_pretrained(args.save)
    print(f"Saved the {args.name} tokenizer ({len(tokenizer)} tokens) to {args.save}")


if __name__ == "__main__":
    main()

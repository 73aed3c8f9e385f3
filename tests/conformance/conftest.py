"""Fixtures for the conformance suite: the offline Hub stand-in (built once, reused while `hub.py` is unchanged)
and the temporary output folder TRL's tests call `self.tmp_dir`."""

import hashlib
from pathlib import Path

import pytest
import transformers

from alignment.common import default_cache_dir
from tests.conformance import hub


@pytest.fixture(scope="session", autouse=True)
def tiny_hub(gpt2_tokenizer):
    """The tiny `trl-internal-testing/*` models in a Hub cache folder keyed by this stand-in's source and versions."""
    key = hashlib.sha256((Path(hub.__file__).read_text() + transformers.__version__).encode()).hexdigest()[:16]
    return hub.install(Path(default_cache_dir()) / "conformance-hub" / key, gpt2_tokenizer)


class TrlTestCase:
    """What TRL's test base class gives a test: `self.tmp_dir`, a fresh folder."""

    @pytest.fixture(autouse=True)
    def set_tmp_dir(self, tmp_path):
        self.tmp_dir = str(tmp_path)

"""Export a run of ours as transformers' stock GPT-2 (`GPT2LMHeadModel`, model_type "gpt2"), for tools that load only
the stock format without trust_remote_code: vLLM, TGI, lm-eval's `hf` model, llama.cpp's converters.

    python scripts/export.py RUN_DIR OUT_DIR

RUN_DIR is a full run, or a LoRA run (its `merged/` when saved, else the adapter merged into its base). OUT_DIR must
be new or empty: nothing is ever overwritten. The command lives in `alignment.modeling.export`.
"""

from __future__ import annotations

import transformers

from alignment.modeling.export import main
from alignment.run.cli import run_cli

if __name__ == "__main__":
    transformers.utils.logging.disable_progress_bar()
    run_cli(main)

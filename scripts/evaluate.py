"""Score a policy on held-out preference pairs against a reference, and optionally a judged win rate.

    python scripts/evaluate.py POLICY --data PATH_OR_HUB_ID [--reference REF] [--judge_model RM] ...

Conversational pairs (message lists) are rendered through the policy tokenizer's chat template (`--chat_template`).

`python scripts/evaluate.py --help` lists every option; the command lives in `alignment.evaluation.report`.
"""

from __future__ import annotations

import datasets
import transformers

from alignment.evaluation.report import main
from alignment.run.cli import run_cli

if __name__ == "__main__":
    datasets.disable_progress_bars()  # stderr keeps our own bars only
    transformers.utils.logging.disable_progress_bar()
    run_cli(main)

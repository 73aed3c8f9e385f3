"""Sample replies from a causal LM checkpoint, or chat with it through its chat template (HH text for GPT-2).

    python scripts/generate.py CHECKPOINT [--prompt TEXT | --prompts_file FILE] [--num_samples 10] [--greedy] ...
    python scripts/generate.py CHECKPOINT --chat [--chat_template hh|chatml|FILE]

A prompts file (.jsonl/.json) may hold conversations (lists of messages); they go through the chat template.

`python scripts/generate.py --help` lists every option; the command lives in `alignment.evaluation.sampling`.
"""

from __future__ import annotations

import datasets
import transformers

from alignment.evaluation.sampling import main
from alignment.run.cli import run_cli

if __name__ == "__main__":
    datasets.disable_progress_bars()  # stderr keeps our own bars only
    transformers.utils.logging.disable_progress_bar()
    run_cli(main)

"""Our trainers against stock TRL on the same work: throughput, peak memory, and the losses of the first steps.

    python scripts/benchmark.py dpo --data ../shared/data/hh-rlhf/harmless-base-sample.jsonl.gz --model gpt2
    python scripts/benchmark.py sft --model small --steps 4

Each side runs in its own process (so peak resident memory is its own), on the same data, the same weights (a random
GPT-2 saved once and loaded by both: ours converts it into our class, stock TRL uses transformers' GPT2LMHeadModel on
sdpa), the same batch size, max length and number of steps, after warm-up steps that are not timed.

Sides: `ours` (our trainer with its defaults: shared prefixes, packed pairs, log-probs on reply tokens only),
`trl` (stock TRL with its defaults), `trl-precompute` (stock TRL with precompute_ref_log_probs=True) and
`ours-precompute`. SFT packs with TRL's default (best-fit, padding-free) on both sides. Gradient checkpointing is off
on every side (TRL turns it on by default; it trades speed for memory and would only slow the stock side down).
Without --data, pairs are generated with HH-RLHF's length profile.

Prints a table and writes JSON (--output_json): pairs/s (DPO) or tokens/s (SFT), peak resident memory, the one-off
reference precompute time, and the first losses of each side, which must agree. The logic is in
`benchmarks/trl_comparison.py`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `benchmarks` is a folder, not installed

from alignment.run.measure import ChildFailed  # noqa: E402
from benchmarks.trl_comparison import MODELS, Settings, compare, print_table  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=["dpo", "sft"])
    parser.add_argument("--data", default=None, help="HH-RLHF-shaped jsonl(.gz); default: generated pairs")
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--sides", default=None, help="comma-separated; default: all for the task")
    parser.add_argument("--output_json", default=None)
    options = parser.parse_args(argv)
    if options.warmup < 1 or options.steps < 1:
        parser.error("--warmup and --steps must be at least 1")

    settings = Settings(
        task=options.task,
        model=options.model,
        dtype=options.dtype,
        batch_size=options.batch_size,
        max_length=options.max_length,
        warmup=options.warmup,
        steps=options.steps,
        data=options.data,
    )
    try:
        report = compare(settings, options.sides.split(",") if options.sides else None)
    except ChildFailed as error:
        raise SystemExit(str(error)) from None
    print_table(report)
    if options.output_json:
        Path(options.output_json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

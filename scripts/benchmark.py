"""Our trainers against stock TRL on the same work: throughput, peak memory, model FLOP utilisation, and the losses
of the first steps.

    python scripts/benchmark.py dpo --data ../shared/data/hh-rlhf/harmless-base-sample.jsonl.gz --model gpt2
    python scripts/benchmark.py sft --model small --steps 4
    python scripts/benchmark.py dpo --model smollm2-135m            # a random Llama of SmolLM2-135M's shape
    python scripts/benchmark.py dpo --dtype bf16 --compare_fp32 --warmup 2 --steps 18   # bf16 and fp32, 20 losses
    python scripts/benchmark.py dpo --profile --sides ours          # where our step's time goes

Each side runs in its own process (so peak resident memory is its own), on the same data, the same weights (a random
model of the preset saved once and loaded by both: a GPT-2, which ours converts into our class while stock TRL uses
transformers' GPT2LMHeadModel on sdpa, or a Llama, transformers' on sdpa for both), the same batch size, max length
and number of steps, after warm-up steps that are not timed.

Sides: `ours` (our trainer with its defaults: shared prefixes, packed pairs, log-probs on reply tokens only),
`trl` (stock TRL with its defaults), `trl-precompute` (stock TRL with precompute_ref_log_probs=True) and
`ours-precompute`. SFT packs with TRL's default (best-fit, padding-free) on both sides. Gradient checkpointing is off
on every side (TRL turns it on by default) unless --gradient_checkpointing turns it on for all. Without --data,
pairs are generated with HH-RLHF's length profile.

Prints a table and writes JSON (--output_json): pairs/s (DPO) or tokens/s (SFT), peak resident memory, the one-off
set-up time (the reference precompute included), model FLOP utilisation (MFU: the step's model FLOPs, counted on stock
TRL's layout, per second over the matmul peak measured in the same run; `exec`: the side's own executed FLOPs over the
same peak; see `benchmarks/flops.py`), and the first losses of each side, which must agree. `--dtype bf16` is bf16
weights and the Trainer's bf16 autocast on both sides; `--compare_fp32` runs every side again in fp32 and reports
speed, memory and the loss difference. `--profile`: three more steps on every side, the `ours` side's last two under
torch.profiler, printed by op group. The logic is in `benchmarks/trl_comparison.py`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `benchmarks` is a folder, not installed

from alignment.run.measure import ChildFailed  # noqa: E402
from benchmarks.trl_comparison import (  # noqa: E402
    DPO_SIDES,
    MODELS,
    PROFILED_SIDE,
    SFT_SIDES,
    Settings,
    compare,
    print_table,
)


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
    parser.add_argument("--gradient_checkpointing", action="store_true", help="on every side (default: off)")
    parser.add_argument("--compare_fp32", action="store_true", help="with --dtype bf16: every side again in fp32")
    parser.add_argument("--profile", action="store_true", help="profile the ours side on 2 steps after the timed ones")
    parser.add_argument("--peak_seconds", type=float, default=2.0, help="how long the matmul peak is timed")
    parser.add_argument("--output_json", default=None)
    options = parser.parse_args(argv)
    if options.warmup < 1 or options.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    if options.compare_fp32 and options.dtype != "bf16":
        parser.error("--compare_fp32 compares a bf16 run with fp32: add --dtype bf16")
    if options.peak_seconds <= 0:
        parser.error("--peak_seconds must be positive")
    sides = options.sides.split(",") if options.sides else None
    known = DPO_SIDES if options.task == "dpo" else SFT_SIDES
    if sides and set(sides) - set(known):
        parser.error(
            f"--sides: unknown {', '.join(sorted(set(sides) - set(known)))}; {options.task} has {', '.join(known)}"
        )
    if options.profile and sides and PROFILED_SIDE not in sides:
        parser.error(f"--profile profiles the {PROFILED_SIDE} side: add it to --sides")

    settings = Settings(
        task=options.task,
        model=options.model,
        dtype=options.dtype,
        batch_size=options.batch_size,
        max_length=options.max_length,
        warmup=options.warmup,
        steps=options.steps,
        data=options.data,
        gradient_checkpointing=options.gradient_checkpointing,
        profile=options.profile,
    )
    try:
        report = compare(settings, sides, compare_fp32=options.compare_fp32, peak_seconds=options.peak_seconds)
    except ChildFailed as error:
        raise SystemExit(str(error)) from None
    print_table(report)
    if options.output_json:
        Path(options.output_json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

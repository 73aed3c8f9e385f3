"""Our trainers against stock TRL on the same work: throughput, peak memory, and the losses of the first steps.

    python scripts/benchmark.py dpo --data ../shared/data/hh-rlhf/harmless-base-sample.jsonl.gz --model gpt2
    python scripts/benchmark.py sft --model small --steps 4

Each side runs in its own process (so peak resident memory is its own), on the same data, the same weights (a random
GPT-2 saved once and loaded by both: ours converts it into our class, stock TRL uses transformers' GPT2LMHeadModel on
sdpa), the same batch size, max length and number of steps, after warm-up steps that are not timed.

Sides: `ours` (our trainer with its defaults: shared prefixes, packed pairs, log-probs on reply tokens only),
`trl` (stock TRL with its defaults), `trl-precompute` (stock TRL with precompute_ref_log_probs=True) and
`ours-precompute`. SFT packs with TRL's default (best-fit, padding-free) on both sides. Gradient checkpointing is off on every side (TRL turns it on by default; it trades speed for
memory and would only slow the stock side down). Without --data, pairs are generated with HH-RLHF's length profile.

Prints a table and writes JSON (--output_json): pairs/s (DPO) or tokens/s (SFT), peak resident memory, the one-off
reference precompute time, and the first losses of each side, which must agree.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {  # name -> GPT-2 config fields
    "tiny": {"n_layer": 2, "n_head": 2, "n_embd": 64},  # for smoke tests
    "small": {"n_layer": 4, "n_head": 4, "n_embd": 256},
    "gpt2": {"n_layer": 12, "n_head": 12, "n_embd": 768},
}
DPO_SIDES = ("ours", "trl", "trl-precompute", "ours-precompute")
SFT_SIDES = ("ours", "trl")
WORDS = "the a to of and is in that it you for what can be this have with are not on your do as but they".split()


def synthetic_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """HH-RLHF-shaped pairs: multi-turn prompts of ~85 words (median ~62, long tail), replies of ~30-40 words."""
    rng = random.Random(seed)

    def text(words: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(max(1, words)))

    rows = []
    for _ in range(n):
        prompt_words = min(int(rng.lognormvariate(4.1, 0.6)), 670)
        turns = max(1, prompt_words // 40)
        prompt = "".join(
            f"\n\nHuman: {text(prompt_words // (2 * turns))}\n\nAssistant: {text(prompt_words // (2 * turns))}"
            for _ in range(turns - 1)
        ) + f"\n\nHuman: {text(prompt_words // (2 * turns))}\n\nAssistant:"
        rows.append({"prompt": prompt, "chosen": " " + text(int(rng.gauss(31, 12))),
                     "rejected": " " + text(int(rng.gauss(39, 15)))})
    return rows


def load_pairs(path: str | None, n: int) -> list[dict[str, str]]:
    if path is None:
        return synthetic_pairs(n)
    from datasets import load_dataset

    from alignment.data import normalize_dataset

    data, _ = normalize_dataset(load_dataset("json", data_files=path, split="train"), "preference", source=path)
    return [data[i] for i in range(min(n, len(data)))]


# --- one side, in its own process ------------------------------------------------------------------------------


def run_side(options: argparse.Namespace) -> dict:
    import datasets
    import torch
    import transformers
    import trl
    from transformers import TrainerCallback

    import alignment
    from alignment.configs import DPOConfig, SFTConfig
    from alignment.tokenizer import load_tokenizer
    from alignment.trainers import DPOTrainer, SFTTrainer

    torch.manual_seed(0)
    ours = options.side.startswith("ours")
    dtype = torch.bfloat16 if options.dtype == "bf16" else torch.float32
    if ours:
        model = alignment.AlignmentGPT2ForCausalLM.from_pretrained(options.weights, dtype=dtype)
    else:
        model = transformers.GPT2LMHeadModel.from_pretrained(options.weights, dtype=dtype, attn_implementation="sdpa")
    tokenizer = load_tokenizer("gpt2")
    rows = json.loads(Path(options.rows).read_text())
    total_steps = options.warmup + options.steps
    common = dict(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=options.batch_size, max_steps=total_steps,
        max_length=options.max_length, learning_rate=1e-6, logging_steps=1, save_strategy="no", report_to="none",
        gradient_checkpointing=False, bf16=options.dtype == "bf16", use_cpu=not torch.cuda.is_available(), seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks.append(time.perf_counter())

    clock = Clock()
    start = time.perf_counter()
    if options.task == "dpo":
        precompute = options.side.endswith("precompute")
        config_class, trainer_class = (DPOConfig, DPOTrainer) if ours else (trl.DPOConfig, trl.DPOTrainer)
        args = config_class(**common, precompute_ref_log_probs=precompute, beta=0.1)
        ref_model = None if precompute else _reference(model)
        trainer = trainer_class(model, ref_model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                                processing_class=tokenizer, callbacks=[clock])
    else:
        config_class, trainer_class = (SFTConfig, SFTTrainer) if ours else (trl.SFTConfig, trl.SFTTrainer)
        args = config_class(**common, packing=True, packing_strategy="bfd")  # TRL's default, so batches are equal
        trainer = trainer_class(model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                                processing_class=tokenizer, callbacks=[clock])
    setup_seconds = time.perf_counter() - start
    batches = iter(trainer.get_train_dataloader())
    tokens = [_tokens_in(next(batches)) for _ in range(total_steps)] if options.task == "sft" else []
    trainer.train()
    seconds = clock.marks[-1] - clock.marks[options.warmup - 1]  # from the end of the last warm-up step
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    result = {
        "side": options.side,
        "seconds_per_step": seconds / options.steps,
        "setup_seconds": setup_seconds,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "losses": losses[: options.warmup + options.steps],
    }
    if options.task == "dpo":
        result["pairs_per_second"] = options.batch_size * options.steps / seconds
    else:
        result["tokens_per_second"] = sum(tokens[options.warmup :]) / seconds
    return result


def _reference(model):
    import copy

    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


def _tokens_in(batch) -> int:
    """Real (non-padding) tokens of an SFT batch."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int((batch["labels"] != -100).sum()) + batch["input_ids"].size(0)


# --- the driver ---------------------------------------------------------------------------------------------------


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
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.warmup < 1 or options.steps < 1:
        parser.error("--warmup and --steps must be at least 1")

    if options.side:  # a worker: run one side and print its result as the last line
        print(json.dumps(run_side(options)))
        return

    import torch
    import transformers

    work = Path(tempfile.mkdtemp(prefix="alignment-benchmark-"))
    torch.manual_seed(0)
    # No dropout (the assignment's "gpt2" preset): attention dropout would push PyTorch's CPU attention onto its
    # unfused path, which stores every attention matrix of a 4,000-token packed row (both sides alike).
    config = transformers.GPT2Config(
        **MODELS[options.model], n_positions=1024, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(work / "weights")
    n_rows = options.batch_size * (options.warmup + options.steps)
    pairs = load_pairs(options.data, n_rows)
    rows = pairs if options.task == "dpo" else [{"text": p["prompt"] + p["chosen"]} for p in pairs * 4]
    (work / "rows.json").write_text(json.dumps(rows))

    sides = options.sides.split(",") if options.sides else list(DPO_SIDES if options.task == "dpo" else SFT_SIDES)
    results = []
    for side in sides:
        command = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--side", side,
                   "--weights", str(work / "weights"), "--rows", str(work / "rows.json")]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"side {side} failed (exit code {done.returncode}):\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"  {side}: done", file=sys.stderr)

    report = {"task": options.task, "model": options.model, "dtype": options.dtype, "batch_size": options.batch_size,
              "max_length": options.max_length, "steps": options.steps, "warmup": options.warmup,
              "data": options.data or "generated", "device": "cuda" if torch.cuda.is_available() else "cpu",
              "cpus": os.cpu_count(), "results": results}
    print_table(report)
    if options.output_json:
        Path(options.output_json).write_text(json.dumps(report, indent=2) + "\n")


def print_table(report: dict) -> None:
    rate = "pairs_per_second" if report["task"] == "dpo" else "tokens_per_second"
    results = {r["side"]: r for r in report["results"]}
    base = results.get("trl")
    print(f"\n{report['task'].upper()} · GPT-2 {report['model']} · {report['dtype']} · batch {report['batch_size']} · "
          f"max_length {report['max_length']} · {report['steps']} timed steps · {report['device']}")
    print(f"{'side':<18}{rate.replace('_', ' '):>18}{'vs trl':>9}{'peak RSS GB':>13}{'vs trl':>9}  first losses")
    for side, r in results.items():
        speed = f"{r[rate] / base[rate]:.2f}x" if base else ""
        memory = f"{r['peak_rss_gb'] / base['peak_rss_gb']:.2f}x" if base else ""
        losses = " ".join(f"{x:.4f}" for x in r["losses"][:3])
        print(f"{side:<18}{r[rate]:>18.2f}{speed:>9}{r['peak_rss_gb']:>13.2f}{memory:>9}  {losses}")


if __name__ == "__main__":
    main()

"""The offline demo: SFT, then DPO, then evaluation, on a task whose answers can be checked exactly.

    python examples/arithmetic/demo.py [--output_dir outputs/demo]      (what `make demo` runs)

No Hub needed: GPT-2's tokenizer is rebuilt offline, the model is a tiny GPT-2 from random weights, and the data is
single-digit arithmetic in the HH dialogue format (`task.py` beside it): SFT data with 30% wrong answers,
preference pairs (correct over wrong), and 60 held-out problems that no training row contains.

It prints, for the SFT model and the DPO model: held-out preference accuracy, and the share of correct greedy answers
on the training problems and on the held-out problems. Everything lands in the output folder: data/, sft/ and dpo/
(checkpoints, model cards, curves under plots/), results.json and samples.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: `examples` is a folder, not installed

from alignment import AlignmentGPT2ForCausalLM  # noqa: E402
from alignment.modeling.tokenizer import load_tokenizer  # noqa: E402
from alignment.run.cli import run_cli  # noqa: E402
from alignment.run.pipeline import run_dpo, run_sft  # noqa: E402
from examples.arithmetic import task as arithmetic  # noqa: E402
from examples.arithmetic.studies import ArithmeticEval, evaluate_policy  # noqa: E402

RECIPES = Path(__file__).resolve().parent / "recipes"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/demo")
    options = parser.parse_args(argv)
    out = Path(options.output_dir)
    start = time.time()

    files = arithmetic.write_task(out / "data")
    fresh = "--overwrite_output_dir=true"  # the demo always starts over
    run_sft(
        [
            str(RECIPES / "arithmetic_sft.yaml"),
            f"--dataset_name={files['sft_train']}",
            f"--output_dir={out / 'sft'}",
            fresh,
        ]
    )
    run_dpo(
        [
            str(RECIPES / "arithmetic_dpo.yaml"),
            f"--model_name_or_path={out / 'sft'}",
            f"--dataset_name={files['dpo_train']}",
            f"--output_dir={out / 'dpo'}",
            fresh,
        ]
    )
    train_seconds = time.time() - start

    tokenizer = load_tokenizer(str(out / "sft"))
    sft = AlignmentGPT2ForCausalLM.from_pretrained(out / "sft")
    dpo = AlignmentGPT2ForCausalLM.from_pretrained(out / "dpo")
    task = ArithmeticEval.from_files(files)
    results: dict[str, dict[str, float | None]] = {}
    samples: dict[str, list[dict[str, str]]] = {}
    for name, model, reference in (("sft", sft, None), ("dpo", dpo, sft)):
        results[name], replies = evaluate_policy(model, reference, tokenizer, task)
        samples[name] = [{"prompt": p, "reply": r} for p, r in zip(task.held_out_prompts[:20], replies[:20])]
    results["seconds"] = {"training": round(train_seconds, 1), "total": round(time.time() - start, 1)}

    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "samples.json").write_text(json.dumps(samples, indent=2) + "\n")
    print_report(results, samples, out)


def print_report(results: dict, samples: dict, out: Path) -> None:
    rows = [
        ("held-out preference accuracy (chosen more likely)", "held_out_preference_accuracy"),
        ("correct greedy answers, training problems", "greedy_correct_train_problems"),
        ("correct greedy answers, held-out problems", "greedy_correct_held_out_problems"),
    ]
    print("\n" + "=" * 72)
    print(f"{'offline demo: tiny GPT-2, single-digit arithmetic':<52}{'SFT':>9}{'DPO':>9}")
    print("-" * 72)
    for label, key in rows:
        print(f"{label:<52}{results['sft'][key]:>9.1%}{results['dpo'][key]:>9.1%}")
    print(
        f"{'DPO implicit-reward accuracy vs SFT, held-out pairs':<52}{'':>9}"
        f"{results['dpo']['held_out_reward_accuracy_vs_sft']:>9.1%}"
    )
    print("-" * 72)
    for sft_sample, dpo_sample in list(zip(samples["sft"], samples["dpo"]))[:5]:
        question = sft_sample["prompt"].strip().splitlines()[0].removeprefix("Human: ")
        print(f"  {question:<28} SFT:{sft_sample['reply']!r:<10} DPO:{dpo_sample['reply']!r}")
    print(f"took {results['seconds']['total']:.0f} s; checkpoints, curves and samples in {out}/")
    print("=" * 72)


if __name__ == "__main__":
    run_cli(main)

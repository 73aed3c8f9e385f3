"""Score a policy on held-out preference pairs against a reference, and optionally a judged win rate.

    python scripts/evaluate.py POLICY --data PATH_OR_HUB_ID [--reference REF] [--split test] [--max_samples N]
        [--beta 0.1] [--batch_size 16] [--output_json PATH]
        [--judge_model RM [--judge_prompts 100] [--max_new_tokens 50] [--greedy] [--seed 0] ...]

POLICY and REF are checkpoint folders or Hub ids (any transformers causal LM; GPT-2 ones load into our GPT-2 class).
The data is any preference source `alignment.data` reads: a local .jsonl/.json/.parquet/.csv file (one split, so
`--split` is ignored), a folder or a Hub id (`--split`, default "test"), in the hh, rm-static, stack-exchange or TRL
preference shape. Pairs longer than the models' positions are left out (and counted) rather than truncated.

Printed as a table and written with `--output_json`:
  * with a reference: implicit-reward accuracy (β·log π/π_ref higher for the chosen reply), mean reward margin and
    DPO (sigmoid) loss; without one these are null;
  * mean log-probs of the chosen and rejected replies under the policy, and the reference-free accuracy: the share of
    pairs where the policy gives the chosen reply the higher per-token (length-normalised) log-prob;
  * with `--judge_model` (any AutoModelForSequenceClassification reward model; its score is the last logit, i.e.
    logits[:, 0] for a one-output model) and a reference: replies from both models to the first `--judge_prompts`
    distinct prompts of the split, each scored by the judge; win/tie/loss counts, the win rate (ties count half) and
    its 95% Wilson interval.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import transformers

from alignment.cli import run_cli
from alignment.evaluation import (
    add_loading_arguments,
    check_checkpoint,
    fit_pairs,
    judged_win_rate,
    load_causal_lm,
    load_preference_pairs,
    load_reward_model,
    model_max_length,
    preference_scores,
)


class ArgumentParser(argparse.ArgumentParser):
    """Bad arguments raise, so run_cli reports them in its one `error:` line with exit code 1."""

    def error(self, message: str) -> None:
        raise ValueError(f"{message} (see {self.prog} --help)")


REWARD_FIELDS = ("accuracy", "margin", "loss")  # meaningless without a reference


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="evaluate.py", description=__doc__.splitlines()[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("policy", help="policy checkpoint folder or Hub id")
    parser.add_argument("--data", required=True, help="preference data: local file, folder or Hub id")
    parser.add_argument("--reference", default=None, help="reference checkpoint (e.g. the SFT model)")
    parser.add_argument("--split", default="test", help="split of a folder or Hub dataset (default: test)")
    parser.add_argument("--dataset_config", default=None, help="Hub config (subset) of the dataset")
    parser.add_argument("--dataset_format", default=None,
                        choices=("hh", "rm-static", "stack-exchange", "preference"),
                        help="shape of the data (default: detected from the columns)")
    parser.add_argument("--max_samples", type=int, default=None, help="score the first N pairs only")
    parser.add_argument("--max_length", type=int, default=None,
                        help="leave out pairs longer than this many tokens (default: the models' positions)")
    parser.add_argument("--beta", type=float, default=0.1, help="β of the implicit reward and the DPO loss")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--output_json", default=None, help="write the results here as JSON")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    judge = parser.add_argument_group("judged win rate (needs --reference)")
    judge.add_argument("--judge_model", default=None, help="reward model (AutoModelForSequenceClassification)")
    judge.add_argument("--judge_tokenizer", default=None, help="the judge's tokenizer (default: its own)")
    judge.add_argument("--judge_prompts", type=int, default=100, help="distinct prompts to generate replies for")
    judge.add_argument("--max_new_tokens", type=int, default=50)
    judge.add_argument("--temperature", type=float, default=0.9)
    judge.add_argument("--top_k", type=int, default=200)
    judge.add_argument("--top_p", type=float, default=1.0)
    judge.add_argument("--greedy", action="store_true", help="greedy replies instead of sampled ones")
    judge.add_argument("--seed", type=int, default=0, help="seed of the sampled replies")
    judge.add_argument("--tie_tolerance", type=float, default=0.0, help="score difference still counted as a tie")
    add_loading_arguments(parser.add_argument_group("loading"))
    return parser


def check_options(args: argparse.Namespace) -> None:
    positive = ["batch_size", "judge_prompts", "max_new_tokens", "top_k"]
    positive += [name for name in ("max_samples", "max_length") if getattr(args, name) is not None]
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.beta <= 0:
        raise ValueError(f"--beta must be positive, got {args.beta}")
    if args.judge_model is not None and args.reference is None:
        raise ValueError("--judge_model compares the policy's replies with the reference's: set --reference")
    if args.judge_model is not None and not args.greedy and args.temperature <= 0:
        raise ValueError(f"--temperature must be positive, got {args.temperature} (use --greedy)")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.output_json and Path(args.output_json).is_dir():
        raise ValueError(f"--output_json should name a file, not the folder {args.output_json}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    check_options(args)
    for path, what in ((args.policy, "policy"), (args.reference, "reference"), (args.judge_model, "judge")):
        if path is not None:
            check_checkpoint(path, what)
    progress = not args.no_progress
    # the data first: a wrong path fails before any model loads
    pairs = load_preference_pairs(args.data, args.split, format=args.dataset_format, config=args.dataset_config,
                                  max_samples=args.max_samples)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loading = dict(tokenizer_name_or_path=args.tokenizer, trust_remote_code=args.trust_remote_code,
                   dtype=args.dtype, model_implementation=args.model_implementation, device=device)
    policy, tokenizer = load_causal_lm(args.policy, **loading)
    reference = None
    if args.reference is not None:
        reference, _ = load_causal_lm(args.reference, **loading)
    judge = None
    if args.judge_model is not None:
        judge = load_reward_model(args.judge_model, tokenizer_name_or_path=args.judge_tokenizer,
                                  trust_remote_code=args.trust_remote_code, device=device, batch_size=args.batch_size)
    models = [m for m in (policy, reference) if m is not None]
    limits = [n for n in (args.max_length, *(model_max_length(m) for m in models)) if n is not None]
    pairs, too_long = fit_pairs(pairs, tokenizer, min(limits) if limits else None)
    if not pairs:
        raise ValueError(f"all {too_long} pairs are longer than {min(limits)} tokens; raise --max_length or use "
                         "a model with more positions")

    scores = preference_scores(policy, reference, tokenizer, pairs, beta=args.beta, batch_size=args.batch_size,
                               progress=progress).as_dict()
    if reference is None:
        scores.update(dict.fromkeys(REWARD_FIELDS))
    result: dict[str, Any] = {
        "policy": args.policy, "reference": args.reference, "data": args.data,
        "split": None if Path(args.data).expanduser().is_file() else args.split,
        "beta": args.beta, "pairs_too_long": too_long, "scores": scores, "win_rate": None,
    }
    if judge is not None:
        result["win_rate"] = win_rate(args, policy, reference, tokenizer, pairs, judge, progress)
    print_table(result)
    if args.output_json:
        path = Path(args.output_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return result


def win_rate(args, policy, reference, tokenizer, pairs, judge, progress: bool) -> dict[str, Any]:
    """Replies of both models to the first distinct prompts that leave room for the new tokens, judged."""
    limit = min(n for n in (model_max_length(policy), model_max_length(reference), 10**9) if n is not None)
    prompts = []
    for row in pairs:
        prompt = row["prompt"]
        if prompt not in prompts and len(tokenizer(prompt)["input_ids"]) + args.max_new_tokens <= limit:
            prompts.append(prompt)
        if len(prompts) == args.judge_prompts:
            break
    if not prompts:
        raise ValueError(f"no prompt leaves room for {args.max_new_tokens} new tokens; lower --max_new_tokens")
    settings: dict[str, Any] = dict(max_new_tokens=args.max_new_tokens, do_sample=not args.greedy,
                                    batch_size=args.batch_size, progress=progress)
    if not args.greedy:
        settings.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    transformers.set_seed(args.seed)
    outcome = judged_win_rate(policy, reference, tokenizer, prompts, judge, tie_tolerance=args.tie_tolerance,
                              **settings)
    return {**outcome.as_dict(comparisons=True), "judge_model": args.judge_model}


def print_table(result: dict[str, Any]) -> None:
    scores = result["scores"]

    def percent(value):
        return "n/a (no reference)" if value is None else f"{value:.1%}"

    def number(value):
        return "n/a (no reference)" if value is None else f"{value:.4f}"

    rows = [
        ("pairs scored", f"{scores['pairs']}" + (f" ({result['pairs_too_long']} too long, left out)"
                                                  if result["pairs_too_long"] else "")),
        ("implicit-reward accuracy (chosen > rejected)", percent(scores["accuracy"])),
        (f"mean reward margin (beta {result['beta']:g})", number(scores["margin"])),
        ("DPO loss", number(scores["loss"])),
        ("mean log-prob, chosen replies", f"{scores['logps_chosen']:.4f}"),
        ("mean log-prob, rejected replies", f"{scores['logps_rejected']:.4f}"),
        ("reference-free accuracy (per-token log-prob)", f"{scores['reference_free_accuracy']:.1%}"),
    ]
    judged = result["win_rate"]
    if judged is not None:
        rows += [
            ("judged win rate vs reference (ties half)",
             f"{judged['win_rate']:.1%} [{judged['ci_low']:.1%}, {judged['ci_high']:.1%}]"),
            ("  wins / ties / losses", f"{judged['wins']} / {judged['ties']} / {judged['losses']}"),
        ]
    width = max(len(label) for label, _ in rows) + 2
    print(f"policy {result['policy']}  reference {result['reference'] or '-'}  data {result['data']}")
    print("-" * (width + 24))
    for label, value in rows:
        print(f"{label:<{width}}{value}")
    sys.stdout.flush()


if __name__ == "__main__":
    import datasets

    datasets.disable_progress_bars()  # stderr keeps our own bars only
    transformers.utils.logging.disable_progress_bar()
    run_cli(main)

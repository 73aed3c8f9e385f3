"""The evaluate command behind scripts/evaluate.py: its options and their checks, what it loads and in which order
(data first, so a wrong path fails before any model loads), the pairs that fit, the prompts a judged win rate uses,
and the results as a printed table and a JSON-ready dict. `scoring` and `judging` compute the numbers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..modeling.chat_templates import render_prompt, resolve_chat_template
from ..modeling.loading import model_max_length
from .judging import Judge, judged_win_rate
from .loading import check_checkpoint, load_causal_lm, load_preference_pairs, load_reward_model
from .options import (
    add_loading_arguments,
    check_at_least_one,
    check_output_json,
    check_top_p,
    command_parser,
    generation_settings,
    loading_kwargs,
    pick_device,
    write_json,
)
from .scoring import fit_pairs, preference_scores, text_pairs

USAGE = """Score a policy on held-out preference pairs against a reference, and optionally a judged win rate.

    python scripts/evaluate.py POLICY --data PATH_OR_HUB_ID [--reference REF] [--split test] [--max_samples N]
        [--beta 0.1] [--batch_size 16] [--output_json PATH]
        [--judge_model RM [--judge_prompts 100] [--max_new_tokens 50] [--greedy] [--seed 0] ...]

POLICY and REF are checkpoint folders or Hub ids (any transformers causal LM; GPT-2 ones load into our GPT-2 class).
The data is any preference source `alignment.data` reads: a local .jsonl/.json/.parquet/.csv file (one split, so
`--split` is ignored), a folder or a Hub id (`--split`, default "test"), in the hh, rm-static, stack-exchange or TRL
preference shape; conversational pairs (message lists) go through the policy tokenizer's chat template as the DPO
trainer renders them (`--chat_template` picks another). Pairs longer than the models' positions are left out (and
counted) rather than truncated. Pairs are scored as the DPO trainer scores them: each one packed sequence [prompt,
chosen, rejected], batches of `--batch_size` pairs of similar lengths, policy and reference on each batch in turn; a
model that layout would give other log-probs (recurrent layers, a sliding window shorter than the pairs) gets one
padded row a reply instead, with one warning line saying why.

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

REWARD_FIELDS = ("accuracy", "margin", "loss")  # meaningless without a reference
NO_REFERENCE = "n/a (no reference)"


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("evaluate.py", USAGE)
    parser.add_argument("policy", help="policy checkpoint folder or Hub id")
    parser.add_argument("--data", required=True, help="preference data: local file, folder or Hub id")
    parser.add_argument("--reference", default=None, help="reference checkpoint (e.g. the SFT model)")
    parser.add_argument("--split", default="test", help="split of a folder or Hub dataset (default: test)")
    parser.add_argument("--dataset_config", default=None, help="Hub config (subset) of the dataset")
    parser.add_argument(
        "--dataset_format",
        default=None,
        choices=("hh", "rm-static", "stack-exchange", "preference"),
        help="shape of the data (default: detected from the columns)",
    )
    parser.add_argument("--max_samples", type=int, default=None, help="score the first N pairs only")
    parser.add_argument(
        "--max_length",
        type=int,
        default=None,
        help="leave out pairs longer than this many tokens (default: the models' positions)",
    )
    parser.add_argument("--beta", type=float, default=0.1, help="β of the implicit reward and the DPO loss")
    parser.add_argument(
        "--batch_size", type=int, default=16, help="pairs a scoring batch; prompts a generation or judging batch"
    )
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
    """Bad option values and combinations, and checkpoints that cannot exist, before anything loads."""
    check_at_least_one(args, ["batch_size", "judge_prompts", "max_new_tokens", "top_k", "max_samples", "max_length"])
    if args.beta <= 0:
        raise ValueError(f"--beta must be positive, got {args.beta}")
    if args.judge_model is not None and args.reference is None:
        raise ValueError("--judge_model compares the policy's replies with the reference's: set --reference")
    if args.judge_model is not None and not args.greedy and args.temperature <= 0:
        raise ValueError(f"--temperature must be positive, got {args.temperature} (use --greedy)")
    check_top_p(args.top_p)
    check_output_json(args.output_json)
    resolve_chat_template(args.chat_template)
    for path, what in ((args.policy, "policy"), (args.reference, "reference"), (args.judge_model, "judge")):
        if path is not None:
            check_checkpoint(path, what)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """scripts/evaluate.py: the scores (and win rate), printed as a table, returned, and written with --output_json."""
    args = build_parser().parse_args(argv)
    check_options(args)
    progress = not args.no_progress
    # the data first: a wrong path fails before any model loads
    pairs = load_preference_pairs(
        args.data, args.split, format=args.dataset_format, config=args.dataset_config, max_samples=args.max_samples
    )
    device = pick_device(args.device)
    policy, tokenizer = load_causal_lm(args.policy, **loading_kwargs(args, device))
    reference = None
    if args.reference is not None:
        reference, _ = load_causal_lm(args.reference, **loading_kwargs(args, device))
    judge = None
    if args.judge_model is not None:
        judge = load_reward_model(
            args.judge_model,
            tokenizer_name_or_path=args.judge_tokenizer,
            trust_remote_code=args.trust_remote_code,
            device=device,
            batch_size=args.batch_size,
        )
    limits = [
        n
        for n in (args.max_length, *(model_max_length(m) for m in (policy, reference) if m is not None))
        if n is not None
    ]
    pairs = text_pairs(pairs, tokenizer)  # conversations through the policy's chat template, as DPO trains on them
    pairs, too_long = fit_pairs(pairs, tokenizer, min(limits) if limits else None)
    if not pairs:
        raise ValueError(
            f"all {too_long} pairs are longer than {min(limits)} tokens; raise --max_length or use "
            "a model with more positions"
        )

    scores = preference_scores(
        policy, reference, tokenizer, pairs, beta=args.beta, batch_size=args.batch_size, progress=progress
    ).as_dict()
    if reference is None:
        scores.update(dict.fromkeys(REWARD_FIELDS))
    result: dict[str, Any] = {
        "policy": args.policy,
        "reference": args.reference,
        "data": args.data,
        "split": None if Path(args.data).expanduser().is_file() else args.split,
        "beta": args.beta,
        "pairs_too_long": too_long,
        "scores": scores,
        "win_rate": None,
    }
    if judge is not None:
        result["win_rate"] = win_rate(args, policy, reference, tokenizer, pairs, judge, progress)
    print_table(result)
    write_json(args.output_json, result)
    return result


def judge_prompts(
    pairs: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, count: int, max_new_tokens: int, limit: int
) -> list[str]:
    """The first `count` distinct prompts of the pairs that leave room for `max_new_tokens` within `limit`, as text
    (a conversational prompt rendered through the chat template)."""
    prompts: list[str] = []
    for row in pairs:
        prompt = render_prompt(tokenizer, row["prompt"])
        if prompt not in prompts and len(tokenizer(prompt)["input_ids"]) + max_new_tokens <= limit:
            prompts.append(prompt)
        if len(prompts) == count:
            break
    if not prompts:
        raise ValueError(f"no prompt leaves room for {max_new_tokens} new tokens; lower --max_new_tokens")
    return prompts


def win_rate(
    args: argparse.Namespace,
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[dict[str, str]],
    judge: Judge,
    progress: bool,
) -> dict[str, Any]:
    """Replies of both models to the first distinct prompts that leave room for the new tokens, judged."""
    limit = min(n for n in (model_max_length(policy), model_max_length(reference), 10**9) if n is not None)
    prompts = judge_prompts(pairs, tokenizer, args.judge_prompts, args.max_new_tokens, limit)
    transformers.set_seed(args.seed)
    outcome = judged_win_rate(
        policy,
        reference,
        tokenizer,
        prompts,
        judge,
        tie_tolerance=args.tie_tolerance,
        progress=progress,
        **generation_settings(args),
    )
    return {**outcome.as_dict(comparisons=True), "judge_model": args.judge_model}


def print_table(result: dict[str, Any]) -> None:
    """The scores (and the judged win rate) as a two-column table on stdout."""
    scores = result["scores"]

    def percent(value: float | None) -> str:
        return NO_REFERENCE if value is None else f"{value:.1%}"

    def number(value: float | None) -> str:
        return NO_REFERENCE if value is None else f"{value:.4f}"

    too_long = f" ({result['pairs_too_long']} too long, left out)" if result["pairs_too_long"] else ""
    rows = [
        ("pairs scored", f"{scores['pairs']}{too_long}"),
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
            (
                "judged win rate vs reference (ties half)",
                f"{judged['win_rate']:.1%} [{judged['ci_low']:.1%}, {judged['ci_high']:.1%}]",
            ),
            ("  wins / ties / losses", f"{judged['wins']} / {judged['ties']} / {judged['losses']}"),
        ]
    width = max(len(label) for label, _ in rows) + 2
    print(f"policy {result['policy']}  reference {result['reference'] or '-'}  data {result['data']}")
    print("-" * (width + 24))
    for label, value in rows:
        print(f"{label:<{width}}{value}")
    sys.stdout.flush()

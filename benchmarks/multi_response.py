"""Multi-response prefix sharing, measured: forward + backward of the same DPO batches in the merged layout (one
sequence [prompt, u1, u2, …] per prompt of a batch, each distinct reply once) against the per-pair layout (one
[prompt, chosen, rejected] per pair, as before) and, with --trl, TRL's padded rows.

    python benchmarks/multi_response.py                       # 8 prompts x 4 completions x 6 pairs, batches of 8
    python benchmarks/multi_response.py --prompts 4 --repeats 1 --orders grouped --trl

The data are generated token ids with HH-RLHF's length profile: a long multi-turn prompt (log-normal, median ~110
tokens) and shorter replies (30-90 tokens), 4 completions per prompt and all 6 pairs of them. Two batch orders:
`grouped`, the order `group_pairs_by_prompt` draws (a prompt's pairs next to each other, so a batch of 8 holds 6
pairs of one prompt and 2 of the next), and `distinct`, batches whose pairs all have different prompts (what TRL's
shuffle gives on a dataset of thousands of prompts): there the two shared-prefix layouts are the same rows, and the
figure shows what the merging costs when it finds nothing to merge.

The model is our GPT-2 class with random weights (the `small` preset of `benchmarks/trl_comparison.py`: 4 layers x
256, GPT-2's 50257-token vocabulary), its log-prob head on the reply tokens, fp32 on the CPU. Each batch is timed in
every layout in turn, `repeats` times, and the best time of each is kept (other processes only ever slow a run
down); collation is timed apart. The loss of every batch must agree between the layouts (printed).
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, when run as a script

from alignment import AlignmentGPT2Config, AlignmentGPT2ForCausalLM  # noqa: E402
from alignment.training.layouts import score_batch, trl_layout  # noqa: E402
from alignment.training.logprobs import add_logprob_head  # noqa: E402
from alignment.training.losses import ReplyLogps, preference_loss  # noqa: E402
from alignment.training.shared_prefix import (  # noqa: E402
    PromptGroupedSampler,
    SharedPrefixPreferenceCollator,
    truncate_pair,
)

VOCAB = 50257
PRESET = {"n_layer": 4, "n_head": 4, "n_embd": 256}  # trl_comparison's "small"
LAYOUTS = ("merged", "per-pair", "trl")


def generated_pairs(prompts: int, seed: int = 0) -> list[dict]:
    """4 completions per prompt and all 6 pairs of them, as token ids with HH-RLHF-like lengths."""
    rng = random.Random(seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(VOCAB - 1) for _ in range(n)]

    rows = []
    for _ in range(prompts):
        prompt = ids(min(int(rng.lognormvariate(4.7, 0.5)), 400))
        completions = [ids(rng.randint(30, 90)) for _ in range(4)]
        for i, j in itertools.combinations(range(4), 2):
            rows.append({"prompt_ids": prompt, "chosen_ids": completions[i], "rejected_ids": completions[j]})
    return rows


def batches_in_order(pairs: list[dict], order: str, batch_size: int) -> list[list[dict]]:
    """`grouped`: `PromptGroupedSampler`'s order; `distinct`: pair k of every prompt, then pair k + 1, …"""
    if order == "grouped":
        indices = list(PromptGroupedSampler([p["prompt_ids"] for p in pairs], seed=0))
    else:
        indices = [prompt * 6 + k for k in range(6) for prompt in range(len(pairs) // 6)]
    return [[pairs[i] for i in indices[s : s + batch_size]] for s in range(0, len(indices), batch_size)]


def collate(layout: str, examples: list[dict], max_length: int) -> dict[str, torch.Tensor]:
    if layout == "trl":
        cut = [truncate_pair(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"], max_length) for e in examples]
        return trl_layout([dict(zip(("prompt_ids", "chosen_ids", "rejected_ids"), p)) for p in cut], 0)
    return SharedPrefixPreferenceCollator(0, max_length, merge_prompts=layout == "merged")(examples)


def step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """Forward and backward of DPO's loss against fixed reference log-probs (as precomputed ones would be)."""
    policy = score_batch(model, batch).reply_logps()
    zeros = torch.zeros_like(policy.chosen.detach())
    reference = ReplyLogps(zeros, zeros, None, None)
    loss = preference_loss(policy, reference, beta=0.1).loss
    loss.backward()
    return loss.item()


def measure(order: str, pairs: list[dict], model, args) -> dict[str, dict[str, float]]:
    batches = batches_in_order(pairs, order, args.batch_size)
    layouts = LAYOUTS if args.trl else LAYOUTS[:2]
    best = {layout: [float("inf")] * len(batches) for layout in layouts}
    collate_s = dict.fromkeys(layouts, 0.0)
    losses = {layout: [0.0] * len(batches) for layout in layouts}
    shapes = {layout: [0, 0] for layout in layouts}  # positions through the model, tokens through the head
    collated = {}
    for layout in layouts:
        collate(layout, batches[0], args.max_length)  # warm-up
        start = time.perf_counter()
        collated[layout] = [collate(layout, b, args.max_length) for b in batches]
        collate_s[layout] = (time.perf_counter() - start) / len(batches)
        for batch in collated[layout]:
            shapes[layout][0] += batch["input_ids"].numel()
            shapes[layout][1] += (
                len(batch["score_unique"]) if "score_unique" in batch
                else len(batch["score_targets"]) if "score_targets" in batch
                else int(batch["completion_mask"][:, 1:].sum())
            )  # fmt: skip
    step(model, collated[layouts[0]][0])  # warm-up
    for repeat in range(args.repeats):
        for b in range(len(batches)):
            for layout in layouts if (repeat + b) % 2 == 0 else reversed(layouts):  # alternate who goes first
                model.zero_grad(set_to_none=True)
                start = time.perf_counter()
                losses[layout][b] = step(model, collated[layout][b])
                best[layout][b] = min(best[layout][b], time.perf_counter() - start)
    return {
        layout: {
            "seconds": sum(best[layout]),
            "pairs_per_s": len(pairs) / sum(best[layout]),
            "collate_ms": 1000 * collate_s[layout],
            "positions": shapes[layout][0] / len(batches),
            "head_tokens": shapes[layout][1] / len(batches),
            "loss_diff": max(abs(a - b) for a, b in zip(losses[layout], losses[layouts[0]])),
        }
        for layout in layouts
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8, help="prompts of 4 completions (6 pairs each)")
    parser.add_argument("--batch_size", type=int, default=8, help="pairs per batch (the recipes' 8)")
    parser.add_argument("--max_length", type=int, default=512, help="TRL's max_length (the recipes' 512)")
    parser.add_argument("--repeats", type=int, default=2, help="timings per batch and layout; the best is kept")
    parser.add_argument("--orders", choices=["grouped", "distinct", "both"], default="both")
    parser.add_argument("--trl", action="store_true", help="time TRL's padded rows too")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.prompts < args.batch_size and args.orders != "grouped":
        parser.error("--orders distinct needs --prompts >= --batch_size (a batch of pairs of different prompts)")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = AlignmentGPT2ForCausalLM(AlignmentGPT2Config(vocab_size=VOCAB, n_positions=1024, **PRESET))
    model = add_logprob_head(model.eval())  # no dropout, so that the layouts' losses compare
    pairs = generated_pairs(args.prompts)
    prompt_tokens = sum(len(p["prompt_ids"]) for p in pairs[::6]) / args.prompts
    reply_tokens = sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs) / (2 * len(pairs))
    print(
        f"{len(pairs)} pairs ({args.prompts} prompts x 4 completions x 6 pairs), prompts {prompt_tokens:.0f} tokens "
        f"and replies {reply_tokens:.0f} on average; GPT-2 {PRESET['n_layer']} x {PRESET['n_embd']}, vocab {VOCAB}, "
        f"fp32; batches of {args.batch_size}, max_length {args.max_length}; {torch.get_num_threads()} CPU threads"
    )
    orders = ("grouped", "distinct") if args.orders == "both" else (args.orders,)
    for order in orders:
        results = measure(order, pairs, model, args)
        print(f"\n{order} batches:")
        print(f"{'layout':10} {'positions':>10} {'head tokens':>12} {'collate ms':>11} {'fwd+bwd s':>10} "
              f"{'pairs/s':>8} {'vs per-pair':>12} {'loss diff':>10}")  # fmt: skip
        for layout, r in results.items():
            print(
                f"{layout:10} {r['positions']:10.0f} {r['head_tokens']:12.0f} {r['collate_ms']:11.1f} "
                f"{r['seconds']:10.2f} {r['pairs_per_s']:8.2f} "
                f"{results['per-pair']['seconds'] / r['seconds']:11.2f}x {r['loss_diff']:10.1e}"
            )


if __name__ == "__main__":
    main()

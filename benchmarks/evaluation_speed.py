"""Scoring held-out preference pairs (what `scripts/evaluate.py` does): each reply in its own padded row, as the
issue measured it, against the path `preference_scores` takes, on the same pairs, weights and batch size.

    python -m benchmarks.evaluation_speed --model llama --layers 4 --pairs 40
    python -m benchmarks.evaluation_speed --pairs 400 --positions_only   # the work each side does, no timing

Sides, each scoring every pair under a policy and a reference (random weights, saved once and loaded with
`load_causal_lm`, as evaluate.py loads checkpoints):

* per-reply: `reply_logps` for the chosen and then the rejected replies of each model, `--batch_size` rows a batch in
  the data's order (evaluate.py's fallback, and what it did before it packed pairs);
* packed-unsorted: the trainer's shared-prefix collator on `--batch_size` pairs in the data's order, the model's
  training log-prob head, each pair tokenised one call at a time (the packed path before it sorted its batches);
* evaluate: `preference_scores` as evaluate.py calls it (tokenising, the layout check and the scoring).

The models: `--model llama` is SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads, 3 key-value heads, MLP 1536,
tied embeddings) over GPT-2's vocabulary (50,257 rather than SmolLM2's 49,152: GPT-2's is the only tokenizer
offline); `--model gpt2` is GPT-2 small (our class; `--implementation transformers` for transformers' own).
`--layers` takes fewer layers for quick runs. The pairs are the HH-RLHF sample in ../shared/data/hh-rlhf/ when
present (`--data` another file), else generated HH-shaped pairs; pairs longer than `--max_length` are left out, as
evaluate.py leaves them out.

Timings are wall and CPU seconds, the best of `--repeats` interleaved runs after a warm-up (other processes on a
shared machine only ever slow a run down); `--threads 1` gives the steadiest CPU seconds on a busy machine. Every
side's scores are compared with the per-reply ones, and so are its per-pair summed log-probs (relative to their size,
since a sum of float32 log-probs over a reply is only good to ~1e-7 of itself): the benchmark fails where scores
differ by more than 1e-5 or a pair's log-probs by more than 1e-6 of themselves.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

HH_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-sample.jsonl.gz"
TOLERANCE = 1e-5  # on the scores evaluate.py reports
PAIR_TOLERANCE = 1e-6  # on each pair's summed log-probs, relative
SMOLLM2_135M = dict(
    hidden_size=576,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    intermediate_size=1536,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
GPT2_SMALL = dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024)


def save_models(model: str, layers: int | None, folder: Path) -> tuple[Path, Path]:
    """A random policy and reference (different seeds) of the chosen shape, saved with GPT-2's tokenizer."""
    import transformers

    from alignment.modeling.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("gpt2")
    paths = []
    for seed, name in enumerate(("policy", "reference")):
        torch.manual_seed(seed)
        if model == "llama":
            shape = dict(SMOLLM2_135M, num_hidden_layers=layers or SMOLLM2_135M["num_hidden_layers"])
            ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
            config = transformers.LlamaConfig(vocab_size=len(tokenizer), **shape, **ids)
            network = transformers.LlamaForCausalLM(config)
        else:
            shape = dict(GPT2_SMALL, n_layer=layers or GPT2_SMALL["n_layer"])
            dropout = dict(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
            network = transformers.GPT2LMHeadModel(
                transformers.GPT2Config(vocab_size=len(tokenizer), **shape, **dropout)
            )
        path = folder / name
        network.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


def held_out_pairs(data: str | None, count: int, tokenizer, max_length: int) -> tuple[list[dict[str, str]], str]:
    """The first `count` pairs of the data that fit `max_length` (as evaluate.py reads and filters them)."""
    from alignment.evaluation.loading import load_preference_pairs
    from alignment.evaluation.scoring import fit_pairs, text_pairs

    path = data or (str(HH_SAMPLE) if HH_SAMPLE.exists() else None)
    if path is None:
        from benchmarks.trl_comparison import synthetic_pairs

        rows, source = synthetic_pairs(3 * count), "generated HH-shaped pairs"
    else:
        rows, source = load_preference_pairs(path, max_samples=3 * count), path
    kept, _ = fit_pairs(text_pairs(rows, tokenizer), tokenizer, max_length)
    return kept[:count], source


def per_reply(models: Sequence, tokenizer, pairs: list[dict[str, str]], batch_size: int) -> list:
    """Each reply its own right-padded row, chosen then rejected, model after model, in the data's order."""
    from alignment.evaluation import reply_logps
    from alignment.training.losses import ReplyLogps

    prompts = [row["prompt"] for row in pairs]
    scored = []
    for model in models:
        chosen, chosen_length = reply_logps(model, tokenizer, prompts, [r["chosen"] for r in pairs], batch_size)
        rejected, rejected_length = reply_logps(model, tokenizer, prompts, [r["rejected"] for r in pairs], batch_size)
        scored.append(ReplyLogps(chosen, rejected, chosen_length, rejected_length))
    return scored


@torch.no_grad()
def packed_unsorted(models: Sequence, tokenizer, pairs: list[dict[str, str]], batch_size: int) -> list:
    """The trainer's shared-prefix batches of `batch_size` pairs in the data's order, policy and reference on each
    batch, through the model's training log-prob head (the packed path before its batches were sorted)."""
    from alignment.evaluation.scoring import _prompt_reply_ids
    from alignment.training.layouts import score_batch
    from alignment.training.logprobs import add_logprob_head
    from alignment.training.losses import ReplyLogps
    from alignment.training.shared_prefix import SharedPrefixPreferenceCollator

    collator = SharedPrefixPreferenceCollator(tokenizer.pad_token_id)
    for model in models:
        add_logprob_head(model).eval()
    parts = [[] for _ in models]
    for start in range(0, len(pairs), batch_size):
        rows = pairs[start : start + batch_size]
        entries, owners = [], []
        for i, row in enumerate(rows):  # one tokenizer call a text, as the packed path did
            (chosen, n_chosen), (rejected, n_rejected) = (
                _prompt_reply_ids(tokenizer, row["prompt"], row[key]) for key in ("chosen", "rejected")
            )
            if chosen[:n_chosen] == rejected[:n_rejected]:
                split = [(chosen[:n_chosen], chosen[n_chosen:], rejected[n_rejected:])]
            else:
                split = [(chosen[:n_chosen], chosen[n_chosen:], []), (rejected[:n_rejected], [], rejected[n_rejected:])]
            for prompt, chosen_ids, rejected_ids in split:
                entries.append({"prompt_ids": prompt, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids})
                owners.append(i)
        batch = collator(entries)
        owner = torch.tensor(owners)
        for model, part in zip(models, parts):
            scored = score_batch(model, batch)
            scored.logps = scored.logps.double()
            by_entry = scored.reply_logps()
            fields = (getattr(by_entry, name) for name in ("chosen", "rejected", "chosen_length", "rejected_length"))
            part.append([values.new_zeros(len(rows)).index_add(0, owner, values) for values in fields])
    return [ReplyLogps(*(torch.cat(column) for column in zip(*part))) for part in parts]


def positions(tokenizer, pairs: list[dict[str, str]], batch_size: int) -> dict[str, int]:
    """Positions each side runs through a model's layers (padding included), and the reply tokens its head scores."""
    from alignment.evaluation.scoring import _prompt_reply_ids, all_pair_entries, packed_batches, pair_entries
    from alignment.training.shared_prefix import SharedPrefixPreferenceCollator

    counts = dict.fromkeys(("per-reply", "packed-unsorted", "evaluate", "reply tokens"), 0)
    collator = SharedPrefixPreferenceCollator(tokenizer.pad_token_id)
    for start in range(0, len(pairs), batch_size):
        rows = pairs[start : start + batch_size]
        for key in ("chosen", "rejected"):
            ids = [_prompt_reply_ids(tokenizer, r["prompt"], r[key]) for r in rows]
            counts["per-reply"] += len(rows) * max(len(full) for full, _ in ids)
            counts["reply tokens"] += sum(len(full) - shared for full, shared in ids)
        entries = [
            dict(zip(("prompt_ids", "chosen_ids", "rejected_ids"), e)) for r in rows for e in pair_entries(tokenizer, r)
        ]
        counts["packed-unsorted"] += collator(entries)["input_ids"].numel()
    batches = packed_batches(all_pair_entries(tokenizer, pairs), batch_size, tokenizer.pad_token_id)
    counts["evaluate"] = sum(batch["input_ids"].numel() for batch, _ in batches)
    return counts


def timed(run: Callable[[], object], best: dict[str, float]) -> object:
    start, start_cpu = time.perf_counter(), time.process_time()
    result = run()
    best["wall"] = min(best.get("wall", float("inf")), time.perf_counter() - start)
    best["cpu"] = min(best.get("cpu", float("inf")), time.process_time() - start_cpu)
    return result


def compare(name: str, ours, theirs, scores, their_scores) -> tuple[float, float]:
    """The largest difference between two sides' scores, and between their per-pair log-probs relative to their
    size (a sum over a reply's tokens of float32 log-probs, each good to ~1e-7 of itself); raises past the
    tolerances."""
    pairs = 0.0
    for mine, other in zip(ours, theirs):
        for field in ("chosen", "rejected"):
            a, b = getattr(mine, field), getattr(other, field)
            pairs = max(pairs, ((a - b).abs() / b.abs().clamp(min=1)).max().item())
        for field in ("chosen_length", "rejected_length"):
            if not torch.equal(getattr(mine, field), getattr(other, field)):
                raise SystemExit(f"{name}: reply lengths differ from the per-reply rows'")
    worst = max(abs(getattr(scores, f.name) - getattr(their_scores, f.name)) for f in dataclasses.fields(scores))
    if worst > TOLERANCE or pairs > PAIR_TOLERANCE:
        raise SystemExit(
            f"{name}: scores differ from the per-reply rows' by {worst:.2g} (tolerance {TOLERANCE}), per-pair "
            f"log-probs by {pairs:.2g} of their size (tolerance {PAIR_TOLERANCE})"
        )
    return worst, pairs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=("llama", "gpt2"), default="llama")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers (default: the full model's)")
    parser.add_argument(
        "--implementation", choices=("alignment", "transformers"), default="alignment", help="for GPT-2"
    )
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=16, help="evaluate.py's default")
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--data", default=None, help=f"preference pairs (default: {HH_SAMPLE.name} if present)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--sides", default="per-reply,packed-unsorted,evaluate", help="comma-separated")
    parser.add_argument(
        "--positions_only", action="store_true", help="count each side's positions only (no model, no timing)"
    )
    args = parser.parse_args(argv)
    if args.positions_only:
        from alignment.modeling.tokenizer import load_tokenizer

        tokenizer = load_tokenizer("gpt2")
        pairs, source = held_out_pairs(args.data, args.pairs, tokenizer, args.max_length)
        counts = positions(tokenizer, pairs, args.batch_size)
        print(f"{len(pairs)} pairs from {source}, batch_size {args.batch_size}; positions through the layers:")
        print(", ".join(f"{k} {v}" for k, v in counts.items()))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    from alignment.evaluation.loading import load_causal_lm

    sides = args.sides.split(",")
    with tempfile.TemporaryDirectory() as folder:
        policy_path, reference_path = save_models(args.model, args.layers, Path(folder))
        kwargs = dict(model_implementation=args.implementation)
        policy, tokenizer = load_causal_lm(str(policy_path), **kwargs)
        reference, _ = load_causal_lm(str(reference_path), **kwargs)
    pairs, source = held_out_pairs(args.data, args.pairs, tokenizer, args.max_length)
    layers = policy.config.get_text_config().num_hidden_layers
    print(
        f"{len(pairs)} pairs from {source}; {type(policy).__name__} with {layers} layers, "
        f"{sum(p.numel() for p in policy.parameters()) / 1e6:.0f}M parameters; policy and reference; "
        f"batch_size {args.batch_size}; {torch.get_num_threads()} threads"
    )
    counts = positions(tokenizer, pairs, args.batch_size)
    print("positions through the layers: " + ", ".join(f"{k} {v}" for k, v in counts.items()))

    models = [policy, reference]
    runs: dict[str, Callable[[list], tuple[list, object]]] = {
        "per-reply": lambda rows: _with_scores(per_reply(models, tokenizer, rows, args.batch_size)),
        "packed-unsorted": lambda rows: _with_scores(packed_unsorted(models, tokenizer, rows, args.batch_size)),
        "evaluate": lambda rows: evaluate_path(policy, reference, tokenizer, rows, args.batch_size),
    }
    for side in sides:  # warm-up: first calls of every kernel, the layout check
        runs[side](pairs[:2])
    best: dict[str, dict[str, float]] = {side: {} for side in sides}
    results = {}
    for _ in range(args.repeats):
        for side in sides:
            results[side] = timed(lambda side=side: runs[side](pairs), best[side])
            print(f"{side:16} best {best[side]['wall']:7.2f} s wall {best[side]['cpu']:7.2f} s CPU", flush=True)
    if "per-reply" in results:
        baseline, baseline_scores = results["per-reply"]
        for side, (logps, scores) in results.items():
            if side == "per-reply":
                continue
            worst, relative = compare(side, logps, baseline, scores, baseline_scores)
            speed_wall = best["per-reply"]["wall"] / best[side]["wall"]
            speed_cpu = best["per-reply"]["cpu"] / best[side]["cpu"]
            print(
                f"{side}: {speed_wall:.2f}x per-reply's speed (wall), {speed_cpu:.2f}x (CPU); scores within "
                f"{worst:.1e} of per-reply's, per-pair log-probs within {relative:.1e} of their size"
            )
    for side, (_, scores) in results.items():
        print(f"{side}: {scores}")


def evaluate_path(policy, reference, tokenizer, pairs: list[dict[str, str]], batch_size: int) -> tuple[list, object]:
    """`preference_scores` as evaluate.py calls it, and the per-pair log-probs it scored from (caught on their way
    to `scores_from_logps`, for the comparison)."""
    from alignment.evaluation import scoring

    caught = []
    original = scoring.scores_from_logps

    def catch(policy_logps, reference_logps, beta):
        caught[:] = [policy_logps, reference_logps]
        return original(policy_logps, reference_logps, beta)

    scoring.scores_from_logps = catch
    try:
        scores = scoring.preference_scores(policy, reference, tokenizer, pairs, batch_size=batch_size)
    finally:
        scoring.scores_from_logps = original
    return caught, scores


def _with_scores(logps: list) -> tuple[list, object]:
    from alignment.evaluation.scoring import scores_from_logps

    return logps, scores_from_logps(logps[0], logps[-1], beta=0.1)


if __name__ == "__main__":
    main()

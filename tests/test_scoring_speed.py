"""What makes evaluation's scoring fast, and that it changes no number: pairs tokenised in batched calls, batches cut
from the pairs sorted by length (little padding, a prompt's pairs together), the scores back in the data's order,
policy and reference once per batch without autograd, a head that computes the log-probs alone; and that
scripts/evaluate.py takes this path for GPT-2 (ours and transformers') and a Llama, and says so in one line when it
cannot. Speed itself is measured by benchmarks/evaluation_speed.py, never by a test."""

import json
import logging

import pytest
import torch
import transformers

from alignment.evaluation import reply_logps, scoring
from alignment.evaluation import report as evaluate_command
from alignment.evaluation.scoring import (
    MIN_FILL,
    _logsumexp_,
    _prompt_reply_ids,
    _ReplyHead,
    all_pair_entries,
    fit_pairs,
    packed_batches,
    pair_batches,
    preference_scores,
    scores_from_logps,
    shared_prefix_logps,
)
from alignment.training import logprobs
from alignment.training.layouts import score_batch
from alignment.training.logprobs import add_logprob_head
from alignment.training.losses import ReplyLogps
from alignment.training.shared_prefix import SharedPrefixPreferenceCollator
from tests.conftest import sliding_window_mistral, tiny_causal_lms
from tests.test_scoring import MERGING_PAIRS

MODELS = list(tiny_causal_lms())  # ours, transformers' GPT-2, a transformers Llama
PROMPT = "\n\nHuman: Name a colour.\n\nAssistant:"


def mixed_pairs():
    """Pairs whose lengths sorting reorders (short, long, middling), two prompts asked twice with other replies (the
    second time with a reply the first time had), and one whose prompt tokenises differently for its two replies."""
    rows = []
    for i in range(6):
        turns = "".join(f"\n\nHuman: question {i} part {k}?\n\nAssistant: answer {k}." for k in range((5 * i) % 7))
        rows.append(
            {
                "prompt": f"{turns}\n\nHuman: What is {i} + 1?\n\nAssistant:",
                "chosen": f" {i + 1}" + " indeed" * ((3 * i) % 4),
                "rejected": f" It is {i + 2}, I think" + ", surely" * (i % 3) + ".",
            }
        )
    rows.insert(2, {"prompt": PROMPT, "chosen": " Blue.", "rejected": " I would rather not say."})
    rows.append({"prompt": PROMPT, "chosen": " Green, the colour of grass.", "rejected": " Blue."})
    rows.append(dict(rows[0], chosen=" 1, of course."))
    return rows + MERGING_PAIRS[:1]


def per_reply(models, tokenizer, rows, batch_size=4):
    """The old path: each reply in its own padded row, in the data's order (`reply_logps`)."""
    prompts = [r["prompt"] for r in rows]
    scored = []
    for model in models:
        (chosen, chosen_length), (rejected, rejected_length) = (
            reply_logps(model, tokenizer, prompts, [r[key] for r in rows], batch_size) for key in ("chosen", "rejected")
        )
        scored.append(ReplyLogps(chosen, rejected, chosen_length, rejected_length))
    return scored


def models(name):
    torch.manual_seed(0)
    return tiny_causal_lms()[name]().eval(), tiny_causal_lms()[name]().eval()


def test_batched_tokenisation_equals_one_text_at_a_time(gpt2_tokenizer):
    rows = mixed_pairs() + MERGING_PAIRS
    expected = []
    for row in rows:
        (chosen, n_chosen), (rejected, n_rejected) = (
            _prompt_reply_ids(gpt2_tokenizer, row["prompt"], row[key]) for key in ("chosen", "rejected")
        )
        if chosen[:n_chosen] == rejected[:n_rejected]:
            expected.append([(chosen[:n_chosen], chosen[n_chosen:], rejected[n_rejected:])])
        else:
            expected.append(
                [(chosen[:n_chosen], chosen[n_chosen:], []), (rejected[:n_rejected], [], rejected[n_rejected:])]
            )
    assert all_pair_entries(gpt2_tokenizer, rows) == expected
    assert sum(len(entries) == 2 for entries in expected) == 3  # the merging pairs are in, and split
    lengths = [
        max(len(_prompt_reply_ids(gpt2_tokenizer, r["prompt"], r[k])[0]) for k in ("chosen", "rejected")) for r in rows
    ]
    limit = sorted(lengths)[len(lengths) // 2]
    assert fit_pairs(rows, gpt2_tokenizer, limit) == (
        [r for r, n in zip(rows, lengths) if n <= limit],
        sum(n > limit for n in lengths),
    )


def test_batches_are_sorted_filled_and_keep_a_prompts_pairs_together():
    generator = torch.Generator().manual_seed(0)
    entries = []
    for i in range(60):  # prompts of 5 to 300 tokens; every fifth prompt asked three times
        prompt = [i] * int(torch.randint(5, 300, (1,), generator=generator))
        for k in range(3 if i % 5 == 0 else 1):
            entries.append([(prompt, [1000 + k] * (3 + k), [2000 + k] * (9 - 2 * k))])
    order = torch.randperm(len(entries), generator=generator).tolist()
    entries = [entries[i] for i in order]
    length = [len(p) + len(c) + len(r) for ((p, c, r),) in entries]
    prompt_of = [tuple(p) for ((p, _, _),) in entries]

    batches = pair_batches(entries, batch_size=8)
    assert sorted(i for batch in batches for i in batch) == list(range(len(entries)))
    assert all(1 <= len(batch) <= 8 for batch in batches)
    heads = [length[batch[0]] for batch in batches]
    assert heads == sorted(heads, reverse=True)  # longest first
    for batch in batches:
        assert length[batch[0]] == max(length[i] for i in batch)
        groups = {prompt_of[i] for i in batch}
        if len(groups) == len(batch):  # no prompt twice: the batch's pairs fill its rows
            assert sum(length[i] for i in batch) >= MIN_FILL * len(batch) * length[batch[0]]
    for prompt in set(prompt_of):  # a prompt's pairs, three at most, share one batch
        assert sum(any(prompt_of[i] == prompt for i in batch) for batch in batches) == 1

    collated = list(packed_batches(entries, 8, pad_token_id=0))
    positions = sum(batch["input_ids"].numel() for batch, _ in collated)
    assert positions <= sum(length) / MIN_FILL
    unsorted = sum(  # the data's order, as the packed path batched before
        SharedPrefixPreferenceCollator(0)(rows)["input_ids"].numel()
        for rows in (
            [dict(zip(("prompt_ids", "chosen_ids", "rejected_ids"), pair[0])) for pair in entries[start : start + 8]]
            for start in range(0, len(entries), 8)
        )
    )
    assert positions < unsorted, (positions, unsorted)
    assert [owners.tolist() for _, owners in collated] == batches  # one entry a pair here


@pytest.mark.parametrize("name", MODELS)
def test_evaluate_path_equals_per_reply_rows_in_the_datas_order(gpt2_tokenizer, name):
    policy, reference = models(name)
    rows = mixed_pairs()
    expected = per_reply([policy, reference], gpt2_tokenizer, rows)
    order = [i for batch in pair_batches(all_pair_entries(gpt2_tokenizer, rows), 3) for i in batch]
    assert order != sorted(order)  # the batches take the pairs in another order than the data's
    for batch_size in (3, len(rows)):
        scored = shared_prefix_logps([policy, reference], gpt2_tokenizer, rows, batch_size)
        for ours, theirs in zip(scored, expected):
            for key in ("chosen", "rejected"):
                torch.testing.assert_close(getattr(ours, key), getattr(theirs, key), atol=1e-5, rtol=0)
                assert torch.equal(getattr(ours, f"{key}_length"), getattr(theirs, f"{key}_length"))
    for reference_model, reference_logps in ((reference, expected[1]), (None, None)):
        scores = preference_scores(policy, reference_model, gpt2_tokenizer, rows, beta=0.5, batch_size=3)
        old = scores_from_logps(expected[0], reference_logps, beta=0.5)
        for field, value in scores.as_dict().items():
            assert abs(value - getattr(old, field)) <= 1e-5, (field, value, getattr(old, field))
    assert 0 < old.reference_free_accuracy < 1 and scores.pairs == len(rows)


@pytest.mark.parametrize("name", MODELS)
def test_reply_head_equals_the_training_head(gpt2_tokenizer, name):
    model, _ = models(name)
    config = model.config.get_text_config()
    config.final_logit_softcapping, config.logit_scale = 3.0, 0.5  # both heads read the transform off the config
    entries = [entry for pair in all_pair_entries(gpt2_tokenizer, mixed_pairs()) for entry in pair]
    batch, _ = next(packed_batches([[entry] for entry in entries], len(entries), gpt2_tokenizer.eos_token_id))
    head = _ReplyHead(model)
    with torch.no_grad():
        ours = score_batch(head, batch).logps
        theirs = score_batch(add_logprob_head(model), batch).logps
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    assert head.transform.softcap == 3.0 and head.transform.scale == 0.5
    with pytest.raises(ValueError, match="log-probs only"):
        head(**{k: batch[k] for k in ("input_ids", "score_positions", "score_targets")}, token_logps="with_stats")

    logits = torch.randn(5, 7) * 20
    logits[1] = float("-inf")
    logits[2, 3] = float("inf")
    torch.testing.assert_close(_logsumexp_(logits.clone()), logits.logsumexp(dim=1), atol=0, rtol=0)


def test_one_pass_each_model_once_a_batch_without_autograd_nor_the_training_head(gpt2_tokenizer, monkeypatch):
    policy, reference = models("transformers-llama")
    policy.train()  # scoring puts it in eval mode
    calls = []
    for label, model in (("policy", policy), ("reference", reference)):
        model.model.register_forward_hook(
            lambda module, *_, label=label: calls.append((label, torch.is_grad_enabled(), module.training))
        )
    rows = mixed_pairs()

    def training_head(*args, **kwargs):
        raise AssertionError("the training head's statistics are not evaluation's")

    monkeypatch.setattr(logprobs._ChunkedTokenLogProbs, "apply", training_head)
    batches = pair_batches(all_pair_entries(gpt2_tokenizer, rows), 3)
    scored = shared_prefix_logps([policy, reference], gpt2_tokenizer, rows, batch_size=3)
    assert len(batches) > 2
    assert calls == [("policy", False, False), ("reference", False, False)] * len(batches)
    assert not any(part.chosen.requires_grad for part in scored)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, gpt2_tokenizer):
    """Tiny checkpoints: our GPT-2, a transformers Llama, a Mistral whose sliding window (8) the pairs outrun; the
    pairs as a file."""
    root = tmp_path_factory.mktemp("scoring-speed")
    folders = {}
    torch.manual_seed(0)
    mistral = sliding_window_mistral()
    for name, model in (("ours", models("ours")[0]), ("llama", models("transformers-llama")[0]), ("mistral", mistral)):
        model.save_pretrained(root / name)
        gpt2_tokenizer.save_pretrained(root / name)
        folders[name] = str(root / name)
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in mixed_pairs()))
    folders["data"] = str(data)
    return folders


def evaluate(saved, name, *extra):
    return evaluate_command.main(
        [saved[name], "--reference", saved[name], "--data", saved["data"], "--device", "cpu", "--no_progress", *extra]
    )["scores"]


@pytest.mark.parametrize("name", ["ours", "llama"])
def test_evaluate_command_takes_the_packed_path(saved, name, monkeypatch, caplog):
    def per_reply_rows(*args, **kwargs):
        raise AssertionError("evaluate.py fell back to one padded row a reply")

    monkeypatch.setattr(scoring, "reply_logps", per_reply_rows)
    with caplog.at_level(logging.INFO, logger="alignment.evaluation.scoring"):
        scores = evaluate(saved, name, "--batch_size", "3")
    assert not [r for r in caplog.records if r.name == "alignment.evaluation.scoring"]
    assert scores["pairs"] == len(mixed_pairs()) and scores["margin"] == 0.0  # its own reference


def test_evaluate_command_says_in_one_line_when_it_cannot_pack(saved, gpt2_tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="alignment.evaluation.scoring"):
        scores = evaluate(saved, "mistral", "--batch_size", "4")
    lines = [r.getMessage() for r in caplog.records if r.name == "alignment.evaluation.scoring"]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith("prefix sharing is off for this model:") and "sliding window of 8" in lines[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(saved["mistral"]).eval()
    expected = scores_from_logps(*per_reply([model], gpt2_tokenizer, mixed_pairs()) * 2, beta=0.1)
    for field, value in expected.as_dict().items():
        assert abs(scores[field] - value) <= 1e-5, field


def test_the_benchmarks_sides_agree_and_count_their_work(gpt2_tokenizer):
    """benchmarks/evaluation_speed.py's other sides (the old paths) on a tiny model: the numbers it compares agree,
    its comparison fails on a difference, and its counts of the work are the layouts' (per-reply rows the most)."""
    from benchmarks.evaluation_speed import compare, evaluate_path, packed_unsorted, per_reply, positions

    policy, reference = models("transformers-llama")
    rows = mixed_pairs()
    old = per_reply([policy, reference], gpt2_tokenizer, rows, 4)
    old_scores = scores_from_logps(old[0], old[1], beta=0.1)
    for logps, scores in (
        (packed_unsorted([policy, reference], gpt2_tokenizer, rows, 4), None),
        evaluate_path(policy, reference, gpt2_tokenizer, rows, 4),
    ):
        scores = scores or scores_from_logps(logps[0], logps[1], beta=0.1)
        worst, relative = compare("side", logps, old, scores, old_scores)
        assert worst <= 1e-5 and relative <= 1e-6
    shifted = [ReplyLogps(part.chosen + 1e-3, part.rejected, part.chosen_length, part.rejected_length) for part in old]
    with pytest.raises(SystemExit, match="differ from the per-reply rows'"):
        compare("side", shifted, old, scores_from_logps(shifted[0], shifted[1], beta=0.1), old_scores)
    counts = positions(gpt2_tokenizer, rows, 4)
    assert counts["per-reply"] > max(counts["packed-unsorted"], counts["evaluate"])
    assert counts["reply tokens"] == sum((part.chosen_length + part.rejected_length).sum().item() for part in old[:1])

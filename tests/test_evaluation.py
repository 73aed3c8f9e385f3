"""Evaluation helpers against direct computations: log-probs, preference scores, generation, judged win rates."""

import json
import math

import pytest
import torch
import transformers

from alignment.data import DataFormatError
from alignment.evaluation import (
    HH_HUMAN,
    cut_at,
    fit_pairs,
    generate,
    judged_win_rate,
    load_preference_pairs,
    preference_scores,
    reply_logps,
    reward_model_judge,
    wilson_interval,
    win_rate_from_counts,
)
from tests.conftest import preference_rows, tiny_causal_lms


def direct_reply_logp(model, tokenizer, prompt, reply):
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(prompt + reply)["input_ids"] + [tokenizer.eos_token_id]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    logps = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    return logps[len(prompt_ids) - 1 :].sum().item(), len(ids) - len(prompt_ids)


def test_reply_logps_batched_equal_one_by_one(gpt2_tokenizer):
    torch.manual_seed(0)
    model = tiny_causal_lms()["ours"]().eval()
    rows = preference_rows(5)
    prompts, replies = [r["prompt"] for r in rows], [r["rejected"] for r in rows]
    sums, lengths = reply_logps(model, gpt2_tokenizer, prompts, replies, batch_size=2)
    for i, (p, r) in enumerate(zip(prompts, replies)):
        expected, n = direct_reply_logp(model, gpt2_tokenizer, p, r)
        assert abs(sums[i].item() - expected) <= 1e-4 and lengths[i].item() == n


def test_preference_scores_against_a_reference(gpt2_tokenizer):
    torch.manual_seed(0)
    reference = tiny_causal_lms()["ours"]().eval()
    rows = preference_rows(6)
    same = preference_scores(reference, reference, gpt2_tokenizer, rows)
    assert same.accuracy == 0.0 and abs(same.margin) < 1e-6 and abs(same.loss - 0.6931) < 1e-3
    # a policy fine-tuned for a few steps on the chosen dialogues prefers the chosen replies
    policy = tiny_causal_lms()["ours"]()
    policy.load_state_dict(reference.state_dict())
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    batch = gpt2_tokenizer([r["prompt"] + r["chosen"] for r in rows], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for _ in range(10):
        optimizer.zero_grad()
        policy(**batch, labels=labels).loss.backward()
        optimizer.step()
    policy.eval()
    scores = preference_scores(policy, reference, gpt2_tokenizer, rows, beta=0.1)

    def direct(model, key):
        return torch.tensor([direct_reply_logp(model, gpt2_tokenizer, r["prompt"], r[key]) for r in rows])

    (pc, lc), (pr, lr) = direct(policy, "chosen").T, direct(policy, "rejected").T
    (rc, _), (rr, _) = direct(reference, "chosen").T, direct(reference, "rejected").T
    margins = 0.1 * ((pc - rc) - (pr - rr))
    assert abs(scores.margin - margins.mean().item()) <= 1e-4
    assert abs(scores.accuracy - (margins > 0).float().mean().item()) <= 1e-6
    assert abs(scores.loss - torch.nn.functional.softplus(-margins).mean().item()) <= 1e-4
    assert abs(scores.reference_free_accuracy - (pc / lc > pr / lr).float().mean().item()) <= 1e-6
    assert scores.reference_free_accuracy > same.reference_free_accuracy  # fine-tuning on chosen replies shows


def test_generate_greedy_matches_model_generate_and_stops_at_eos(gpt2_tokenizer):
    torch.manual_seed(0)
    model = tiny_causal_lms()["ours"]().eval()
    prompts = ["Hello there", "\n\nHuman: What is 1 + 1?\n\nAssistant:"]
    replies = generate(model, gpt2_tokenizer, prompts, max_new_tokens=5)
    for prompt, (reply,) in zip(prompts, replies):
        ids = gpt2_tokenizer(prompt, return_tensors="pt")["input_ids"]
        single = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=50256, eos_token_id=50256)
        assert reply == gpt2_tokenizer.decode(single[0, ids.size(1) :], skip_special_tokens=True)
    sampled = generate(model, gpt2_tokenizer, prompts[:1], max_new_tokens=5, do_sample=True, num_return_sequences=3)
    assert len(sampled) == 1 and len(sampled[0]) == 3
    assert gpt2_tokenizer.padding_side == "right"  # restored


# --- generation: KV cache, end-of-text, stop text ------------------------------------------------------------------


def test_generate_uses_the_kv_cache_and_stops_at_eos(gpt2_tokenizer):
    torch.manual_seed(0)
    model = tiny_causal_lms()["ours"]().eval()
    eos = gpt2_tokenizer.eos_token_id
    calls = []

    def emit_eos_on_third_step(module, args, kwargs, output):
        calls.append(kwargs["input_ids"].shape[1])
        if len(calls) == 3:
            output.logits[..., eos] += 1e4
        return output

    model.register_forward_hook(emit_eos_on_third_step, with_kwargs=True)
    prompt = "\n\nHuman: What is 1 + 1?\n\nAssistant:"
    (reply,) = generate(model, gpt2_tokenizer, [prompt], max_new_tokens=10)[0]
    n_prompt = len(gpt2_tokenizer(prompt)["input_ids"])
    assert calls == [n_prompt, 1, 1]  # the prompt once, then one new token a step; nothing after EOS
    assert len(gpt2_tokenizer(reply)["input_ids"]) == 2


def test_generate_cuts_replies_at_stop_text(gpt2_tokenizer):
    torch.manual_seed(0)
    model = tiny_causal_lms()["ours"]().eval()
    (full,) = generate(model, gpt2_tokenizer, ["Hello"], max_new_tokens=8)[0]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    (cut,) = generate(model, gpt2_tokenizer, ["Hello"], max_new_tokens=8, stop_at=stop)[0]
    assert cut == full[: full.index(stop)]
    assert cut_at("A\n\nHuman: more\n\nHuman:", HH_HUMAN) == "A" and cut_at("A", None) == "A"


# --- preference scores: max_samples, progress, data of any shape ---------------------------------------------------


def test_preference_scores_max_samples_and_progress(gpt2_tokenizer, capsys):
    torch.manual_seed(0)
    policy, reference = tiny_causal_lms()["ours"]().eval(), tiny_causal_lms()["ours"]().eval()
    rows = preference_rows(6)
    first = preference_scores(policy, reference, gpt2_tokenizer, rows[:3])
    limited = preference_scores(policy, reference, gpt2_tokenizer, rows, max_samples=3, progress=True)
    assert limited == first and limited.pairs == 3
    assert "scoring pairs" in capsys.readouterr().err


def test_load_preference_pairs_any_shape(tmp_path, gpt2_tokenizer):
    rows = preference_rows(5)
    trl = tmp_path / "trl.jsonl"
    trl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    hh = tmp_path / "hh.jsonl"  # Anthropic's shape: whole dialogues
    hh.write_text(
        "".join(
            json.dumps({"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}) + "\n"
            for r in rows
        )
    )
    assert load_preference_pairs(trl) == rows
    assert load_preference_pairs(hh, max_samples=2) == rows[:2]
    kept, dropped = fit_pairs(rows, gpt2_tokenizer, 22)
    lengths = [
        max(len(gpt2_tokenizer(r["prompt"] + r[k])["input_ids"]) + 1 for k in ("chosen", "rejected")) for r in rows
    ]
    assert kept == [r for r, n in zip(rows, lengths) if n <= 22] and dropped == sum(n > 22 for n in lengths) > 0
    with pytest.raises(DataFormatError, match="no such file"):
        load_preference_pairs(tmp_path / "missing.jsonl")


# --- judged win rate ------------------------------------------------------------------------------------------------


def test_win_rate_counts_ties_half_with_a_wilson_interval():
    result = win_rate_from_counts(wins=6, ties=2, losses=2)
    assert (result.wins, result.ties, result.losses, result.total) == (6, 2, 2, 10)
    assert result.win_rate == 0.7
    # Wilson score interval of 7 successes in 10 at z = 1.959964: (0.396778, 0.892209)
    assert abs(result.ci_low - 0.3967781) < 1e-6 and abs(result.ci_high - 0.8922087) < 1e-6
    z, n, p = 1.959963984540054, 10, 0.7
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert abs(result.ci_low - (center - half)) < 1e-12 and abs(result.ci_high - (center + half)) < 1e-12
    sweep = win_rate_from_counts(5, 0, 0)
    assert sweep.win_rate == 1.0 and sweep.ci_high == 1.0 and abs(sweep.ci_low - 5 / (5 + z * z)) < 1e-12
    with pytest.raises(ValueError, match="at least one"):
        win_rate_from_counts(0, 0, 0)


def biased_towards(model, token_id):
    """The model, made to say `token_id` at every step."""

    def hook(module, args, output):
        output.logits[..., token_id] += 1e4
        return output

    model.register_forward_hook(hook)
    return model


def test_judged_win_rate_with_a_callable_judge(gpt2_tokenizer):
    torch.manual_seed(0)
    reference = tiny_causal_lms()["ours"]().eval()
    policy = tiny_causal_lms()["ours"]()
    policy.load_state_dict(reference.state_dict())
    yes = gpt2_tokenizer(" yes")["input_ids"][0]
    biased_towards(policy.eval(), yes)

    def judge(prompt, reply):  # likes " yes" on "good" prompts, dislikes it on "bad" ones, indifferent otherwise
        said_yes = float("yes" in reply)
        return said_yes if "good" in prompt else -said_yes if "bad" in prompt else 0.0

    prompts = [
        f"\n\nHuman: {kind} question {i}?\n\nAssistant:"
        for kind, i in (("good", 1), ("good", 2), ("good", 3), ("plain", 4), ("bad", 5), ("bad", 6))
    ]
    result = judged_win_rate(policy, reference, gpt2_tokenizer, prompts, judge, max_new_tokens=3)
    assert (result.wins, result.ties, result.losses) == (3, 1, 2)
    assert result.win_rate == 3.5 / 6
    expected = wilson_interval(3.5, 6)
    assert (result.ci_low, result.ci_high) == expected and 0 < expected[0] < 3.5 / 6 < expected[1] < 1
    assert [c["outcome"] for c in result.comparisons] == ["win"] * 3 + ["tie"] + ["loss"] * 2
    assert all(c["policy"] == " yes yes yes" and "yes" not in c["reference"] for c in result.comparisons)
    # ties within tolerance: every score difference here is 0 or 1
    loose = judged_win_rate(policy, reference, gpt2_tokenizer, prompts, judge, max_new_tokens=3, tie_tolerance=1.0)
    assert (loose.wins, loose.ties, loose.losses) == (0, 6, 0) and loose.win_rate == 0.5


def tiny_reward_model(num_labels=1):
    torch.manual_seed(1)
    config = transformers.GPT2Config(
        vocab_size=50257, n_positions=64, n_embd=16, n_layer=1, n_head=2, num_labels=num_labels, pad_token_id=50256
    )
    return transformers.GPT2ForSequenceClassification(config).eval()


def test_reward_model_judge_scores_the_last_logit(gpt2_tokenizer):
    prompts = ["\n\nHuman: Hi\n\nAssistant:", "\n\nHuman: What is 2 + 2? Answer briefly.\n\nAssistant:"]
    replies = [" Hello there, how can I help you today?", " 4"]
    for num_labels in (1, 2):
        model = tiny_reward_model(num_labels)
        judge = reward_model_judge(model, gpt2_tokenizer, batch_size=2)
        with torch.no_grad():
            direct = [
                model(**gpt2_tokenizer(p + r, return_tensors="pt")).logits[0, -1].item()
                for p, r in zip(prompts, replies)
            ]
        batched = judge.score_batch(prompts, replies)  # right-padded together
        assert max(abs(a - b) for a, b in zip(batched, direct)) < 1e-5
        assert abs(judge(prompts[1], replies[1]) - direct[1]) < 1e-5
    assert gpt2_tokenizer.padding_side == "right" and gpt2_tokenizer.truncation_side == "right"


def test_judged_win_rate_with_a_reward_model(gpt2_tokenizer):
    torch.manual_seed(0)
    policy, reference = tiny_causal_lms()["ours"]().eval(), tiny_causal_lms()["ours"]().eval()
    judge = reward_model_judge(tiny_reward_model(), gpt2_tokenizer)
    prompts = [f"\n\nHuman: Question {i}?\n\nAssistant:" for i in range(4)]
    result = judged_win_rate(policy, reference, gpt2_tokenizer, prompts, judge, max_new_tokens=4)
    assert result.total == 4
    for c in result.comparisons:
        assert abs(c["policy_score"] - judge(c["prompt"], c["policy"])) < 1e-5
        outcome = "win" if c["policy_score"] > c["reference_score"] else "loss"  # random models never tie exactly
        assert c["outcome"] == outcome
    assert result == win_rate_from_counts(result.wins, result.ties, result.losses)
    same = judged_win_rate(policy, policy, gpt2_tokenizer, prompts, judge, max_new_tokens=4)
    assert (same.wins, same.ties, same.losses) == (0, 4, 0)  # greedy replies of one model tie with themselves

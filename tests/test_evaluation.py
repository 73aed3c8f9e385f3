"""Evaluation helpers against direct computations."""

import torch

from alignment.evaluation import generate, preference_scores, reply_logps
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
        assert reply == gpt2_tokenizer.decode(single[0, ids.size(1):], skip_special_tokens=True)
    sampled = generate(model, gpt2_tokenizer, prompts[:1], max_new_tokens=5, do_sample=True, num_return_sequences=3)
    assert len(sampled) == 1 and len(sampled[0]) == 3
    assert gpt2_tokenizer.padding_side == "right"  # restored

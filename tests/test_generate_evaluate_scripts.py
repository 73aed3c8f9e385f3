"""scripts/generate.py and scripts/evaluate.py on tiny checkpoints: in-process through the commands' main(argv) in
`alignment.evaluation.sampling` and `alignment.evaluation.report` (a subprocess pays seconds importing torch), plus
one subprocess per script for the one-line error of the command line."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from alignment import AlignmentGPT2Config, AlignmentGPT2ForCausalLM
from alignment.evaluation import HH_HUMAN, cut_at, generate, preference_scores, reward_model_judge, win_rate_from_counts
from alignment.evaluation import report as evaluate_command
from alignment.evaluation import sampling as generate_command
from alignment.run.cli import run_cli
from tests.conftest import preference_rows

REPO = Path(__file__).resolve().parents[1]
KATE = "Human: Hello, my name is Kate. What is your name?\n\nAssistant:"
SEPARATOR = "-" * 80


def run_generate(*argv, stdin=None):
    """generate.py's main on the CPU (the script would take a GPU if there were one), as the expectations are."""
    return generate_command.main([*argv, "--device", "cpu"], stdin=stdin)


def run_evaluate(*argv):
    return evaluate_command.main([*argv, "--device", "cpu", "--no_progress"])


@pytest.fixture(autouse=True)
def quiet_loading():
    """As the scripts' command line does: no progress bar of transformers' own on stderr."""
    enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    yield
    if enabled:
        transformers.utils.logging.enable_progress_bar()


def tiny_gpt2(seed):
    torch.manual_seed(seed)
    return AlignmentGPT2ForCausalLM(
        AlignmentGPT2Config(vocab_size=50257, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    ).eval()


def save(model, tokenizer, folder):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, gpt2_tokenizer):
    """policy, reference (other random weights), a model that always says end-of-text, a reward model, data."""
    root = tmp_path_factory.mktemp("checkpoints")
    eos_model = tiny_gpt2(2)
    with torch.no_grad():  # the final layer norm outputs one vector v; EOS's (tied) embedding is a large multiple of v
        v = torch.randn(32)
        eos_model.transformer.ln_f.weight.zero_()
        eos_model.transformer.ln_f.bias.copy_(v)
        eos_model.transformer.wte.weight[gpt2_tokenizer.eos_token_id] = 100 * v
    torch.manual_seed(3)
    judge = transformers.GPT2ForSequenceClassification(
        transformers.GPT2Config(
            vocab_size=50257, n_positions=128, n_embd=16, n_layer=1, n_head=2, num_labels=1, pad_token_id=50256
        )
    )
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in preference_rows(4)))
    hh = root / "hh.jsonl"  # the same pairs as whole Anthropic HH dialogues
    hh.write_text(
        "".join(
            json.dumps({"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}) + "\n"
            for r in preference_rows(4)
        )
    )
    return {
        "policy": save(tiny_gpt2(0), gpt2_tokenizer, root / "policy"),
        "reference": save(tiny_gpt2(1), gpt2_tokenizer, root / "reference"),
        "eos": save(eos_model, gpt2_tokenizer, root / "eos"),
        "judge": save(judge.eval(), gpt2_tokenizer, root / "judge"),
        "data": str(data),
        "hh": str(hh),
    }


def load(path):
    return AlignmentGPT2ForCausalLM.from_pretrained(path).eval()


# --- generate.py ----------------------------------------------------------------------------------------------------


def test_samples_separators_json_and_seed(checkpoints, tmp_path, capsys):
    out = tmp_path / "samples.json"
    argv = [checkpoints["policy"], "--num_samples", "3", "--max_new_tokens", "6", "--seed", "7"]
    result = run_generate(*argv, "--output_json", str(out))
    printed = capsys.readouterr().out
    samples = json.loads(out.read_text())["samples"]
    assert samples == result["samples"] and len(samples) == 3
    assert all(s["prompt"] == KATE for s in samples)  # the assignment's prompt by default
    assert printed == f"\n{SEPARATOR}\n".join(s["prompt"] + s["reply"] for s in samples) + "\n"
    assert printed.count(SEPARATOR) == 2
    assert len({s["reply"] for s in samples}) == 3  # sampled, not greedy
    assert run_generate(*argv)["samples"] == samples  # the seed makes samples reproducible
    assert run_generate(*argv[:-1], "8")["samples"] != samples


def test_greedy_equals_model_generate_for_each_prompt_of_a_file(checkpoints, gpt2_tokenizer, tmp_path, capsys):
    prompts = ["\n\nHuman: What is 2 + 2?\n\nAssistant:", "Once upon a time"]
    jsonl, text = tmp_path / "prompts.jsonl", tmp_path / "prompts.txt"
    jsonl.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(prompts)))
    text.write_text("".join(p.replace("\n", "\\n") + "\n" for p in prompts))  # a literal \n stands for a newline
    result = run_generate(checkpoints["policy"], "--prompts_file", str(jsonl), "--greedy", "--max_new_tokens", "8")
    again = run_generate(checkpoints["policy"], "--prompts_file", str(text), "--greedy", "--max_new_tokens", "8")
    assert again["samples"] == result["samples"]
    model = load(checkpoints["policy"])
    assert [s["prompt"] for s in result["samples"]] == prompts
    for sample in result["samples"]:
        ids = gpt2_tokenizer(sample["prompt"], return_tensors="pt")["input_ids"]
        expected = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=50256, eos_token_id=50256)
        assert sample["reply"] == gpt2_tokenizer.decode(expected[0, ids.size(1) :], skip_special_tokens=True)
    assert capsys.readouterr().out.count(SEPARATOR) == 2  # one between the two samples, in each run


def test_replies_stop_at_end_of_text(checkpoints, capsys):
    for mode in (["--greedy"], ["--num_samples", "2", "--seed", "0"]):
        result = run_generate(
            checkpoints["eos"], "--prompt", "Human: Hi\\n\\nAssistant:", "--max_new_tokens", "20", *mode
        )
        assert [s["reply"] for s in result["samples"]] == [""] * len(result["samples"])
    prompt = "Human: Hi\n\nAssistant:"  # the \n of the command line became a newline
    assert capsys.readouterr().out == f"{prompt}\n{prompt}\n{SEPARATOR}\n{prompt}\n"


def test_any_transformers_causal_lm(gpt2_tokenizer, tmp_path, capsys):
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=50257,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            bos_token_id=50256,
            eos_token_id=50256,
        )
    ).eval()
    result = run_generate(save(llama, gpt2_tokenizer, tmp_path / "llama"), "--greedy", "--max_new_tokens", "6")
    ids = gpt2_tokenizer(KATE, return_tensors="pt")["input_ids"]
    expected = llama.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=50256, eos_token_id=50256)
    assert result["samples"] == [{"prompt": KATE, "reply": gpt2_tokenizer.decode(expected[0, ids.size(1) :])}]
    assert capsys.readouterr().out == KATE + result["samples"][0]["reply"] + "\n"


def test_chat_keeps_the_hh_format_across_turns(checkpoints, gpt2_tokenizer, capsys):
    stdin = io.StringIO("Hello, who are you?\nWhat is 2 + 2?\n\nnever read\n")
    result = run_generate(checkpoints["policy"], "--chat", "--greedy", "--max_new_tokens", "8", stdin=stdin)
    model = load(checkpoints["policy"])

    def reply(prompt):
        return cut_at(generate(model, gpt2_tokenizer, [prompt], max_new_tokens=8)[0][0], HH_HUMAN).rstrip()

    first_prompt = "\n\nHuman: Hello, who are you?\n\nAssistant:"
    first = reply(first_prompt)
    second_prompt = first_prompt + first + "\n\nHuman: What is 2 + 2?\n\nAssistant:"  # the whole dialogue so far
    second = reply(second_prompt)
    assert [t["assistant"] for t in result["turns"]] == [first, second]  # the empty line ended the chat
    assert result["dialogue"] == second_prompt + second
    assert capsys.readouterr().out.splitlines() == [
        "Human: Hello, who are you?",
        f"Assistant:{first}",
        "Human: What is 2 + 2?",
        f"Assistant:{second}",
    ]
    assert run_generate(checkpoints["policy"], "--chat", stdin=io.StringIO("exit\nHi\n"))["turns"] == []


def test_bad_generate_arguments_are_one_line_errors(checkpoints, tmp_path, capsys):
    for argv, message in (
        ([checkpoints["policy"], "--num_samples", "0"], "--num_samples must be at least 1"),
        ([checkpoints["policy"], "--chat", "--prompt", "Hi"], "--chat reads the dialogue from stdin"),
        ([checkpoints["policy"], "--prompts_file", str(tmp_path / "none.txt")], "prompts file not found"),
        ([checkpoints["policy"], "--max_new_tokens", "200"], "exceeds the model's 128 positions"),
        ([checkpoints["policy"], "--temprature", "1"], "unrecognized arguments: --temprature"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(generate_command.main, argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 1 and err.startswith("error:") and message in err, err
        assert len(err.strip().splitlines()) == 1


# --- evaluate.py ----------------------------------------------------------------------------------------------------


def test_evaluate_numbers_equal_preference_scores(checkpoints, gpt2_tokenizer, tmp_path, capsys):
    out = tmp_path / "eval.json"
    result = run_evaluate(
        checkpoints["policy"],
        "--reference",
        checkpoints["reference"],
        "--data",
        checkpoints["data"],
        "--beta",
        "0.2",
        "--batch_size",
        "4",
        "--output_json",
        str(out),
    )
    assert json.loads(out.read_text()) == result
    policy, reference = load(checkpoints["policy"]), load(checkpoints["reference"])
    expected = preference_scores(policy, reference, gpt2_tokenizer, preference_rows(4), beta=0.2).as_dict()
    assert result["scores"].keys() == expected.keys() and result["scores"]["pairs"] == 4
    for key, value in expected.items():
        assert abs(result["scores"][key] - value) <= 1e-5, key
    printed = capsys.readouterr().out
    assert "implicit-reward accuracy" in printed and f"{expected['reference_free_accuracy']:.1%}" in printed

    # no reference, Anthropic's dialogue shape, the first 3 pairs: the reward figures are null, the rest the same
    alone = run_evaluate(checkpoints["policy"], "--data", checkpoints["hh"], "--max_samples", "3")["scores"]
    expected = preference_scores(policy, None, gpt2_tokenizer, preference_rows(3)).as_dict()
    assert alone["pairs"] == 3 and alone["accuracy"] is None and alone["margin"] is None and alone["loss"] is None
    for key in ("reference_free_accuracy", "logps_chosen", "logps_rejected"):
        assert abs(alone[key] - expected[key]) <= 1e-5, key
    assert "n/a (no reference)" in capsys.readouterr().out


def test_evaluate_judged_win_rate(checkpoints, gpt2_tokenizer, capsys):
    result = run_evaluate(
        checkpoints["policy"],
        "--reference",
        checkpoints["reference"],
        "--data",
        checkpoints["data"],
        "--judge_model",
        checkpoints["judge"],
        "--judge_prompts",
        "3",
        "--max_samples",
        "3",
        "--greedy",
        "--max_new_tokens",
        "5",
    )
    judged = result["win_rate"]
    assert judged["total"] == 3 == len(judged["comparisons"]) and judged["judge_model"] == checkpoints["judge"]
    assert [c["prompt"] for c in judged["comparisons"]] == [r["prompt"] for r in preference_rows(3)]
    judge = reward_model_judge(
        transformers.AutoModelForSequenceClassification.from_pretrained(checkpoints["judge"]), gpt2_tokenizer
    )
    for c in judged["comparisons"]:
        assert abs(c["policy_score"] - judge(c["prompt"], c["policy"])) < 1e-5
        assert abs(c["reference_score"] - judge(c["prompt"], c["reference"])) < 1e-5
    expected = win_rate_from_counts(judged["wins"], judged["ties"], judged["losses"]).as_dict()
    assert {key: judged[key] for key in expected} == expected
    assert "judged win rate vs reference" in capsys.readouterr().out


def test_bad_evaluate_arguments_are_one_line_errors(checkpoints, tmp_path, capsys):
    for argv, message in (
        ([checkpoints["policy"]], "required: --data"),
        (
            [checkpoints["policy"], "--data", checkpoints["data"], "--judge_model", checkpoints["judge"]],
            "set --reference",
        ),
        ([str(tmp_path / "no-model"), "--data", checkpoints["data"]], "policy checkpoint not found"),
        ([checkpoints["policy"], "--data", checkpoints["data"], "--max_length", "5"], "longer than 5 tokens"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(evaluate_command.main, argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 1 and err.startswith("error:") and message in err, err
        assert len(err.strip().splitlines()) == 1


# --- the command line, for real -------------------------------------------------------------------------------------


def test_scripts_fail_in_one_line_without_a_traceback(checkpoints, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("ALIGNMENT_DEBUG", None)
    commands = {
        "generate": (
            [sys.executable, "scripts/generate.py", str(tmp_path / "missing-checkpoint")],
            "missing-checkpoint",
        ),
        "evaluate": (
            [sys.executable, "scripts/evaluate.py", checkpoints["policy"], "--data", str(tmp_path / "missing.jsonl")],
            "missing.jsonl",
        ),
    }
    # both at once: each spends most of its time importing torch and transformers
    running = {
        name: subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, (argv, _) in commands.items()
    }
    for name, process in running.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 1, (name, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and commands[name][1] in lines[0], (name, err)
        assert "Traceback" not in out + err and out == ""

"""Chat templates (alignment.modeling.chat_templates): `hh` renders conversations as the HH-RLHF text our data pipeline
trains on, `chatml` adds its tokens and the model grows to fit them, GPT-2's tokenizer carries `hh`, and generation
and evaluation render conversational prompts through the template. Offline, tiny models only."""

import copy
import io
import json

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained
from trl.data_utils import apply_chat_template as trl_apply_chat_template

from alignment.common import split_hh_dialogue
from alignment.evaluation import HH_HUMAN, cut_at, generate, judged_win_rate, text_pairs
from alignment.evaluation import report as evaluate_command
from alignment.evaluation import sampling as generate_command
from alignment.modeling import (
    CHAT_TEMPLATES,
    fit_model_to_tokenizer,
    render_prompt,
    resolve_chat_template,
    set_chat_template,
    stop_token_ids,
)
from alignment.modeling.chat_templates import CHATML_TEMPLATE, HH_TEMPLATE
from alignment.modeling.tokenizer import load_tokenizer
from tests.conftest import preference_rows, tiny_causal_lms

EOS = "<|endoftext|>"
# HH-RLHF dialogues as the dataset writes them: every turn is "\n\nRole: text".
HH_DIALOGUES = [
    "\n\nHuman: What are some cuss words in english?\n\nAssistant: Here's an incomplete list.",
    "\n\nHuman: Hi!\n\nAssistant: Hello, how can I help?\n\nHuman: What is 2 + 2?\n\nAssistant: It is 4.",
    "\n\nHuman: Tell me a joke.\n\nAssistant: Why did the chicken cross the road?\n\nHuman: Why?\n\n"
    "Assistant: To get to the other side!\n\nHuman: Ha.   Another one,\nplease.\n\nAssistant: Knock knock.",
]


def hh_messages(text):
    """The messages of an HH dialogue: each turn's text without the one space after its "Role:"."""
    messages = []
    for chunk in text.split("\n\n")[1:]:
        if chunk.startswith(("Human:", "Assistant:")):
            role, _, content = chunk.partition(":")
            messages.append({"role": "user" if role == "Human" else "assistant", "content": content[1:]})
        else:  # a paragraph break inside a turn
            messages[-1]["content"] += "\n\n" + chunk
    return messages


@pytest.fixture(scope="module")
def hh_tokenizer(gpt2_tokenizer):
    """GPT-2's tokenizer loaded from its folder, as a checkpoint's tokenizer is: it gets the hh template."""
    return load_tokenizer(gpt2_tokenizer.name_or_path)


@pytest.fixture(scope="module")
def chatml_tokenizer(hh_tokenizer):
    tokenizer = copy.deepcopy(hh_tokenizer)
    assert set_chat_template(tokenizer, "chatml") == [50257, 50258]  # <|im_start|>, <|im_end|>
    return tokenizer


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --- the hh template ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", HH_DIALOGUES)
def test_hh_renders_dialogues_as_hh_text_token_for_token(hh_tokenizer, text):
    messages = hh_messages(text)
    prompt, reply = split_hh_dialogue(text)  # as the data pipeline splits: prompt ends "\n\nAssistant:", reply " ..."
    assert hh_tokenizer.chat_template == HH_TEMPLATE
    # a whole conversation is the HH text, then EOS (which TRL appends to string completions)
    assert hh_tokenizer.apply_chat_template(messages, tokenize=False) == text + EOS
    assert hh_tokenizer.apply_chat_template(messages)["input_ids"] == ids(hh_tokenizer, text) + [50256]
    # the prompt with the generation prompt is exactly the pipeline's prompt; prompt + reply tokens = the dialogue's
    rendered = hh_tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)["input_ids"]
    assert rendered == ids(hh_tokenizer, prompt)
    assert rendered + ids(hh_tokenizer, reply) == ids(hh_tokenizer, text)
    assert hh_tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True) == text


@pytest.mark.parametrize("text", HH_DIALOGUES)
def test_trl_renders_conversational_rows_like_our_string_rows(hh_tokenizer, text):
    """TRL's prompt/completion and preference rendering of conversations gives the strings the pipeline makes (plus
    the EOS TRL appends to string completions), so conversational and HH data train the same tokens."""
    messages = hh_messages(text)
    prompt, reply = split_hh_dialogue(text)
    row = trl_apply_chat_template({"prompt": messages[:-1], "completion": messages[-1:]}, hh_tokenizer)
    assert row == {"prompt": prompt, "completion": reply + EOS}
    rejected = [{"role": "assistant", "content": "No."}]
    row = trl_apply_chat_template(
        {"prompt": messages[:-1], "chosen": messages[-1:], "rejected": rejected}, hh_tokenizer
    )
    assert row == {"prompt": prompt, "chosen": reply + EOS, "rejected": " No." + EOS}


def test_hh_assistant_mask_covers_replies_and_what_ends_them(hh_tokenizer):
    messages = hh_messages(HH_DIALOGUES[1])
    assert has_generation_markers(HH_TEMPLATE) and has_generation_markers(CHATML_TEMPLATE)
    out = hh_tokenizer.apply_chat_template(messages, return_assistant_tokens_mask=True)
    masked = hh_tokenizer.decode([i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m])
    assert masked == " Hello, how can I help?\n\nHuman: It is 4." + EOS


def test_hh_system_messages_and_roles(hh_tokenizer):
    system = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    rendered = hh_tokenizer.apply_chat_template(system, tokenize=False, add_generation_prompt=True)
    assert rendered == "Be kind.\n\nHuman: Hi\n\nAssistant:"  # prepended verbatim
    late = [{"role": "user", "content": "Hi"}, {"role": "system", "content": "x"}]
    with pytest.raises(Exception, match="system message may only come first"):
        hh_tokenizer.apply_chat_template(late, tokenize=False)
    with pytest.raises(Exception, match="roles are system, user and assistant"):
        hh_tokenizer.apply_chat_template([{"role": "tool", "content": "4"}], tokenize=False)


# --- chatml, choosing templates, resizing ---------------------------------------------------------------------------


def test_chatml_renders_and_masks(chatml_tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    text = chatml_tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    prompt = chatml_tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n" and text.startswith(prompt)
    out = chatml_tokenizer.apply_chat_template(messages, return_assistant_tokens_mask=True)
    assert out["input_ids"][:2] == [50257, *ids(chatml_tokenizer, "user")]  # <|im_start|> is one token
    assert chatml_tokenizer.decode([i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]) == (
        "Hello!<|im_end|>"
    )
    assert is_chat_template_stop_token_trained(chatml_tokenizer)  # TRL's assistant_only_loss check
    assert stop_token_ids(chatml_tokenizer) == [50256, 50258]
    assert set_chat_template(chatml_tokenizer, "chatml") == []  # the tokens are there now


def test_resolve_chat_template(tmp_path, hh_tokenizer):
    assert resolve_chat_template(None) is None and resolve_chat_template("tokenizer") is None
    assert resolve_chat_template("hh") == CHAT_TEMPLATES["hh"] == HH_TEMPLATE
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}", encoding="utf-8")
    assert resolve_chat_template(path) == path.read_text()
    tokenizer = copy.deepcopy(hh_tokenizer)
    assert set_chat_template(tokenizer, "tokenizer") == [] and tokenizer.chat_template == HH_TEMPLATE
    assert set_chat_template(tokenizer, str(path)) == [50257]  # its control token becomes one special token
    assert tokenizer.apply_chat_template([{"role": "user", "content": "a"}])["input_ids"] == [50257, 64]
    with pytest.raises(ValueError, match="neither a built-in template"):
        resolve_chat_template("llama9")


@pytest.mark.parametrize("name", sorted(tiny_causal_lms()))
def test_resized_model_saves_and_loads_with_the_same_logits(name, chatml_tokenizer, tmp_path):
    torch.manual_seed(0)
    model = tiny_causal_lms()[name]().eval()
    old = model.get_input_embeddings().weight.detach().clone()
    assert fit_model_to_tokenizer(model, chatml_tokenizer)
    assert model.get_input_embeddings().num_embeddings == model.get_output_embeddings().out_features == 50259
    assert model.config.get_text_config().vocab_size == 50259
    assert torch.equal(model.get_input_embeddings().weight[:50257], old)
    if model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert 50258 in model.generation_config.eos_token_id  # generation stops at <|im_end|>
    assert not fit_model_to_tokenizer(model, chatml_tokenizer)  # already fits
    model.save_pretrained(tmp_path)
    chatml_tokenizer.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    batch = torch.tensor([chatml_tokenizer.apply_chat_template(messages)["input_ids"]])
    assert 50257 in batch and 50258 in batch
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch).logits, model(batch).logits)
    assert load_tokenizer(str(tmp_path)).chat_template == CHATML_TEMPLATE


# --- the tokenizer's default ----------------------------------------------------------------------------------------


def test_gpt2_tokenizer_carries_hh_and_keeps_it_through_save_and_load(gpt2_tokenizer, tmp_path):
    assert gpt2_tokenizer.chat_template == HH_TEMPLATE  # load_tokenizer("gpt2"), the offline build
    raw = AutoTokenizer.from_pretrained(gpt2_tokenizer.name_or_path)
    assert raw.chat_template is None  # the build folder itself has none: load_tokenizer adds it
    gpt2_tokenizer.save_pretrained(tmp_path / "saved")
    assert AutoTokenizer.from_pretrained(tmp_path / "saved").chat_template == HH_TEMPLATE
    assert load_tokenizer(str(tmp_path / "saved")).chat_template == HH_TEMPLATE
    raw.chat_template = "{{ messages[0]['content'] }}"  # a tokenizer with its own template keeps it
    raw.save_pretrained(tmp_path / "own")
    assert load_tokenizer(str(tmp_path / "own")).chat_template == raw.chat_template


def test_other_tokenizers_get_no_template(tmp_path):
    word_level = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "</s>": 2}, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=word_level, eos_token="</s>").save_pretrained(tmp_path)
    tokenizer = load_tokenizer(str(tmp_path))
    assert tokenizer.chat_template is None
    # conversations still render, as HH text: the project's format
    assert render_prompt(tokenizer, [{"role": "user", "content": "hello"}]) == "\n\nHuman: hello\n\nAssistant:"


# --- generation and evaluation --------------------------------------------------------------------------------------


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    return tiny_causal_lms()["ours"]().eval()


def test_render_prompt(hh_tokenizer):
    assert render_prompt(hh_tokenizer, "plain text\n") == "plain text\n"
    turn = [{"role": "user", "content": "Hi"}]
    assert render_prompt(hh_tokenizer, turn) == "\n\nHuman: Hi\n\nAssistant:"
    prefilled = [*turn, {"role": "assistant", "content": "Well,"}]  # the model continues the reply, as in TRL
    assert render_prompt(hh_tokenizer, prefilled) == "\n\nHuman: Hi\n\nAssistant: Well,"
    with pytest.raises(ValueError, match="a string or a list of messages"):
        render_prompt(hh_tokenizer, [{"content": "no role"}])


def test_generate_renders_conversations_and_stops_at_end_of_turn(hh_tokenizer, chatml_tokenizer):
    model = tiny_gpt2()
    conversation = [{"role": "user", "content": "What is 2 + 2?"}]
    text = "\n\nHuman: What is 2 + 2?\n\nAssistant:"
    assert generate(model, hh_tokenizer, [conversation, text], max_new_tokens=6) == 2 * [
        generate(model, hh_tokenizer, [text], max_new_tokens=6)[0]
    ]
    fit_model_to_tokenizer(model, chatml_tokenizer)
    with torch.no_grad():  # the model now always says <|im_end|>: every reply is empty
        v = torch.randn(32)
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(v)
        model.transformer.wte.weight[50258] = 100 * v
    new_tokens, model_generate = [], model.generate

    def counting_generate(**kwargs):
        output = model_generate(**kwargs)
        new_tokens.append(output.size(1) - kwargs["input_ids"].size(1))
        return output

    model.generate = counting_generate
    replies = generate(model, chatml_tokenizer, [conversation], max_new_tokens=5, do_sample=True)
    assert replies == [[""]] and new_tokens == [1]  # one <|im_end|>, then it stopped


def test_chat_speaks_the_checkpoints_template(chatml_tokenizer, tmp_path, capsys):
    model = tiny_gpt2()
    fit_model_to_tokenizer(model, chatml_tokenizer)
    model.save_pretrained(tmp_path)
    chatml_tokenizer.save_pretrained(tmp_path)
    stdin = io.StringIO("Hi\nAnd now?\n")
    argv = [str(tmp_path), "--chat", "--greedy", "--max_new_tokens", "4", "--device", "cpu"]
    result = generate_command.main(argv, stdin=stdin)
    first, second = (turn["assistant"] for turn in result["turns"])
    prompt = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert cut_at(generate(model, chatml_tokenizer, [prompt], max_new_tokens=4)[0][0], HH_HUMAN).rstrip() == first
    prompt += f"{first.strip()}<|im_end|>\n<|im_start|>user\nAnd now?<|im_end|>\n<|im_start|>assistant\n"
    assert result["dialogue"] == prompt + second
    capsys.readouterr()


def test_judged_win_rate_renders_conversational_prompts(hh_tokenizer):
    conversation = [{"role": "user", "content": "Hi"}]
    result = judged_win_rate(
        tiny_gpt2(0), tiny_gpt2(1), hh_tokenizer, [conversation], lambda p, r: float(len(r)), max_new_tokens=4
    )
    assert [c["prompt"] for c in result.comparisons] == ["\n\nHuman: Hi\n\nAssistant:"]


@pytest.fixture
def checkpoint(tmp_path, hh_tokenizer):
    folder = tmp_path / "policy"
    tiny_gpt2().save_pretrained(folder)
    hh_tokenizer.save_pretrained(folder)
    return str(folder)


def test_generate_script_reads_conversational_prompts(checkpoint, hh_tokenizer, tmp_path, capsys):
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    conversation.append({"role": "user", "content": "What is 2 + 2?"})
    text = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: What is 2 + 2?\n\nAssistant:"
    jsonl, listed = tmp_path / "prompts.jsonl", tmp_path / "prompts.json"
    rows = [{"messages": conversation}, {"prompt": conversation}, {"prompt": "Once upon a time"}]
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    listed.write_text(json.dumps([conversation, "Once upon a time"]))
    argv = ["--greedy", "--max_new_tokens", "6", "--device", "cpu"]
    result = generate_command.main([checkpoint, "--prompts_file", str(jsonl), *argv])
    samples = result["samples"]
    assert [s["prompt"] for s in samples] == [text, text, "Once upon a time"]
    assert samples[0]["messages"] == conversation and "messages" not in samples[2]
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    expected = generate(model, hh_tokenizer, [text, "Once upon a time"], max_new_tokens=6)
    assert [s["reply"] for s in samples] == [expected[0][0], expected[0][0], expected[1][0]]
    again = generate_command.main([checkpoint, "--prompts_file", str(listed), *argv])["samples"]
    assert again == [samples[0], samples[2]]
    capsys.readouterr()


def test_generate_script_chat_template_option_and_bad_messages(checkpoint, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")
    with pytest.raises(ValueError, match="message 1 should be an object with text 'role' and 'content'"):
        generate_command.main([checkpoint, "--prompts_file", str(bad)])
    with pytest.raises(ValueError, match="neither a built-in template"):
        generate_command.main([checkpoint, "--chat_template", "nope"])
    with pytest.raises(ValueError, match="has no embeddings for"):  # the checkpoint never learnt ChatML's tokens
        generate_command.main([checkpoint, "--chat_template", "chatml", "--device", "cpu"])


def test_evaluate_scores_conversational_pairs_as_their_hh_text(checkpoint, hh_tokenizer, tmp_path, capsys):
    rows = preference_rows(3)
    conversations = [
        {
            "prompt": hh_messages(r["prompt"] + r["chosen"])[:1],
            "chosen": hh_messages(r["prompt"] + r["chosen"])[1:],
            "rejected": hh_messages(r["prompt"] + r["rejected"])[1:],
        }
        for r in rows
    ]
    assert text_pairs(conversations, hh_tokenizer) == rows  # the final EOS is scoring's to add, as for text
    text, chat = tmp_path / "text.jsonl", tmp_path / "chat.jsonl"
    text.write_text("".join(json.dumps(row) + "\n" for row in rows))
    chat.write_text("".join(json.dumps(row) + "\n" for row in conversations))
    argv = ["--device", "cpu", "--no_progress"]
    expected = evaluate_command.main([checkpoint, "--data", str(text), *argv])["scores"]
    assert evaluate_command.main([checkpoint, "--data", str(chat), *argv])["scores"] == expected
    capsys.readouterr()

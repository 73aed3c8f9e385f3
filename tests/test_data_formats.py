"""Every TRL dataset type, in standard (string) and conversational (message-list) form, normalised into the columns
TRL's trainers read, and tokenized by stock `trl.DPOTrainer` / `trl.SFTTrainer` exactly as the TRL-format rows they
stand for. All data is built here; nothing is downloaded."""

import copy
import json
import logging
import random

import datasets
import pytest
import trl

from alignment.data import (
    FORMATS,
    DataFormatError,
    DatasetSpec,
    detect_format,
    load_preference_dataset,
    load_sft_dataset,
    normalize_dataset,
    split_shared_prompt,
)
from alignment.data.formats import IDENTICAL, MISSING, NO_SHARED_PROMPT, NOT_MESSAGES, PROMPT_TOO_LONG
from tests.conftest import tiny_causal_lms

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture
def chat_tokenizer(gpt2_tokenizer):
    """GPT-2's tokenizer with a ChatML-style template (a copy: the session fixture stays template-free)."""
    tokenizer = copy.deepcopy(gpt2_tokenizer)
    tokenizer.chat_template = CHATML
    return tokenizer


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "Be brief."}
COLORS = ["blue", "white", "black"]  # none starts like "green": TRL's character cut is a word cut


# Each source shape: raw rows, and what each row is as (prompt, chosen, rejected) or (prompt, completion).
def preference_text():
    rows = [
        {"prompt": f"What colour is sky {i}?", "chosen": f" {c}.", "rejected": " Green."} for i, c in enumerate(COLORS)
    ]
    return rows, [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]


def preference_messages():
    rows = [
        {"prompt": [user(f"Sky {i}?")], "chosen": [assistant(c)], "rejected": [assistant("Green.")]}
        for i, c in enumerate(COLORS)
    ]
    return rows, [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]


def implicit_text():
    rows = [{"chosen": f"Sky {i} is {c} today.", "rejected": f"Sky {i} is green today."} for i, c in enumerate(COLORS)]
    return rows, [(f"Sky {i} is", f" {c} today.", " green today.") for i, c in enumerate(COLORS)]


def implicit_messages():
    pairs = []
    for i, c in enumerate(COLORS):
        prompt = [SYSTEM, user(f"Sky {i}?"), assistant("Which sky?"), user("That one.")] if i else [user("Sky?")]
        pairs.append((prompt, [assistant(c)], [assistant("Green.")]))
    return [{"chosen": p + c, "rejected": p + r} for p, c, r in pairs], pairs


def ultrafeedback():
    rows, pairs = [], []
    for i, c in enumerate(COLORS):
        prompt, chosen, rejected = f"Sky {i}?", [assistant(c)], [assistant("Green.")]
        pairs.append(([user(prompt)], chosen, rejected))
        rows.append(
            {
                "prompt": prompt,
                "prompt_id": f"id{i}",
                "chosen": [user(prompt), *chosen],
                "rejected": [user(prompt), *rejected],
                "messages": [user(prompt), *chosen],
                "score_chosen": 8.0,
                "score_rejected": 2.0,
            }
        )
    return rows, pairs


def hh():
    pairs = [(f"\n\nHuman: Sky {i}?\n\nAssistant:", f" {c}.", " Green.") for i, c in enumerate(COLORS)]
    return [{"chosen": p + c, "rejected": p + r} for p, c, r in pairs], pairs


def rm_static():
    rows = [
        {"prompt": f"\n\nHuman: Sky {i}?\n\nAssistant:", "response": f" {c}.", "chosen": f" {c}.", "rejected": " No."}
        for i, c in enumerate(COLORS)
    ]
    return rows, [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]


def stack_exchange():
    rows = [{"question": f"Sky {i}?", "response_j": c, "response_k": "Green."} for i, c in enumerate(COLORS)]
    return rows, [(f"Question: Sky {i}?\n\nAnswer: ", c, "Green.") for i, c in enumerate(COLORS)]


def prompt_completion_text():
    rows = [{"prompt": f"Sky {i} is", "completion": f" {c}."} for i, c in enumerate(COLORS)]
    return rows, [(r["prompt"], r["completion"]) for r in rows]


def prompt_completion_messages():
    rows = [{"prompt": [SYSTEM, user(f"Sky {i}?")], "completion": [assistant(c)]} for i, c in enumerate(COLORS)]
    return rows, [(r["prompt"], r["completion"]) for r in rows]


PREFERENCE_SHAPES = {  # case id: (rows and pairs, the format detected)
    "preference/text": (preference_text, "preference"),
    "preference/messages": (preference_messages, "preference"),
    "implicit/text": (implicit_text, "implicit-preference"),
    "implicit/messages": (implicit_messages, "implicit-preference"),
    "ultrafeedback": (ultrafeedback, "ultrafeedback"),
    "hh": (hh, "hh"),
    "rm-static": (rm_static, "rm-static"),
    "stack-exchange": (stack_exchange, "stack-exchange"),
}
COMPLETION_SHAPES = {
    "prompt-completion/text": (prompt_completion_text, "prompt-completion"),
    "prompt-completion/messages": (prompt_completion_messages, "prompt-completion"),
}


def expected_rows(pairs, target):
    """What a source's (prompt, chosen[, rejected]) become in each target layout."""
    rows = []
    for prompt, chosen, *rejected in pairs:
        if target == "preference":
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected[0]})
        elif target == "prompt-completion":
            rows.append({"prompt": prompt, "completion": chosen})
        elif target == "prompt-only":
            rows.append({"prompt": prompt})
        else:
            rows.append({"messages" if isinstance(prompt, list) else "text": prompt + chosen})
    return rows


@pytest.mark.parametrize("target", ["preference", "prompt-completion", "text", "prompt-only"])
@pytest.mark.parametrize("case", [*PREFERENCE_SHAPES, *COMPLETION_SHAPES])
def test_each_shape_and_form_normalises_to_trl_columns(case, target):
    make, fmt = {**PREFERENCE_SHAPES, **COMPLETION_SHAPES}[case]
    rows, pairs = make()
    dataset = datasets.Dataset.from_list(rows)
    if target == "preference" and case in COMPLETION_SHAPES:
        with pytest.raises(DataFormatError, match="match no known preference format"):
            normalize_dataset(dataset, target)
        return
    assert detect_format(dataset.column_names, target=target, sample=dataset[:]) == fmt
    normalised, report = normalize_dataset(dataset, target)
    assert normalised.to_list() == expected_rows(pairs, target)
    assert (report.format, report.conversational, report.dropped) == (
        fmt,
        case.endswith("messages") or "ultra" in case,
        {},
    )


@pytest.mark.parametrize(
    "rows, target, expected",
    [
        ([{"text": "The sky is blue."}], "text", [{"text": "The sky is blue."}]),
        ([{"messages": [user("Hi"), assistant("Hello!")]}], "text", [{"messages": [user("Hi"), assistant("Hello!")]}]),
        ([{"prompt": "The sky is"}], "prompt-only", [{"prompt": "The sky is"}]),
        ([{"prompt": [SYSTEM, user("Hi")]}], "prompt-only", [{"prompt": [SYSTEM, user("Hi")]}]),
    ],
    ids=["text", "messages", "prompt-only/text", "prompt-only/messages"],
)
def test_language_modeling_and_prompt_only_shapes(rows, target, expected):
    normalised, _ = normalize_dataset(datasets.Dataset.from_list(rows), target)
    assert normalised.to_list() == expected
    with pytest.raises(DataFormatError, match="which match no known preference format"):
        normalize_dataset(datasets.Dataset.from_list(rows), "preference")


def test_messages_keep_role_and_content_only():
    rows = [{"messages": [{"role": "user", "content": "Hi", "name": "ann"}, assistant("Hello!")]}]
    normalised, _ = normalize_dataset(datasets.Dataset.from_list(rows), "text")
    assert normalised.to_list() == [{"messages": [user("Hi"), assistant("Hello!")]}]


@pytest.mark.parametrize(
    "columns, sample, expected",
    [
        (["chosen", "rejected"], None, "hh"),
        (["chosen", "rejected"], {"chosen": ["\n\nHuman: a\n\nAssistant: b"], "rejected": ["x"]}, "hh"),
        (["chosen", "rejected"], {"chosen": ["The sky is blue."], "rejected": ["x"]}, "implicit-preference"),
        (["chosen", "rejected"], {"chosen": [[user("a")]], "rejected": [[user("b")]]}, "implicit-preference"),
        (
            ["prompt", "chosen", "rejected"],
            {"prompt": ["a"], "chosen": [[user("a")]], "rejected": [[]]},
            "ultrafeedback",
        ),
        (["prompt", "chosen", "rejected"], {"prompt": [[user("a")]], "chosen": [[user("a")]]}, "preference"),
        (["prompt", "chosen", "rejected"], None, "preference"),
        (["messages"], {"messages": [[user("a")]]}, "messages"),
        (["messages", "text"], None, "messages"),
        (
            ["prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen"],
            {"prompt": ["a"], "chosen": [[user("a")]], "messages": [[user("a")]], "score_chosen": [1.0]},
            "ultrafeedback",
        ),
    ],
)
def test_detection_uses_columns_and_value_types(columns, sample, expected):
    assert detect_format(columns, sample=sample) == expected
    assert expected in FORMATS and DatasetSpec(path="x.jsonl", format=expected).format == expected


def test_explicit_format_forces_a_reading_and_checks_value_types():
    rows, _ = hh()
    dataset = datasets.Dataset.from_list(rows)
    forced, report = normalize_dataset(dataset, "preference", format="implicit-preference")
    assert report.format == "implicit-preference"
    assert forced[0] == {"prompt": "\n\nHuman: Sky 0?\n\nAssistant:", "chosen": " blue.", "rejected": " Green."}

    messages = datasets.Dataset.from_list([{"text": [user("Hi")]}])
    with pytest.raises(DataFormatError, match="format 'text' reads rows like .*, but found text: message lists"):
        normalize_dataset(messages, "text", format="text")
    with pytest.raises(DataFormatError, match="unknown format 'chat'"):
        normalize_dataset(messages, "text", format="chat")


@pytest.mark.parametrize(
    "chosen, rejected, expected",
    [
        ("The sky is blue.", "The sky is green.", ("The sky is", " blue.", " green.")),
        ("The answer is 42.", "The answer is 45.", ("The answer is", " 42.", " 45.")),  # TRL would cut "4" | "2."
        ("The cat sat.", "The cats sat.", ("The", " cat sat.", " cats sat.")),
        ("It is 4", "It is 4 for sure", ("It is", " 4", " 4 for sure")),  # both replies keep some text
        ("Q: hi\nA: yes", "Q: hi\nA: no", ("Q: hi\nA:", " yes", " no")),
        ("Say it\nyes", "Say it\nno", ("Say it\n", "yes", "no")),
    ],
)
def test_implicit_string_prompt_is_cut_between_words(chosen, rejected, expected):
    assert split_shared_prompt(chosen, rejected) == expected


@pytest.mark.parametrize(
    "chosen, rejected", [("Paris is nice.", "Parisian food."), ("Yes.", "No."), ("Same.", "Same. ")]
)
def test_implicit_string_pairs_without_a_whole_word_prompt_are_refused(chosen, rejected):
    with pytest.raises(ValueError, match=f"{IDENTICAL}|{NO_SHARED_PROMPT}"):
        split_shared_prompt(chosen, rejected)


def test_implicit_string_split_never_cuts_inside_a_word():
    generator = random.Random(0)
    words = ["a", "ab", "abc", "b", "ba", "x1", "x12", "!", "a!"]
    for _ in range(500):
        shared = " ".join(generator.choices(words, k=generator.randint(1, 4)))
        chosen = shared + generator.choice(["", " ", "\n"]) + " ".join(generator.choices(words, k=2))
        rejected = shared + generator.choice(["", " ", "\n"]) + " ".join(generator.choices(words, k=2))
        try:
            prompt, chosen_reply, rejected_reply = split_shared_prompt(chosen, rejected)
        except ValueError:
            continue
        assert (prompt + chosen_reply, prompt + rejected_reply) == (chosen, rejected)
        for reply in (chosen_reply, rejected_reply):
            assert prompt[-1].isspace() or reply[0].isspace(), (prompt, reply)


def test_implicit_conversation_split_at_a_message_boundary():
    prompt = [SYSTEM, user("Hi"), assistant("Hello!"), user("Sky?")]
    assert split_shared_prompt(prompt + [assistant("Blue.")], prompt + [assistant("Green.")]) == (
        prompt,
        [assistant("Blue.")],
        [assistant("Green.")],
    )
    with pytest.raises(ValueError, match=NO_SHARED_PROMPT):
        split_shared_prompt([user("a"), assistant("b")], [user("c"), assistant("b")])


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_bad_message_rows_are_dropped_with_a_reason(tmp_path, caplog):
    good, _ = preference_messages()
    prompt = [user("Sky?")]
    bad = [
        {"prompt": prompt, "chosen": [{"role": "assistant"}], "rejected": [assistant("b")]},
        {"prompt": prompt, "chosen": [{"role": "assistant", "content": 3}], "rejected": [assistant("b")]},
        {"prompt": prompt, "chosen": [{"content": "a"}], "rejected": [assistant("b")]},
        {"prompt": prompt, "chosen": "a string", "rejected": [assistant("b")]},
        {"prompt": prompt, "chosen": ["a", "b"], "rejected": [assistant("b")]},
        {"prompt": prompt, "chosen": [], "rejected": [assistant("b")]},
        {"prompt": prompt, "chosen": None, "rejected": [assistant("b")]},
        {"prompt": prompt, "chosen": [assistant("  ")], "rejected": [assistant("b")]},
        {"prompt": prompt, "chosen": [assistant("b")], "rejected": [assistant(" b ")]},
    ]
    dataset = datasets.load_dataset(
        "json", data_files=str(write_jsonl(tmp_path / "d.jsonl", good + bad)), split="train"
    )

    with caplog.at_level(logging.WARNING, logger="alignment.data"):
        kept, report = normalize_dataset(dataset, "preference", source="d.jsonl")
    assert report.dropped == {NOT_MESSAGES: 5, MISSING: 3, IDENTICAL: 1}
    assert kept.to_list() == expected_rows(preference_messages()[1], "preference")
    assert sorted(record.getMessage() for record in caplog.records) == [
        f"dropped 1 of 12 rows from d.jsonl: {IDENTICAL}",
        f"dropped 3 of 12 rows from d.jsonl: {MISSING}",
        f"dropped 5 of 12 rows from d.jsonl: {NOT_MESSAGES}",
    ]

    implicit = datasets.Dataset.from_list(
        [
            {"chosen": [user("a"), assistant("b")], "rejected": [user("a"), assistant("c")]},
            {"chosen": [user("a"), assistant("b")], "rejected": [user("z"), assistant("c")]},
            {"chosen": [user("a"), assistant("b")], "rejected": [user("a"), assistant("b"), user("more")]},
        ]
    )
    _, report = normalize_dataset(implicit, "preference")
    assert report.dropped == {NO_SHARED_PROMPT: 1, MISSING: 1}


def test_conversational_prompt_length_counts_chat_template_tokens(chat_tokenizer, gpt2_tokenizer):
    prompts = [[user("Hi")], [user("Hi there, how are you?")], [SYSTEM, user("Hi there, how are you today?")]]
    rows = [{"prompt": p, "chosen": [assistant("Fine.")], "rejected": [assistant("Bad.")]} for p in prompts]
    dataset = datasets.Dataset.from_list(rows)
    rendered = "<|im_start|>user\nHi there, how are you?<|im_end|>\n<|im_start|>assistant\n"
    budget = len(gpt2_tokenizer(rendered)["input_ids"])

    kept, report = normalize_dataset(dataset, "preference", tokenizer=chat_tokenizer, max_prompt_length=budget)
    assert report.dropped == {PROMPT_TOO_LONG: 1}
    assert kept["prompt"] == prompts[:2]
    _, report = normalize_dataset(dataset, "preference", tokenizer=chat_tokenizer, max_prompt_length=budget - 1)
    assert report.dropped == {PROMPT_TOO_LONG: 2}

    no_template = copy.deepcopy(gpt2_tokenizer)
    no_template.chat_template = None
    with pytest.raises(DataFormatError, match=r"needs a chat template.*`chat_template`") as error:
        normalize_dataset(dataset, "preference", tokenizer=no_template, max_prompt_length=budget)
    assert "\n" not in str(error.value)


def test_unknown_shape_error_lists_every_accepted_shape_with_an_example():
    with pytest.raises(DataFormatError) as error:
        normalize_dataset(datasets.Dataset.from_list([{"question": "q", "answer": "a"}]), "text", source="qa.jsonl")
    message = str(error.value)
    assert message.startswith("qa.jsonl has columns ['question', 'answer'], which match no known text format")
    for fmt in ["rm-static", "stack-exchange", "preference", "ultrafeedback", "hh", "implicit-preference"]:
        assert f"\n  {fmt} ({', '.join(FORMATS[fmt])})" in message
    for fmt in ["prompt-completion", "messages", "text"]:
        assert f"\n  {fmt} ({', '.join(FORMATS[fmt])})" in message
    assert '{"messages": [{"role": "user", "content": "Hi"}' in message
    assert "prompt-only" not in message  # a prompt alone is no SFT data

    with pytest.raises(DataFormatError, match=r"has columns \['text'\] \(message lists in \['text'\]\)"):
        normalize_dataset(datasets.Dataset.from_list([{"text": [user("Hi")]}]), "text")


def test_conversational_sources_load_through_mixtures(tmp_path):
    rows, pairs = ultrafeedback()
    path = write_jsonl(tmp_path / "uf.jsonl", rows * 2)
    data = load_preference_dataset(str(path), test_size=1)
    assert data["train"].column_names == ["prompt", "chosen", "rejected"]
    assert sorted(map(json.dumps, [*data["train"], *data["test"]])) == sorted(
        map(json.dumps, expected_rows(pairs, "preference") * 2)
    )
    sft = load_sft_dataset({"path": str(path), "format": "ultrafeedback"}, test_size=1, completion_only=True)
    assert sft["train"].column_names == ["prompt", "completion"]
    assert isinstance(sft["train"][0]["prompt"], list)


# --- stock TRL tokenizes our rows as it does the TRL-format rows they stand for ----------------------------------

# For shapes TRL reads as they are, the raw rows; for the others, the rows written by hand in TRL's format.
TRL_PREFERENCE_ROWS = {
    "ultrafeedback": lambda rows: [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in rows],
    "rm-static": lambda rows: [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows],
    "stack-exchange": lambda rows: [
        {"prompt": f"Question: {r['question']}\n\nAnswer: ", "chosen": r["response_j"], "rejected": r["response_k"]}
        for r in rows
    ],
}


def pooled(cases):
    """Pool our rows and the TRL-format rows of every case into one dataset per column layout, since each dataset
    TRL prepares costs seconds of fingerprinting: {name: (dataset, (case, side, index) of each row)}."""
    pools = {}
    for case, (ours, trl_rows) in cases.items():
        same_columns = set(trl_rows[0]) == set(ours.column_names)
        stock = datasets.Dataset.from_list(trl_rows, features=ours.features if same_columns else None)
        for side, data in (("ours", ours), ("trl", stock)):
            layout = (tuple(sorted(data.column_names)), isinstance(data[0][data.column_names[0]], list))
            parts, tags = pools.setdefault(layout, ([], []))
            parts.append(data.select_columns(sorted(data.column_names)))
            tags += [(case, side, index) for index in range(len(data))]
    return {f"pool{n}": (datasets.concatenate_datasets(parts), tags) for n, (parts, tags) in enumerate(pools.values())}


def assert_same_tokens(trainer, pools, columns):
    """Row by row, stock TRL's tokens of our rows equal its tokens of the TRL-format rows."""
    tokens = {}
    for name, (_, tags) in pools.items():
        prepared = trainer.eval_dataset[name]
        present = [column for column in columns if column in prepared.column_names]
        assert present and len(prepared) == len(tags)
        tokens.update(zip(tags, prepared.select_columns(present)))
    assert {tag[1] for tag in tokens} == {"ours", "trl"}
    for (case, side, index), row in tokens.items():
        if side == "ours":
            assert row == tokens[case, "trl", index], case


def test_dpo_tokenizes_normalised_rows_as_the_trl_rows(tmp_path, chat_tokenizer):
    cases = {}
    for case, (make, _) in PREFERENCE_SHAPES.items():
        rows, _ = make()
        ours, _ = normalize_dataset(datasets.Dataset.from_list(rows), "preference")
        cases[case] = (ours, TRL_PREFERENCE_ROWS.get(case, lambda rows: rows)(rows))
    pools = pooled(cases)
    model = tiny_causal_lms()["ours"]()
    config = trl.DPOConfig(
        output_dir=str(tmp_path / "dpo"),
        per_device_train_batch_size=2,
        max_steps=2,
        max_length=128,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
    )
    trainer = trl.DPOTrainer(
        model,
        copy.deepcopy(model),
        args=config,
        train_dataset=cases["ultrafeedback"][0],
        eval_dataset={name: data for name, (data, _) in pools.items()},
        processing_class=chat_tokenizer,
    )
    assert_same_tokens(trainer, pools, ["prompt_ids", "chosen_ids", "rejected_ids"])
    assert trainer.train().global_step == 2  # conversational rows train as they are


def test_sft_tokenizes_normalised_rows_as_the_trl_rows(tmp_path, chat_tokenizer):
    cases = {}  # case id: (our rows, TRL-format rows)
    native = {
        "text": [{"text": "The sky is blue."}],
        "messages": [{"messages": [SYSTEM, user("Sky?"), assistant("Blue.")]}],
        **{case: make()[0] for case, (make, _) in COMPLETION_SHAPES.items()},
    }
    for case, rows in native.items():
        target = "prompt-completion" if case in COMPLETION_SHAPES else "text"
        cases[case] = (normalize_dataset(datasets.Dataset.from_list(rows), target)[0], rows)
    for case, (make, _) in PREFERENCE_SHAPES.items():
        rows, pairs = make()
        for target in ("text", "prompt-completion"):
            ours, _ = normalize_dataset(datasets.Dataset.from_list(rows), target)
            cases[f"{case}->{target}"] = (ours, expected_rows(pairs, target))
    pools = pooled(cases)
    config = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"),
        per_device_train_batch_size=2,
        max_steps=2,
        max_length=128,
        packing=False,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
    )
    trainer = trl.SFTTrainer(
        tiny_causal_lms()["ours"](),
        args=config,
        train_dataset=cases["ultrafeedback->prompt-completion"][0],
        eval_dataset={name: data for name, (data, _) in pools.items()},
        processing_class=chat_tokenizer,
    )
    assert_same_tokens(trainer, pools, ["input_ids", "completion_mask", "labels", "assistant_masks"])
    for name, (data, _) in pools.items():  # completion-only rows do not train on the prompt
        assert all(row["labels"][0] == -100 for row in trainer.eval_dataset[name]) == ("prompt" in data.column_names)
    assert trainer.train().global_step == 2

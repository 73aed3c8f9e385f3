"""Tests for alignment.data, on small files each test writes itself."""

import gzip
import json
import logging

import datasets
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from alignment.data import (
    DataFormatError,
    DatasetSpec,
    detect_format,
    load_preference_dataset,
    load_sft_dataset,
    normalize_dataset,
    split_hh_dialogue,
)
from alignment.data.formats import IDENTICAL, MISSING, NO_ASSISTANT_TURN, NON_TEXT, PROMPT_TOO_LONG, PROMPTS_DIFFER


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path, monkeypatch):
    """Keep the Arrow files datasets caches out of the user's cache and apart per test."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def read_jsonl(path):
    return datasets.load_dataset("json", data_files=str(path), split="train")


def rows_of(dataset):
    return [tuple(row.values()) for row in dataset]


# One row generator per source shape, with what the row becomes as a preference pair.
def hh_row(i):
    prompt = f"\n\nHuman: question {i}?\n\nAssistant:"
    return {"chosen": f"{prompt} good {i}", "rejected": f"{prompt} bad {i}"}


def rm_static_row(i):
    prompt = f"\n\nHuman: question {i}?\n\nAssistant:"
    return {"prompt": prompt, "response": f" good {i}", "chosen": f" good {i}", "rejected": f" bad {i}"}


def stack_exchange_row(i):
    return {"question": f"question {i}?", "response_j": f"good {i}", "response_k": f"bad {i}"}


def preference_row(i):
    return {"prompt": f"question {i}?", "chosen": f" good {i}", "rejected": f" bad {i}"}


SHAPES = {
    "hh": (hh_row, lambda i: (f"\n\nHuman: question {i}?\n\nAssistant:", f" good {i}", f" bad {i}")),
    "rm-static": (rm_static_row, lambda i: (f"\n\nHuman: question {i}?\n\nAssistant:", f" good {i}", f" bad {i}")),
    "stack-exchange": (
        stack_exchange_row,
        lambda i: (f"Question: question {i}?\n\nAnswer: ", f"good {i}", f"bad {i}"),
    ),
    "preference": (preference_row, lambda i: (f"question {i}?", f" good {i}", f" bad {i}")),
}


def whitespace_tokenizer():
    """A one-token-per-word tokenizer built offline, so prompt lengths are word counts."""
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def test_split_hh_dialogue_cuts_at_last_assistant_turn():
    text = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: Fine, thanks."
    prompt, reply = split_hh_dialogue(text)
    assert prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant:"
    assert reply == " Fine, thanks."
    with pytest.raises(ValueError):
        split_hh_dialogue("\n\nHuman: no answer yet")


@pytest.mark.parametrize(
    "columns, expected",
    [
        (["chosen", "rejected"], "hh"),
        (["prompt", "response", "chosen", "rejected"], "rm-static"),
        (["question", "response_j", "response_k", "qid"], "stack-exchange"),
        (["prompt", "chosen", "rejected"], "preference"),
        (["prompt", "completion"], "prompt-completion"),
        (["text"], "text"),
        (["prompt", "completion", "text"], "prompt-completion"),
    ],
)
def test_detect_format_prefers_the_most_specific_shape(columns, expected):
    assert detect_format(columns) == expected


@pytest.mark.parametrize("shape", SHAPES)
def test_each_preference_shape_loads_from_a_file(tmp_path, shape):
    make_row, expected_pair = SHAPES[shape]
    path = write_jsonl(tmp_path / f"{shape}.jsonl", [make_row(i) for i in range(10)])

    pairs = load_preference_dataset(str(path), test_size=2)
    assert pairs["train"].column_names == ["prompt", "chosen", "rejected"]
    assert (pairs.num_rows["train"], pairs.num_rows["test"]) == (8, 2)
    assert sorted(rows_of(pairs["train"]) + rows_of(pairs["test"])) == sorted(expected_pair(i) for i in range(10))

    sft = load_sft_dataset(str(path), test_size=2)
    expected_texts = sorted(expected_pair(i)[0] + expected_pair(i)[1] for i in range(10))
    assert sorted([*sft["train"]["text"], *sft["test"]["text"]]) == expected_texts


def test_sft_shapes_load_and_completion_only_splits_prompt(tmp_path):
    pc_rows = [{"prompt": f"p{i}", "completion": f" c{i}"} for i in range(4)]
    prompt_completion = write_jsonl(tmp_path / "pc.jsonl", pc_rows)
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": f"t{i}"} for i in range(4)])

    mixed = load_sft_dataset([str(prompt_completion), str(text)], test_size=2)
    assert sorted([*mixed["train"]["text"], *mixed["test"]["text"]]) == sorted(
        [f"p{i} c{i}" for i in range(4)] + [f"t{i}" for i in range(4)]
    )

    pairs = load_sft_dataset(str(prompt_completion), test_size=1, completion_only=True)
    assert pairs["train"].column_names == ["prompt", "completion"]
    assert sorted(rows_of(pairs["train"]) + rows_of(pairs["test"])) == [(f"p{i}", f" c{i}") for i in range(4)]

    with pytest.raises(DataFormatError, match="'text' cannot provide prompt-completion"):
        load_sft_dataset({"path": str(text), "format": "text"}, completion_only=True)


def test_hh_multi_turn_row_is_normalised_exactly():
    prompt = (
        "\n\nHuman: What is a good name for a cat?"
        "\n\nAssistant: How about Miso?"
        "\n\nHuman: Something longer, please."
        "\n\nAssistant:"
    )
    row = {"chosen": prompt + " Sure: Sir Pounce-a-Lot.", "rejected": prompt + " No."}
    dataset = datasets.Dataset.from_list([row])

    pairs, report = normalize_dataset(dataset, "preference")
    assert pairs.to_list() == [{"prompt": prompt, "chosen": " Sure: Sir Pounce-a-Lot.", "rejected": " No."}]
    assert (report.total, report.kept, report.dropped) == (1, 1, {})

    text, _ = normalize_dataset(dataset, "text")
    assert text.to_list() == [{"text": row["chosen"]}]
    completion, _ = normalize_dataset(dataset, "prompt-completion")
    assert completion.to_list() == [{"prompt": prompt, "completion": " Sure: Sir Pounce-a-Lot."}]


def test_bad_preference_rows_are_dropped_and_counted(tmp_path):
    good = [preference_row(i) for i in range(3)]
    bad = [
        {"prompt": "p", "chosen": None, "rejected": "r"},
        {"prompt": "p", "rejected": "r"},
        {"prompt": "   ", "chosen": "c", "rejected": "r"},
        {"prompt": "p", "chosen": 3, "rejected": "r"},
        {"prompt": "p", "chosen": ["c"], "rejected": "r"},
        {"prompt": "p", "chosen": "same", "rejected": "same "},
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", good + bad)

    pairs, report = normalize_dataset(read_jsonl(path), "preference", source="bad.jsonl")
    assert report.dropped == {MISSING: 3, NON_TEXT: 2, IDENTICAL: 1}
    assert (report.total, report.kept) == (9, 3)
    assert sorted(rows_of(pairs)) == sorted(tuple(row.values()) for row in good)


def test_bad_hh_rows_are_dropped_and_counted_and_sft_only_checks_chosen():
    rows = [
        hh_row(0),
        hh_row(1),
        {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"},
        {"chosen": "\n\nHuman: a", "rejected": "\n\nHuman: a\n\nAssistant: y"},
        {"chosen": "\n\nHuman: a\n\nAssistant:", "rejected": "\n\nHuman: a\n\nAssistant: y"},
        {"chosen": "\n\nHuman: a\n\nAssistant: y", "rejected": "\n\nHuman: a\n\nAssistant: y"},
    ]
    dataset = datasets.Dataset.from_list(rows)

    _, report = normalize_dataset(dataset, "preference")
    assert report.dropped == {PROMPTS_DIFFER: 1, NO_ASSISTANT_TURN: 1, MISSING: 1, IDENTICAL: 1}

    text, report = normalize_dataset(dataset, "text")
    assert report.dropped == {NO_ASSISTANT_TURN: 1, MISSING: 1}
    assert list(text["text"]) == [rows[i]["chosen"] for i in (0, 1, 2, 5)]


def test_one_warning_per_drop_reason(tmp_path, caplog):
    rows = [preference_row(i) for i in range(6)] + [
        {"prompt": "p", "chosen": "", "rejected": "r"},
        {"prompt": "p", "chosen": None, "rejected": "r"},
        {"prompt": "p", "chosen": "same", "rejected": "same"},
    ]
    path = write_jsonl(tmp_path / "data.jsonl", rows)

    with caplog.at_level(logging.WARNING, logger="alignment.data"):
        load_preference_dataset(str(path), test_size=1)
    assert sorted(record.getMessage() for record in caplog.records) == [
        f"dropped 1 of 9 rows from {path}: {IDENTICAL}",
        f"dropped 2 of 9 rows from {path}: {MISSING}",
    ]


def test_prompt_length_filter_counts_tokens():
    rows = [
        {"prompt": "one two", "chosen": " a", "rejected": " b"},
        {"prompt": "one two three four", "chosen": " a", "rejected": " b"},
        {"prompt": "one two three four five", "chosen": " a", "rejected": " b"},
        {"prompt": "one two three four five six", "chosen": " a", "rejected": " b"},
        {"prompt": "one two three four five six", "chosen": " a", "rejected": " a"},
    ]
    dataset = datasets.Dataset.from_list(rows)

    kept, report = normalize_dataset(dataset, "preference", tokenizer=whitespace_tokenizer(), max_prompt_length=4)
    assert report.dropped == {PROMPT_TOO_LONG: 2, IDENTICAL: 1}
    assert list(kept["prompt"]) == ["one two", "one two three four"]

    _, report = normalize_dataset(dataset, "preference")
    assert report.dropped == {IDENTICAL: 1}


def test_max_prompt_length_needs_a_tokenizer(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [preference_row(i) for i in range(4)])
    with pytest.raises(ValueError, match="needs a tokenizer"):
        load_preference_dataset(str(path), max_prompt_length=8)


def mixture_rows(tag, count):
    return [{"prompt": f"{tag}{i}", "chosen": "x", "rejected": "y"} for i in range(count)]


def test_mixture_subsamples_and_is_deterministic(tmp_path):
    small = write_jsonl(tmp_path / "small.jsonl", mixture_rows("a", 40))
    large = write_jsonl(tmp_path / "large.jsonl", mixture_rows("b", 100))
    specs = [{"path": str(small), "subsample": 0.5}, {"path": str(large), "subsample": 0.2}]

    mixture = load_preference_dataset(specs, test_size=10, seed=3)
    assert (mixture.num_rows["train"], mixture.num_rows["test"]) == (30, 10)
    prompts = [*mixture["train"]["prompt"], *mixture["test"]["prompt"]]
    assert len(set(prompts)) == 40
    assert sum(prompt.startswith("a") for prompt in prompts) == 20

    again = load_preference_dataset(specs, test_size=10, seed=3)
    assert list(again["train"]["prompt"]) == list(mixture["train"]["prompt"])
    assert list(again["test"]["prompt"]) == list(mixture["test"]["prompt"])
    other_seed = load_preference_dataset(specs, test_size=10, seed=4)
    assert list(other_seed["train"]["prompt"]) != list(mixture["train"]["prompt"])


def test_fraction_is_trls_share_of_the_mixture(tmp_path):
    """TRL's meaning: shares normalised to 1, the largest mixture that repeats no row, each source's first rows
    (40 and 100 rows at shares 1:3 → 33 + 100, limited by the large source)."""
    small = write_jsonl(tmp_path / "small.jsonl", mixture_rows("a", 40))
    large = write_jsonl(tmp_path / "large.jsonl", mixture_rows("b", 100))
    mixture = load_preference_dataset(
        [{"path": str(small), "fraction": 0.25}, {"path": str(large), "fraction": 0.75}], test_size=0, seed=0
    )
    prompts = list(mixture["train"]["prompt"])
    assert sorted(p for p in prompts if p.startswith("a")) == sorted(f"a{i}" for i in range(33))
    assert len(prompts) == 133
    with pytest.raises(ValueError, match="must be set on every datasets entry or on none"):
        load_preference_dataset([{"path": str(small), "fraction": 0.5}, str(large)])


def test_trl_entry_fields_columns_and_data_files(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "x", "rejected": "y", "score": i} for i in range(6)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    mixture = load_preference_dataset(
        [{"path": "json", "data_files": str(path), "columns": ["prompt", "chosen", "rejected"]}], test_size=0
    )
    assert sorted(mixture["train"]["prompt"]) == [f"q{i}" for i in range(6)]
    with pytest.raises(DataFormatError, match=r"columns \['answer'\] not found"):
        load_preference_dataset([{"path": str(path), "columns": ["answer"]}])
    with pytest.raises(DataFormatError, match="data_files entry .*missing.jsonl: no such file"):
        load_preference_dataset([{"path": "json", "data_files": str(tmp_path / "missing.jsonl")}])


def test_held_out_split_comes_from_the_source_when_asked(tmp_path, caplog):
    folder = tmp_path / "hh"
    write_jsonl(folder / "train.jsonl", [hh_row(i) for i in range(20)])
    write_jsonl(folder / "test.jsonl", [hh_row(100 + i) for i in range(5)])
    extra = write_jsonl(tmp_path / "extra.jsonl", [preference_row(200 + i) for i in range(10)])

    mixture = load_preference_dataset([{"path": str(folder), "test_split": "test"}, str(extra)], test_size=0.2, seed=0)
    assert (mixture.num_rows["train"], mixture.num_rows["test"]) == (28, 7)
    test_prompts = list(mixture["test"]["prompt"])
    assert sum(f"question {100 + i}?" in prompt for prompt in test_prompts for i in range(5)) == 5
    assert sum(prompt.startswith("question 2") for prompt in test_prompts) == 2

    # a single file has no test split: test_size of its rows are held out, and one line says so
    single = load_preference_dataset({"path": str(extra), "test_split": "test"}, test_size=0.2, seed=0)
    assert (single.num_rows["train"], single.num_rows["test"]) == (8, 2)
    assert any("is a single file, so it has no 'test' split" in r.message for r in caplog.records)


def test_explicit_format_names_missing_columns(tmp_path):
    path = write_jsonl(tmp_path / "se.jsonl", [{"question": "q", "response_j": "a"}])
    with pytest.raises(DataFormatError) as error:
        load_preference_dataset({"path": str(path), "format": "stack-exchange"})
    message = str(error.value)
    assert "missing ['response_k']" in message
    assert "found ['question', 'response_j']" in message


def test_explicit_format_overrides_detection(tmp_path):
    path = write_jsonl(tmp_path / "rm.jsonl", [rm_static_row(i) for i in range(4)])
    pairs = load_sft_dataset({"path": str(path), "format": "preference"}, test_size=1)
    assert pairs.num_rows["train"] + pairs.num_rows["test"] == 4


def test_unknown_columns_error_names_columns_and_formats(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"foo": "x", "bar": "y"}])
    with pytest.raises(DataFormatError) as error:
        load_preference_dataset(str(path))
    message = str(error.value)
    assert "has columns ['foo', 'bar']" in message
    assert "hh (chosen, rejected)" in message
    assert "stack-exchange (question, response_j, response_k)" in message
    assert "rm-static (prompt, response, chosen, rejected)" in message


def test_text_data_is_not_preference_data(tmp_path):
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": "x"}])
    with pytest.raises(DataFormatError, match=r"has columns \['text'\], which match no known preference format"):
        load_preference_dataset(str(path))


@pytest.mark.parametrize("name, content", [("latin.jsonl", '{"text": "café"}\n'), ("latin.csv", "text\ncafé\n")])
def test_non_utf8_file_gives_a_clear_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(DataFormatError, match=f"{name} is not valid UTF-8"):
        load_sft_dataset(str(path))


def test_empty_after_filtering_says_why(tmp_path):
    path = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "a"}] * 3)
    with pytest.raises(DataFormatError, match=r"all 3 rows were dropped \(chosen identical to rejected: 3\)"):
        load_preference_dataset(str(path))


def test_missing_local_file_is_reported(tmp_path):
    with pytest.raises(DataFormatError, match="no such file or directory"):
        load_preference_dataset(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataFormatError, match="no such file or directory"):
        load_preference_dataset("data/missing.jsonl")


@pytest.mark.parametrize("suffix", ["parquet", "csv", "jsonl.gz"])
def test_parquet_csv_and_gzip_files_load(tmp_path, suffix):
    rows = [stack_exchange_row(i) for i in range(6)]
    path = tmp_path / f"data.{suffix}"
    if suffix == "parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif suffix == "csv":
        datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
    else:
        path.write_bytes(gzip.compress("".join(json.dumps(row) + "\n" for row in rows).encode()))

    pairs = load_preference_dataset(str(path), test_size=2)
    expected = SHAPES["stack-exchange"][1]
    assert sorted(rows_of(pairs["train"]) + rows_of(pairs["test"])) == sorted(expected(i) for i in range(6))


def test_dataset_spec_from_any():
    assert DatasetSpec.from_any("data.jsonl") == DatasetSpec(path="data.jsonl")
    spec = DatasetSpec.from_any({"path": "Anthropic/hh-rlhf", "data_dir": "harmless-base", "subsample": 0.1})
    assert (spec.path, spec.data_dir, spec.subsample) == ("Anthropic/hh-rlhf", "harmless-base", 0.1)
    assert spec.split == "train"
    assert DatasetSpec.from_any(spec) is spec
    with pytest.raises(ValueError, match="unknown datasets entry keys \\['fracton'\\]"):
        DatasetSpec.from_any({"path": "x.jsonl", "fracton": 0.5})
    with pytest.raises(ValueError, match="subsample must be in"):
        DatasetSpec(path="x.jsonl", subsample=0)
    with pytest.raises(ValueError, match="fraction .* must be > 0"):
        DatasetSpec(path="x.jsonl", fraction=0)
    with pytest.raises(ValueError, match="unknown format 'dpo'"):
        DatasetSpec(path="x.jsonl", format="dpo")


def test_test_size_zero_holds_nothing_out(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Q{i}", "chosen": f" a{i}", "rejected": f" b{i}"} for i in range(7)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_preference_dataset([str(path)], test_size=0)
    assert len(data["train"]) == 7 and len(data["test"]) == 0
    assert data["test"].column_names == ["prompt", "chosen", "rejected"]

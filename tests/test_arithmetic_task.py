"""Tests for examples/arithmetic/task.py, the offline demo task."""

import json
from collections import Counter

import datasets
import pytest

from alignment.data import split_hh_dialogue
from examples.arithmetic.task import (
    FILES,
    OPERATORS,
    PROBLEMS,
    Problem,
    accuracy,
    answer,
    is_correct,
    preference_dataset,
    prompts_dataset,
    sft_dataset,
    split_problems,
    write_task,
    wrong_answers,
)

SMALL = {"n_sft": 500, "n_pairs": 300}


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path, monkeypatch):
    """Keep the Arrow files datasets caches out of the user's cache and apart per test."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """The files written with the default sizes, as {name: rows}."""
    paths = write_task(tmp_path_factory.mktemp("task"))
    return {name: read_jsonl(path) for name, path in paths.items()}


def test_prompt_format_is_hh_and_splits_back():
    problem = Problem(7, "+", 5)
    assert problem.prompt == "\n\nHuman: What is 7 + 5?\n\nAssistant:"
    assert problem.reply() == " 12"
    assert Problem(3, "-", 6).reply() == " -3"
    assert split_hh_dialogue(problem.prompt + problem.reply()) == (problem.prompt, " 12")


def test_every_row_splits_into_prompt_and_reply(task):
    for row in task["sft_train"] + task["sft_test"]:
        prompt, reply = split_hh_dialogue(row["prompt"] + row["completion"])
        assert (prompt, reply) == (row["prompt"], row["completion"]) and reply.startswith(" ")
        assert answer(prompt) is not None
    for row in task["dpo_train"] + task["dpo_test"]:
        for reply in (row["chosen"], row["rejected"]):
            assert split_hh_dialogue(row["prompt"] + reply) == (row["prompt"], reply)


def test_problems_and_split():
    assert len(PROBLEMS) == len(set(PROBLEMS)) == 300
    assert all(problem.prompt.isascii() for problem in PROBLEMS)
    train, held_out = split_problems(0.2, seed=0)
    assert len(train) == 240 and len(held_out) == 60
    assert not set(train) & set(held_out) and set(train) | set(held_out) == set(PROBLEMS)
    assert Counter(problem.op for problem in held_out) == dict.fromkeys(OPERATORS, 20)


@pytest.mark.parametrize("fraction", [0.0, 1.0, 0.001])
def test_split_rejects_fractions_that_empty_a_side(fraction):
    with pytest.raises(ValueError):
        split_problems(fraction)


def test_held_out_problems_never_reach_training(task):
    held_out = {row["prompt"] for row in task["prompts_test"]}
    assert held_out == {problem.prompt for problem in split_problems(0.2, seed=0)[1]}
    sft_train = {row["prompt"] for row in task["sft_train"]}
    dpo_train = {row["prompt"] for row in task["dpo_train"]}
    assert not held_out & sft_train and not held_out & dpo_train
    # Every train problem is used, and the test splits hold exactly the held-out problems.
    assert sft_train == dpo_train and len(sft_train) == 240
    assert {row["prompt"] for row in task["sft_test"]} == held_out
    assert {row["prompt"] for row in task["dpo_test"]} == held_out


def test_answers_are_right_and_wrong_where_they_should_be(task):
    for row in task["dpo_train"] + task["dpo_test"]:
        assert is_correct(row["prompt"], row["chosen"])
        assert not is_correct(row["prompt"], row["rejected"])
    for row in task["prompts_test"]:
        assert row["answer"] == answer(row["prompt"])
    assert all(is_correct(row["prompt"], row["completion"]) for row in task["sft_test"])


def test_answer_parses_every_problem():
    for problem in PROBLEMS:
        assert answer(problem.prompt) == problem.answer
    assert answer(Problem(3, "*", 4).prompt) == 12 and answer(Problem(2, "-", 9).prompt) == -7
    with pytest.raises(ValueError):
        answer("\n\nHuman: Hello\n\nAssistant:")


def test_wrong_answers_are_plausible_and_wrong():
    for problem in PROBLEMS:
        others = {apply(problem.a, problem.b) for apply in OPERATORS.values()}
        for value in wrong_answers(problem):
            assert value != problem.answer
            assert abs(value - problem.answer) <= 3 or value in others
    # 2 + 2 == 2 * 2: another operator's result that happens to be right is not a mistake.
    assert 4 not in wrong_answers(Problem(2, "+", 2))


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (" 12", True),
        (" 12.", True),
        ("12 apples", True),
        (" 12\n\nHuman: What is 1 + 1?", True),
        (" 13", False),
        (" 123", False),
        (" 1 2", False),
        ("", False),
        (" twelve", False),
        ("   ", False),
    ],
)
def test_is_correct(reply, expected):
    assert is_correct(Problem(7, "+", 5).prompt, reply) is expected


def test_is_correct_negative_answers():
    prompt = Problem(3, "-", 6).prompt
    assert is_correct(prompt, " -3") and not is_correct(prompt, " 3")


def test_accuracy():
    prompts = [Problem(7, "+", 5).prompt, Problem(3, "-", 6).prompt]
    assert accuracy(prompts, [" 12", " 3"]) == 0.5
    assert accuracy(prompts, [" 12", " -3"]) == 1.0
    with pytest.raises(ValueError):
        accuracy(prompts, [" 12"])
    with pytest.raises(ValueError):
        accuracy([], [])


@pytest.mark.parametrize(
    ("n_sft", "wrong_fraction", "wrong"),
    [(4000, 0.3, 1200), (200, 0.25, 50), (7, 0.5, 4), (50, 0.0, 0), (50, 1.0, 50)],
)
def test_wrong_fraction_is_exact(n_sft, wrong_fraction, wrong):
    rows = sft_dataset(n_sft=n_sft, wrong_fraction=wrong_fraction)["train"]
    assert len(rows) == n_sft
    assert sum(not is_correct(row["prompt"], row["completion"]) for row in rows) == wrong


def test_rows_spread_evenly_over_train_problems():
    prompts = preference_dataset(n_pairs=500)["train"]["prompt"]
    assert set(Counter(prompts).values()) <= {2, 3}  # 500 rows over 240 problems


def test_deterministic_for_a_seed_and_different_for_another(tmp_path):
    first = write_task(tmp_path / "a", **SMALL, seed=1)
    again = write_task(tmp_path / "b", **SMALL, seed=1)
    other = write_task(tmp_path / "c", **SMALL, seed=2)
    for name in FILES:
        assert first[name].read_bytes() == again[name].read_bytes()
        assert first[name].read_bytes() != other[name].read_bytes()


def test_files_have_trl_columns_and_load(tmp_path):
    paths = write_task(tmp_path / "task", **SMALL)
    assert sorted(paths) == sorted(FILES) and all(path.name == f"{name}.jsonl" for name, path in paths.items())
    columns = {
        "sft_train": ["prompt", "completion"],
        "sft_test": ["prompt", "completion"],
        "dpo_train": ["prompt", "chosen", "rejected"],
        "dpo_test": ["prompt", "chosen", "rejected"],
        "prompts_test": ["prompt", "answer"],
    }
    sizes = {"sft_train": 500, "sft_test": 60, "dpo_train": 300, "dpo_test": 60, "prompts_test": 60}
    for name, path in paths.items():
        loaded = datasets.load_dataset("json", data_files=str(path), split="train")
        assert loaded.column_names == columns[name] and len(loaded) == sizes[name]


def test_datasets_match_the_files(tmp_path):
    paths = write_task(tmp_path, **SMALL, seed=3)
    sft = sft_dataset(n_sft=SMALL["n_sft"], seed=3)
    pairs = preference_dataset(n_pairs=SMALL["n_pairs"], seed=3)
    assert sft["train"].to_list() == read_jsonl(paths["sft_train"])
    assert sft["test"].to_list() == read_jsonl(paths["sft_test"])
    assert pairs["train"].to_list() == read_jsonl(paths["dpo_train"])
    assert pairs["test"].to_list() == read_jsonl(paths["dpo_test"])
    assert prompts_dataset(seed=3).to_list() == read_jsonl(paths["prompts_test"])
    assert len(prompts_dataset("train", seed=3)) == 240


def test_sft_size_does_not_change_the_pairs(tmp_path):
    small = write_task(tmp_path / "a", n_sft=100, n_pairs=50)
    large = write_task(tmp_path / "b", n_sft=900, n_pairs=50)
    assert small["dpo_train"].read_bytes() == large["dpo_train"].read_bytes()

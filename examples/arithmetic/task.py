"""Single-digit arithmetic in the Anthropic HH dialogue format: an offline demo task.

Every reply can be checked exactly, so a demo can show in numbers that SFT on noisy data
learns the task and that DPO on (correct, wrong) pairs then removes the noise. A prompt
reads "\\n\\nHuman: What is 7 + 5?\\n\\nAssistant:" and its reply " 12", with the leading
space of HH replies (GPT-2 encodes " 12" as one token, " -3" as two).

The 300 problems (operands 0..9, operators + - *) are split by seed into train and
held-out problems. Held-out problems appear only in the test splits, so held-out accuracy
measures arithmetic the model has learned rather than answers it has memorised.
"""

from __future__ import annotations

import json
import operator
import os
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, DatasetDict

from alignment.common import HH_ASSISTANT, HH_HUMAN

__all__ = [
    "FILES",
    "HH_HUMAN",
    "N_PAIRS",
    "N_SFT",
    "OPERATORS",
    "PROBLEMS",
    "Problem",
    "accuracy",
    "answer",
    "is_correct",
    "preference_dataset",
    "prompts_dataset",
    "sft_dataset",
    "split_problems",
    "wrong_answer",
    "wrong_answers",
    "write_task",
]

OPERATORS: dict[str, Callable[[int, int], int]] = {"+": operator.add, "-": operator.sub, "*": operator.mul}
OPERANDS = range(10)

# Sized for a tiny GPT-2 trained from scratch for a few minutes on two CPU cores: rows are
# about 15 tokens, so an epoch of either is a few hundred small steps. With 240 train
# problems, each appears about 17 times in the SFT rows and 8 times in the pairs.
N_SFT = 4000
N_PAIRS = 2000
WRONG_FRACTION = 0.3
HELD_OUT_FRACTION = 0.2

# The files write_task writes, each "<name>.jsonl".
FILES = ("sft_train", "sft_test", "dpo_train", "dpo_test", "prompts_test")

_QUESTION = re.compile(r"What is (\d+) ([-+*]) (\d+)\?")
_INTEGER = re.compile(r"-?\d+")


@dataclass(frozen=True, order=True)
class Problem:
    """One question "a op b"."""

    a: int
    op: str
    b: int

    @property
    def answer(self) -> int:
        return OPERATORS[self.op](self.a, self.b)

    @property
    def prompt(self) -> str:
        return f"{HH_HUMAN} What is {self.a} {self.op} {self.b}?{HH_ASSISTANT}"

    def reply(self, value: int | None = None) -> str:
        """The reply stating ``value`` (the right answer by default); it starts with a space,
        as HH replies do, so ``prompt + reply`` is the whole dialogue."""
        return f" {self.answer if value is None else value}"


PROBLEMS: tuple[Problem, ...] = tuple(Problem(a, op, b) for op in OPERATORS for a in OPERANDS for b in OPERANDS)


def answer(prompt: str) -> int:
    """The right answer to the (last) question in ``prompt``."""
    questions = _QUESTION.findall(prompt)
    if not questions:
        raise ValueError(f"no arithmetic question in prompt: {prompt[:80]!r}")
    a, op, b = questions[-1]
    return OPERATORS[op](int(a), int(b))


def is_correct(prompt: str, reply: str) -> bool:
    """Whether the first integer in ``reply`` is the answer; a generated reply may run on
    past the number ("12 apples", " 12\\n\\nHuman: ..."), and one with no number is wrong."""
    match = _INTEGER.search(reply)
    return match is not None and int(match.group()) == answer(prompt)


def accuracy(prompts: Iterable[str], replies: Iterable[str]) -> float:
    """The share of replies that answer their prompt correctly."""
    prompts, replies = list(prompts), list(replies)
    if len(prompts) != len(replies):
        raise ValueError(f"{len(prompts)} prompts but {len(replies)} replies")
    if not prompts:
        raise ValueError("no prompts to score")
    return sum(map(is_correct, prompts, replies)) / len(prompts)


def wrong_answers(problem: Problem) -> list[int]:
    """Plausible mistakes, so rejected replies are near misses rather than noise: the answer
    off by one to three, or the result of another operator on the same operands."""
    near = {problem.answer + delta for delta in (-3, -2, -1, 1, 2, 3)}
    confused = {apply(problem.a, problem.b) for apply in OPERATORS.values()}
    return sorted((near | confused) - {problem.answer})


def wrong_answer(problem: Problem, rng: random.Random) -> int:
    return rng.choice(wrong_answers(problem))


def _rng(seed: int, purpose: str) -> random.Random:
    """A separate stream per purpose, so that e.g. changing n_sft leaves the pairs unchanged.
    (String seeds are hashed with SHA-512, the same in every process.)"""
    return random.Random(f"arithmetic/{seed}/{purpose}")


def split_problems(held_out_fraction: float = HELD_OUT_FRACTION, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """Split PROBLEMS into sorted (train, held_out) lists, holding out the same share of each
    operator so held-out accuracy is not tilted toward the easiest one."""
    if not 0 < held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    train, held_out = [], []
    rng = _rng(seed, "split")
    for op in OPERATORS:
        group = [problem for problem in PROBLEMS if problem.op == op]
        rng.shuffle(group)
        cut = round(held_out_fraction * len(group))
        held_out += group[:cut]
        train += group[cut:]
    if not train or not held_out:
        raise ValueError(f"held_out_fraction {held_out_fraction} leaves no train or no held-out problems")
    return sorted(train), sorted(held_out)


def _draw(problems: Sequence[Problem], n: int, rng: random.Random) -> list[Problem]:
    """``n`` problems in shuffled passes over ``problems``, so each appears n / len(problems)
    times, give or take one, instead of by the luck of independent draws."""
    drawn: list[Problem] = []
    while len(drawn) < n:
        batch = list(problems)
        rng.shuffle(batch)
        drawn += batch
    return drawn[:n]


def _check(n: int, name: str) -> None:
    if n < 1:
        raise ValueError(f"{name} must be at least 1, got {n}")


def _sft_rows(n_sft: int, wrong_fraction: float, held_out_fraction: float, seed: int) -> dict[str, list[dict]]:
    """``train``: n_sft dialogues on train problems, exactly round(wrong_fraction * n_sft)
    of them with a wrong answer; ``test``: each held-out problem once, answered right, so
    eval loss measures the task itself rather than the noise."""
    _check(n_sft, "n_sft")
    if not 0 <= wrong_fraction <= 1:
        raise ValueError(f"wrong_fraction must be in [0, 1], got {wrong_fraction}")
    train, held_out = split_problems(held_out_fraction, seed)
    rng = _rng(seed, "sft")
    drawn = _draw(train, n_sft, rng)
    wrong = set(rng.sample(range(n_sft), round(wrong_fraction * n_sft)))
    rows = []
    for index, problem in enumerate(drawn):
        value = wrong_answer(problem, rng) if index in wrong else None
        rows.append({"prompt": problem.prompt, "completion": problem.reply(value)})
    return {"train": rows, "test": [{"prompt": problem.prompt, "completion": problem.reply()} for problem in held_out]}


def _pairs(problems: Sequence[Problem], rng: random.Random) -> list[dict]:
    return [
        {"prompt": problem.prompt, "chosen": problem.reply(), "rejected": problem.reply(wrong_answer(problem, rng))}
        for problem in problems
    ]


def _preference_rows(n_pairs: int, held_out_fraction: float, seed: int) -> dict[str, list[dict]]:
    """``train``: n_pairs (right, wrong) pairs on train problems; ``test``: one pair per
    held-out problem."""
    _check(n_pairs, "n_pairs")
    train, held_out = split_problems(held_out_fraction, seed)
    rng = _rng(seed, "dpo")
    return {"train": _pairs(_draw(train, n_pairs, rng), rng), "test": _pairs(held_out, _rng(seed, "dpo-test"))}


def _prompt_rows(split: str, held_out_fraction: float, seed: int) -> list[dict]:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    train, held_out = split_problems(held_out_fraction, seed)
    problems = train if split == "train" else held_out
    return [{"prompt": problem.prompt, "answer": problem.answer} for problem in problems]


def sft_dataset(
    *,
    n_sft: int = N_SFT,
    wrong_fraction: float = WRONG_FRACTION,
    held_out_fraction: float = HELD_OUT_FRACTION,
    seed: int = 0,
) -> DatasetDict:
    """SFT ``train``/``test`` splits with ``prompt`` and ``completion`` columns (TRL's
    prompt-completion layout, so SFT can score the replies only). Train rows are noisy (``wrong_fraction`` of
    them answer wrongly) so the SFT policy leaves something for DPO to fix."""
    rows = _sft_rows(n_sft, wrong_fraction, held_out_fraction, seed)
    return DatasetDict({split: Dataset.from_list(split_rows) for split, split_rows in rows.items()})


def preference_dataset(
    *,
    n_pairs: int = N_PAIRS,
    held_out_fraction: float = HELD_OUT_FRACTION,
    seed: int = 0,
) -> DatasetDict:
    """DPO ``train``/``test`` splits with TRL's ``prompt``, ``chosen``, ``rejected`` columns:
    the right reply is chosen, a plausible wrong one rejected."""
    rows = _preference_rows(n_pairs, held_out_fraction, seed)
    return DatasetDict({split: Dataset.from_list(split_rows) for split, split_rows in rows.items()})


def prompts_dataset(split: str = "test", *, held_out_fraction: float = HELD_OUT_FRACTION, seed: int = 0) -> Dataset:
    """Each held-out (``split="test"``) or train problem once, with ``prompt`` and ``answer``
    columns, to measure accuracy by generating replies."""
    return Dataset.from_list(_prompt_rows(split, held_out_fraction, seed))


def _write_jsonl(path: Path, rows: Iterable[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8", newline="\n")
    return path


def write_task(
    folder: str | os.PathLike,
    *,
    n_sft: int = N_SFT,
    n_pairs: int = N_PAIRS,
    wrong_fraction: float = WRONG_FRACTION,
    held_out_fraction: float = HELD_OUT_FRACTION,
    seed: int = 0,
) -> dict[str, Path]:
    """Write the task's jsonl files (see FILES) into ``folder`` and return their paths by name.

    The same arguments always give the same bytes, so a demo's data can be regenerated
    instead of shipped.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sft = _sft_rows(n_sft, wrong_fraction, held_out_fraction, seed)
    pairs = _preference_rows(n_pairs, held_out_fraction, seed)
    contents = {
        "sft_train": sft["train"],
        "sft_test": sft["test"],
        "dpo_train": pairs["train"],
        "dpo_test": pairs["test"],
        "prompts_test": _prompt_rows("test", held_out_fraction, seed),
    }
    return {name: _write_jsonl(folder / f"{name}.jsonl", contents[name]) for name in FILES}

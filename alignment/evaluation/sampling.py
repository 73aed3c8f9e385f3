"""The generate command behind scripts/generate.py: its options, prompts from the command line or a prompts file (text,
or conversations rendered through the tokenizer's chat template), samples printed between separators, and the chat
loop (the dialogue so far, through the chat template, as the prompt, oldest turns forgotten before the model's
positions run out). `generation.generate` does the decoding."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..common import HH_HUMAN
from ..modeling.chat_templates import is_conversation, render_prompt, resolve_chat_template
from ..modeling.loading import model_max_length
from .generation import cut_at, generate
from .loading import load_causal_lm
from .options import (
    add_loading_arguments,
    check_at_least_one,
    check_output_json,
    check_top_p,
    command_parser,
    generation_settings,
    loading_kwargs,
    pick_device,
    write_json,
)

USAGE = """Sample replies from a causal LM checkpoint, or chat with it through its chat template (HH text for GPT-2).

    python scripts/generate.py CHECKPOINT [--prompt TEXT | --prompts_file FILE] [--num_samples 10]
        [--max_new_tokens 50] [--temperature 0.9] [--top_k 200] [--top_p 1.0] [--greedy] [--seed N]
        [--output_json PATH]
    python scripts/generate.py CHECKPOINT --chat          (type lines, or pipe them in; an empty line or "exit" ends)

CHECKPOINT is a local folder or a Hub id: ours, an official GPT-2 (loaded into our GPT-2 class) or any transformers
causal LM (`--trust_remote_code` for models whose code lives in the checkpoint). The default prompt is the
assignment's "Human: Hello, my name is Kate. What is your name?\\n\\nAssistant:". A prompts file holds one prompt per
line, or is a .jsonl/.json file whose items are prompts: a text, a conversation (a list of {"role", "content"}
messages), or an object whose "prompt" (text or conversation) or "messages" field holds one. Text prompts are used
as they are (in `--prompt` and in a plain prompts file a literal \\n stands for a newline); conversations go through
the tokenizer's chat template with the generation prompt (GPT-2's tokenizer renders them as HH text: "\\n\\nHuman:
...\\n\\nAssistant:"). Generation uses the KV cache and stops at end-of-text (or the template's end-of-turn token).
Each sample is printed as prompt + reply, with a line of dashes between samples; `--output_json` also writes them as
JSON. `--greedy` gives one reply per prompt.

`--chat` keeps the whole dialogue as the prompt, rendered through the tokenizer's chat template (`--chat_template`
picks another; a tokenizer without one gets the HH one): with HH each user line adds "\\n\\nHuman: LINE\\n\\nAssistant:",
and the reply is cut where the model starts the next "\\n\\nHuman:" turn. Reading stops at end of input, an empty line
or "exit".
"""

DEFAULT_PROMPT = "Human: Hello, my name is Kate. What is your name?\n\nAssistant:"
SEPARATOR = "-" * 80
EXIT_WORDS = ("exit", "quit")


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("generate.py", USAGE)
    parser.add_argument("checkpoint", help="model folder or Hub id")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--prompt", default=None, help="the prompt, \\n for a newline (default: the assignment's Kate prompt)"
    )
    source.add_argument(
        "--prompts_file", default=None, help="one prompt per line, or .jsonl/.json of texts or conversations"
    )
    parser.add_argument(
        "--chat", action="store_true", help="interactive dialogue through the chat template, user lines from stdin"
    )
    parser.add_argument(
        "--num_samples", type=int, default=None, help="samples per prompt (default 10; 1 with --greedy)"
    )
    parser.add_argument("--max_new_tokens", type=int, default=50)
    parser.add_argument("--temperature", type=float, default=0.9)
    parser.add_argument("--top_k", type=int, default=200)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible samples")
    parser.add_argument("--batch_size", type=int, default=32, help="prompts per generate call")
    parser.add_argument("--output_json", default=None, help="also write the samples (or the dialogue) here")
    add_loading_arguments(parser)
    return parser


def check_options(args: argparse.Namespace) -> None:
    """Bad option values and combinations, before anything loads."""
    check_at_least_one(args, ["max_new_tokens", "top_k", "batch_size", "num_samples"])
    if not args.greedy and args.temperature <= 0:
        raise ValueError(f"--temperature must be positive, got {args.temperature} (use --greedy for argmax decoding)")
    check_top_p(args.top_p)
    if args.chat and (args.prompt is not None or args.prompts_file is not None):
        raise ValueError("--chat reads the dialogue from stdin; drop --prompt/--prompts_file")
    check_output_json(args.output_json)
    resolve_chat_template(args.chat_template)  # an unknown template fails before the model loads
    if args.prompts_file:
        read_prompts(args.prompts_file)  # a bad prompts file fails before the model loads


Prompt = str | list[dict[str, Any]]


def read_prompts(path: str) -> list[Prompt]:
    """Prompts from a text file (one a line, "\\n" escapes newlines), a .jsonl file or a .json list; the JSON ones may
    be conversations (lists of messages)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    text = file.read_text(encoding="utf-8")
    suffix = file.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path} line {number} is not JSON: {error}") from None
        prompts = [_prompt_of(row, f"{path} line {number}") for number, row in enumerate(rows, 1)]
    elif suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not JSON: {error}") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path} should hold a JSON list of prompts or of objects with a 'prompt' field")
        prompts = [_prompt_of(row, f"{path} item {number}") for number, row in enumerate(rows, 1)]
    else:
        prompts = [unescape(line) for line in text.splitlines() if line.strip()]
    if not prompts:  # an empty result would look like a successful run
        raise ValueError(f"{path} holds no prompts")
    return prompts


def unescape(text: str | None) -> str | None:
    """A literal backslash-n stands for a newline, so HH prompts fit on one line or in one shell argument."""
    return None if text is None else text.replace("\\n", "\n")


def _prompt_of(row: Any, where: str) -> Prompt:
    """A text, a conversation, or the one an object's "prompt" (else "messages") field holds."""
    if isinstance(row, dict):
        row = row.get("prompt", row.get("messages"))
    if isinstance(row, str):
        return row
    if isinstance(row, list) and row:
        return _messages(row, where)
    raise ValueError(f"{where} has no 'prompt' (text or messages) nor 'messages' field")


def _messages(row: list[Any], where: str) -> list[dict[str, Any]]:
    """A conversation's messages, each with a text role and content, so the template never meets a bad one."""
    for number, message in enumerate(row, 1):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise ValueError(f"{where}: message {number} should be an object with text 'role' and 'content' fields")
    return row


def check_length(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int) -> None:
    """The prompt and the new tokens fit in the model's positions."""
    positions = model_max_length(model)
    n_prompt = len(tokenizer(prompt)["input_ids"])
    if positions is not None and n_prompt + max_new_tokens > positions:
        raise ValueError(
            f"a prompt of {n_prompt} tokens plus max_new_tokens {max_new_tokens} exceeds the model's "
            f"{positions} positions; shorten the prompt or lower --max_new_tokens"
        )


def sample(args: argparse.Namespace, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Replies to the prompt (or to each prompt of the file), printed as prompt + reply between separators."""
    given = read_prompts(args.prompts_file) if args.prompts_file else [unescape(args.prompt) or DEFAULT_PROMPT]
    prompts = [render_prompt(tokenizer, prompt) for prompt in given]
    for prompt in prompts:
        check_length(model, tokenizer, prompt, args.max_new_tokens)
    num_samples = args.num_samples or (1 if args.greedy else 10)
    if args.greedy and num_samples > 1:
        print("note: greedy decoding gives one reply per prompt; --num_samples ignored", file=sys.stderr)
        num_samples = 1
    replies = generate(model, tokenizer, prompts, num_return_sequences=num_samples, **generation_settings(args))
    samples = [
        {"prompt": prompt, "reply": reply, **({"messages": source} if is_conversation(source) else {})}
        for source, prompt, group in zip(given, prompts, replies)
        for reply in group
    ]
    for i, item in enumerate(samples):
        if i:
            print(SEPARATOR)
        print(item["prompt"] + item["reply"])
    return {"num_samples": num_samples, "samples": samples}


def chat(
    args: argparse.Namespace, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, stdin: TextIO | None = None
) -> dict[str, Any]:
    """The dialogue loop: one reply per user line, the whole dialogue so far through the chat template as the prompt."""
    stdin = stdin if stdin is not None else sys.stdin
    interactive = stdin.isatty()
    settings = generation_settings(args)
    positions = model_max_length(model)
    turns: list[dict[str, str]] = []
    first = 0  # the oldest turn the model still sees
    while True:
        if interactive:
            print("Human: ", end="", flush=True)
        line = stdin.readline()
        if not line:  # end of input
            break
        user = line.rstrip("\r\n")
        if not user.strip() or user.strip().lower() in EXIT_WORDS:
            break
        if not interactive:
            print(f"Human: {user}")
        turns.append({"human": user, "assistant": ""})
        prompt = render_prompt(tokenizer, conversation(turns[first:]))
        while (
            positions is not None
            and first < len(turns) - 1
            and len(tokenizer(prompt)["input_ids"]) + args.max_new_tokens > positions
        ):
            first += 1  # the model forgets the oldest turn rather than overflow its positions
            prompt = render_prompt(tokenizer, conversation(turns[first:]))
        check_length(model, tokenizer, prompt, args.max_new_tokens)
        reply = cut_at(generate(model, tokenizer, [prompt], **settings)[0][0], HH_HUMAN).rstrip()
        turns[-1]["assistant"] = reply
        print(f"Assistant:{reply}", flush=True)
    return {"dialogue": dialogue(tokenizer, turns), "turns": turns}


def conversation(turns: list[dict[str, str]]) -> list[dict[str, str]]:
    """The turns as messages, ending with the last user line (its reply is the one to generate)."""
    messages = []
    for turn in turns:
        messages.append({"role": "user", "content": turn["human"]})
        messages.append({"role": "assistant", "content": turn["assistant"].strip()})
    return messages[:-1]


def dialogue(tokenizer: PreTrainedTokenizerBase, turns: list[dict[str, str]]) -> str:
    """The whole dialogue as text: the last prompt (all turns, through the chat template) plus the last reply."""
    return render_prompt(tokenizer, conversation(turns)) + turns[-1]["assistant"] if turns else ""


def main(argv: list[str] | None = None, stdin: TextIO | None = None) -> dict[str, Any]:
    """scripts/generate.py: samples (or a chat read from `stdin`), printed, returned, and written with --output_json."""
    args = build_parser().parse_args(argv)
    check_options(args)
    model, tokenizer = load_causal_lm(args.checkpoint, **loading_kwargs(args, pick_device(args.device)))
    if args.seed is not None:
        transformers.set_seed(args.seed)
    result = chat(args, model, tokenizer, stdin) if args.chat else sample(args, model, tokenizer)
    result = {"checkpoint": args.checkpoint, "settings": {**generation_settings(args), "seed": args.seed}, **result}
    write_json(args.output_json, result)
    return result

"""What the generate and evaluate commands share: an argument parser whose errors become the CLI's one `error:`
line, the checkpoint-loading options and the keyword arguments they give `load_causal_lm`, the device choice, the
sampling settings and their checks, and writing the results as JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch


class ArgumentParser(argparse.ArgumentParser):
    """Bad arguments raise, so run_cli reports them in its one `error:` line with exit code 1."""

    def error(self, message: str) -> None:
        raise ValueError(f"{message} (see {self.prog} --help)")


def command_parser(prog: str, usage: str) -> ArgumentParser:
    """A raising parser whose description is the first line of `usage` and whose epilog is the rest."""
    lines = usage.splitlines()
    return ArgumentParser(
        prog=prog,
        description=lines[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(lines[1:]),
    )


def add_loading_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The command-line options of `load_causal_lm`, shared by scripts/generate.py and scripts/evaluate.py."""
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or Hub id (default: the checkpoint's)")
    parser.add_argument(
        "--chat_template",
        default=None,
        help="chat template for conversational prompts: hh, chatml or a Jinja file (default: the tokenizer's own; "
        "hh for GPT-2's tokenizer without one)",
    )
    parser.add_argument("--trust_remote_code", action="store_true", help="allow model code from the checkpoints")
    parser.add_argument(
        "--model_implementation",
        choices=("alignment", "transformers"),
        default="alignment",
        help="GPT-2 checkpoints load into our class ('alignment') or transformers' own",
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "auto"))
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")


def pick_device(name: str | None) -> torch.device:
    """The device asked for, else the GPU if there is one, else the CPU."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def loading_kwargs(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """`load_causal_lm`'s keyword arguments from the options of `add_loading_arguments`."""
    return dict(
        tokenizer_name_or_path=args.tokenizer,
        trust_remote_code=args.trust_remote_code,
        dtype=args.dtype,
        model_implementation=args.model_implementation,
        device=device,
        chat_template=args.chat_template,
    )


def check_at_least_one(args: argparse.Namespace, names: list[str]) -> None:
    """Each named option, when set, is a positive count."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}")


def check_top_p(top_p: float) -> None:
    if not 0 < top_p <= 1:
        raise ValueError(f"--top_p must be in (0, 1], got {top_p}")


def check_output_json(path: str | None) -> None:
    if path and Path(path).is_dir():
        raise ValueError(f"--output_json should name a file, not the folder {path}")


def generation_settings(args: argparse.Namespace) -> dict[str, Any]:
    """`generate`'s keyword arguments from the sampling options (`--greedy` drops the sampling ones)."""
    settings: dict[str, Any] = {
        "max_new_tokens": args.max_new_tokens,
        "do_sample": not args.greedy,
        "batch_size": args.batch_size,
    }
    if not args.greedy:
        settings.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    return settings


def write_json(path: str | None, result: dict[str, Any]) -> None:
    """The results as indented UTF-8 JSON at `path` (its folder made as needed); nothing when no path."""
    if not path:
        return
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

"""Entry points of the scripts: one clear line and a non-zero exit for a bad input, never a traceback
(unless `--debug` or ALIGNMENT_DEBUG=1 asks for it)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

DEBUG_FLAG = "--debug"


def run_cli(main: Callable[[list[str]], object], argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get("ALIGNMENT_DEBUG", "") not in ("", "0")
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    try:
        main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as error:
        if debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"error: {message} (run with --debug for the traceback)", file=sys.stderr)
        raise SystemExit(1) from None


def sft() -> None:
    from .pipeline import run_sft

    run_cli(run_sft)


def dpo() -> None:
    from .pipeline import run_dpo

    run_cli(run_dpo)

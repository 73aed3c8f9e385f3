"""Entry points of the scripts: one clear line and a non-zero exit for a bad input, never a traceback
(unless `--debug` or ALIGNMENT_DEBUG=1 asks for it).

Exit codes: 0 done; 1 an error (the line says what to change); 128 + the signal number when a signal stopped the run
(130 for Ctrl-C: a checkpoint was saved if training had started, and the line says where).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable

from ..common import one_line

DEBUG_FLAG = "--debug"


def redacted(argv: list[str]) -> list[str]:
    """The command line with the values of secret settings (`--hub_token X`, `--hub_token=X`) masked."""
    from .recipe import SECRET_KEYS

    flags = {f"--{key}" for key in SECRET_KEYS} | {f"--{key.replace('_', '-')}" for key in SECRET_KEYS}
    out, hide_next = [], False
    for arg in argv:
        name = arg.split("=", 1)[0]
        if hide_next:
            out.append("<redacted>")
            hide_next = False
        elif name in flags and "=" in arg:
            out.append(f"{name}=<redacted>")
        else:
            out.append(arg)
            hide_next = arg in flags
    return out


def close_progress_bars() -> None:
    """Finish the lines of open progress bars, so that the message starts on a line of its own."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        with contextlib.suppress(Exception):  # a bar that cannot close must not hide the error line
            bar.close()


def run_cli(main: Callable[[list[str]], object], argv: list[str] | None = None) -> None:
    if argv is None:
        argv = list(sys.argv[1:])
        sys.argv[1:] = redacted(sys.argv[1:])  # wandb and others record the command line
    argv = list(argv)
    debug = DEBUG_FLAG in argv or os.environ.get("ALIGNMENT_DEBUG", "") not in ("", "0")
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    try:
        main(argv)
    except KeyboardInterrupt as interrupt:  # alignment.training.TrainingInterrupted says where the checkpoint is
        close_progress_bars()
        if os.environ.get("RANK", "0") == "0":  # the main process speaks for all (torchrun sets RANK)
            print(f"interrupted: {one_line(interrupt)}" if str(interrupt) else "interrupted", file=sys.stderr)
        raise SystemExit(getattr(interrupt, "exit_code", 130)) from None
    except Exception as error:
        if debug:
            raise
        close_progress_bars()
        print(f"error: {one_line(error)} (run with --debug for the traceback)", file=sys.stderr)
        raise SystemExit(1) from None

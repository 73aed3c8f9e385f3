"""`accelerate launch`, with the exits our scripts promise:

    python -m alignment.run.launch [accelerate launch options] scripts/run_dpo.py recipes/gpt2_hh.yaml

Every option is accelerate's (the same parser, the same launchers); only the ending differs. Accelerate's launcher
process ends any failure of its workers with a traceback of its own: on Ctrl-C torchrun's agent raises a
`SignalException` (20 lines, exit 1), and the single-process launcher raises `CalledProcessError` or
`KeyboardInterrupt`. Here the workers' own line (`error: ...`, or `interrupted: ...` from the main process) is the
whole output, and the exit code is theirs: 1 for an error, 130 for Ctrl-C, 143 for SIGTERM.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys


def _wait_for_the_workers(signum, frame):  # noqa: ARG001
    """Ctrl-C reaches the workers too (one process group): they save a checkpoint and exit; this one waits for them.
    A Python function, not SIG_IGN: exec resets it, so the workers start with the default handler."""


def worker_exit_code(error: BaseException) -> int | None:
    """The exit code a failure of the workers (or a signal) gives; None for a failure of the launcher itself."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if isinstance(error, SignalException):
        return 128 + int(error.sigval)
    if isinstance(error, ChildFailedError):
        codes = [failure.exitcode for failure in error.failures.values()]
        signalled = [code for code in codes if code in (130, 143)]
        return signalled[0] if signalled else 1
    if isinstance(error, subprocess.CalledProcessError):
        return error.returncode if error.returncode > 0 else 128 - error.returncode  # -N: killed by signal N
    if isinstance(error, KeyboardInterrupt):
        return 130
    return None


def main(argv: list[str] | None = None) -> None:
    from accelerate.commands.launch import launch_command, launch_command_parser

    args = launch_command_parser().parse_args(argv)
    # torchrun's agent says "Received 2 death signal, shutting down workers" at WARNING: the workers say it better
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    signal.signal(signal.SIGINT, _wait_for_the_workers)
    try:
        launch_command(args)
    except (Exception, KeyboardInterrupt) as error:
        code = worker_exit_code(error)
        if code is None:  # the launcher's own failure (bad option, missing script): say it in one line
            print(f"error: accelerate launch: {error}", file=sys.stderr)
        raise SystemExit(code or 1) from None


if __name__ == "__main__":
    main()

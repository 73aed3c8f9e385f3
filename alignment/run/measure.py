"""Run one piece of work in a child process and measure it: wall seconds, the child's peak resident memory (RSS),
and its output in a log file.

Why a child process: a process's peak RSS only ever grows, so runs measured one after another in one process would
share one peak. Each run (a stage of a study, a side of a benchmark) in its own process has a peak of its own.

Children are forked from a server process that has imported the heavy libraries once (the target's module and
`preload`), so a child does not pay seconds of imports. The server never runs a torch operation, so forking it is
safe (forking a process whose OpenMP thread pool has run is not) and every child starts from the same state. Where
the platform cannot fork, children are fresh interpreters that pay the imports.

Users: `examples/arithmetic/studies.py` (one training run per child) and `benchmarks/trl_comparison.py` (one side of
the comparison per child). Imports only the standard library (and torch, in the child, to set its threads).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["LOG_TAIL_LINES", "ChildFailed", "Measured", "idle_child_peak_rss_mib", "peak_rss_mib", "run_in_child"]

LOG_TAIL_LINES = 15  # how much of a failed child's log its error shows


@dataclass(frozen=True)
class Measured:
    """A finished child: its wall time (start to exit), its peak RSS, what the target returned, where its output is."""

    seconds: float
    peak_rss_mib: float
    result: Any
    log_path: Path


class ChildFailed(RuntimeError):
    """The child exited with an error (or died); the message ends with the last lines of its log."""

    def __init__(self, what: str, exitcode: int | None, log_path: Path):
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines() if log_path.is_file() else []
        self.exitcode, self.log_path, self.log_tail = exitcode, log_path, "\n".join(lines[-LOG_TAIL_LINES:])
        super().__init__(f"{what} failed (exit code {exitcode}); its log, {log_path}, ends:\n{self.log_tail}")


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


_context: multiprocessing.context.BaseContext | None = None
_preload: set[str] = set()


def _child_context(preload: Iterable[str]) -> multiprocessing.context.BaseContext:
    """The forkserver context (spawn where there is none). The server starts with the first child and imports the
    modules asked for until then; a module first asked for later is imported by each child that needs it."""
    global _context
    _preload.update(preload)
    if _context is None:
        methods = multiprocessing.get_all_start_methods()
        _context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if _context.get_start_method() == "forkserver":
        _context.set_forkserver_preload(sorted(_preload))  # no effect once the server runs
    return _context


def _child(target: Callable[..., Any], args: tuple, log_path: str, stats_path: str, threads: int | None) -> None:
    """In the child: output to the log file, the target, then its result and the peak RSS into stats_path."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    sys.stdout.flush()
    sys.stderr.flush()
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    result = target(*args)
    sys.stdout.flush()
    sys.stderr.flush()
    stats = {"peak_rss_mib": peak_rss_mib(), "result": result}
    Path(stats_path).write_text(json.dumps(stats), encoding="utf-8")


def run_in_child(
    target: Callable[..., Any],
    *args: Any,
    log_path: str | os.PathLike,
    what: str | None = None,
    threads: int | None = None,
    preload: Iterable[str] = (),
) -> Measured:
    """`target(*args)` in a child process, its stdout and stderr into `log_path` (replaced).

    `target` must be a module-level function, its arguments picklable and its result a JSON value (or None).
    `threads`: torch's intra-op threads in the child (default torch's own, one per core). `preload`: modules for the
    fork server to import, besides the target's. A failed child raises `ChildFailed`, named by `what`.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    stats_path = log_path.with_name(log_path.name + ".stats.json")
    stats_path.unlink(missing_ok=True)
    modules = [*preload, *([target.__module__] if target.__module__ != "__main__" else [])]
    process = _child_context(modules).Process(
        target=_child, args=(target, tuple(args), str(log_path), str(stats_path), threads)
    )
    start = time.perf_counter()
    process.start()
    process.join()
    seconds = time.perf_counter() - start
    if process.exitcode != 0 or not stats_path.is_file():
        raise ChildFailed(what or getattr(target, "__qualname__", "the child"), process.exitcode, log_path)
    stats = json.loads(stats_path.read_text(encoding="utf-8"))
    stats_path.unlink()
    return Measured(seconds, stats["peak_rss_mib"], stats["result"], log_path)


def _nothing() -> None:
    return None


def idle_child_peak_rss_mib(log_path: str | os.PathLike, preload: Iterable[str] = ()) -> float:
    """Peak RSS of a child that does nothing: what every child's peak includes before its work loads anything
    (Python and the preloaded libraries)."""
    return run_in_child(_nothing, log_path=log_path, what="an idle child", preload=preload).peak_rss_mib

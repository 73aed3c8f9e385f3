"""One run at a time in an output folder: an exclusive lock file, so two runs never mix their files.

The lock is `<output_dir>/.alignment.lock`, holding the pid, the host and the start time of the run that owns the
folder. It is created atomically (written under a temporary name, then hard-linked into place, which fails if the
lock exists), by the main process only. A second run into the folder stops with one line naming the holder. A lock
left by a run that is gone (same host, no such process) is taken over with a warning; one from another host cannot
be checked from here, so the line says which file to delete if that run is gone.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from ..training.checkpoints import CheckpointError

logger = logging.getLogger(__name__)

LOCK_NAME = ".alignment.lock"


def is_main_process() -> bool:
    """Rank 0 of a launch (or a plain single process), read before any process group exists."""
    return int(os.environ.get("RANK", "0")) == 0


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class RunFolderLock:
    """`with RunFolderLock(output_dir):` the folder is this run's until the block ends (also when it fails)."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.folder = Path(output_dir)
        self.path = self.folder / LOCK_NAME
        self.created: list[Path] = []  # folders made for the lock, removed again if the run leaves them empty
        self.held = False

    def __enter__(self) -> RunFolderLock:
        if is_main_process():
            self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> None:
        if self.folder.exists() and not self.folder.is_dir():
            raise CheckpointError(f"output_dir {self.folder} exists and is not a folder")
        folder = self.folder.absolute()
        while not folder.exists() and folder != folder.parent:
            self.created.append(folder)
            folder = folder.parent
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            staged = self.folder / f".lock-{uuid.uuid4().hex}.tmp"
            staged.write_text(json.dumps(record), encoding="utf-8")
        except OSError as error:
            raise CheckpointError(
                f"output_dir {self.folder} is not writable ({error.strerror or type(error).__name__}); choose another"
            ) from None
        try:
            for _ in range(3):  # again after taking over a stale lock
                try:
                    os.link(staged, self.path)
                    self.held = True
                    return
                except FileExistsError:
                    self._refuse_or_take_over()
        finally:
            staged.unlink(missing_ok=True)
        raise CheckpointError(f"output_dir {self.folder}: could not take its lock {self.path}; try again")

    def _refuse_or_take_over(self) -> None:
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
            pid, host, started = int(holder["pid"]), str(holder["host"]), holder.get("started", "?")
        except (OSError, ValueError, KeyError, TypeError):
            pid, host, started = None, None, "?"
        if pid is not None and host == socket.gethostname() and not process_alive(pid):
            logger.warning(
                "output_dir %s: taking over the lock of a run that is gone (pid %d, started %s)",
                self.folder,
                pid,
                started,
            )
            self.path.unlink(missing_ok=True)
            return
        who = f"pid {pid} on {host}, started {started}" if pid is not None else f"an unreadable lock file {self.path}"
        raise CheckpointError(
            f"output_dir {self.folder} is in use by another run ({who}); wait for it to finish or choose another "
            f"output_dir (if that run is gone, delete {self.path})"
        )

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
        for folder in self.created:  # deepest first; only if the run left nothing in them
            try:
                folder.rmdir()
            except OSError:
                break

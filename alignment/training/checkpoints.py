"""Checkpoints that survive a crash, and resuming from them.

* A checkpoint is written under a hidden staging name (`.partial-checkpoint-N/checkpoint-N`) and renamed to
  `checkpoint-N` only once every file is on disk (`AtomicCheckpointsMixin`). A run killed mid-write leaves the staging
  folder, which nothing ever reads; transformers' Trainer writes `checkpoint-N` in place, so without this a kill
  there leaves a folder that `--resume_from_checkpoint=true` picks and then fails on.
* `resume_checkpoint` turns `resume_from_checkpoint` (true, or a path) into the folder to resume from: the newest
  *complete* checkpoint, skipping incomplete ones (from older runs or other tools) with one warning each.
* `check_output_dir` refuses to start a new run into a folder that already holds a trained model or checkpoints,
  unless the run resumes or `overwrite_output_dir` is set: nothing saved is overwritten by accident.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ..common.files import file_problem, nonfinite_safetensors

logger = logging.getLogger(__name__)

STAGING_PREFIX = ".partial-"  # a dot, so neither transformers' `checkpoint-*` glob nor its regex ever sees it
CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
TRAINER_STATE = "trainer_state.json"
# What holds the weights: plain or sharded safetensors, a LoRA adapter, legacy .bin, FSDP / DeepSpeed shards.
WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
    "pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_model.bin",
)  # fmt: skip
WEIGHT_PREFIXES = ("pytorch_model_fsdp", "global_step")
COUNTERS_FILE = "alignment_counters.json"  # running totals the Trainer's own state does not keep
OPTIMIZER_PREFIX = "optimizer"  # optimizer.pt, or FSDP's optimizer_0/
SCHEDULER_FILE = "scheduler.pt"
RNG_STATE = re.compile(r"rng_state(_\d+)?\.pth")  # one per process
# Files in a finished run's folder that a new run would overwrite.
MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors", "pytorch_model.bin")


class CheckpointError(ValueError):
    """A checkpoint or output folder that cannot be used as asked; the message says what to do."""


# --- what a complete checkpoint is ----------------------------------------------------------------------------------


def incomplete_reason(folder: str | os.PathLike) -> str | None:
    """None for a checkpoint folder that resuming continues exactly; else what is missing or broken.

    Complete means: the weights are whole (sizes and headers checked), the trainer state has a `global_step`, and
    the optimizer, the learning-rate scheduler and the RNG states are there. Without the last three a resumed run
    would silently drift from the run it continues (a fresh optimizer, a restarted schedule, other dropout masks)."""
    folder = Path(folder)
    if not folder.is_dir():
        return "not a folder"
    names = {p.name for p in folder.iterdir()}
    if TRAINER_STATE not in names:
        return f"no {TRAINER_STATE}"
    if not names & set(WEIGHT_FILES) and not any(n.startswith(WEIGHT_PREFIXES) for n in names):
        return "no model weights"
    deepspeed = any(n.startswith("global_step") for n in names)  # its engine keeps optimizer and scheduler there
    if not deepspeed and not any(n.startswith(OPTIMIZER_PREFIX) for n in names):
        return "no optimizer state (saved with save_only_model?); to start a new run from its weights, set model_name_or_path to it"
    if not deepspeed and SCHEDULER_FILE not in names:
        return f"no {SCHEDULER_FILE} (learning-rate schedule)"
    if not any(RNG_STATE.fullmatch(n) for n in names):
        return "no RNG state (rng_state.pth)"
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, UnicodeDecodeError):
            return f"{index.name} is truncated or not JSON"
        missing = sorted(shard for shard in shards if shard not in names)
        if missing:
            return f"weight shards missing: {', '.join(missing)}"
    for path in sorted(folder.iterdir()):
        if path.is_file():
            problem = file_problem(path)
            if problem:
                return problem
    state = json.loads((folder / TRAINER_STATE).read_text(encoding="utf-8"))
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        return f"{TRAINER_STATE} has no global_step"
    return None


def checkpoint_folders(output_dir: str | os.PathLike) -> list[Path]:
    """`checkpoint-N` folders of a run, newest (highest N) first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_NAME.match(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found, reverse=True)]


def last_complete_checkpoint(output_dir: str | os.PathLike, warn: bool = True) -> Path | None:
    """The newest complete checkpoint of a run; incomplete newer ones are skipped, one warning each."""
    for folder in checkpoint_folders(output_dir):
        reason = incomplete_reason(folder)
        if reason is None:
            return folder
        if warn:
            logger.warning("skipping incomplete checkpoint %s (%s)", folder, reason)
    return None


def resume_checkpoint(value: str | bool | None, output_dir: str | os.PathLike) -> str | None:
    """The checkpoint folder `resume_from_checkpoint` asks for (True: the newest complete one in `output_dir`)."""
    if value is None or value is False:
        return None
    if value is True:
        found = last_complete_checkpoint(output_dir)
        if found is None:
            raise CheckpointError(
                f"resume_from_checkpoint=true, but {output_dir} holds no complete checkpoint-N folder to resume from; "
                "start without resume_from_checkpoint, or give the path of a checkpoint"
            )
        return _finite_checkpoint(found)
    path = Path(value)
    if not path.exists():
        raise CheckpointError(f"resume_from_checkpoint: {value} does not exist")
    if path.is_dir() and not (path / TRAINER_STATE).exists() and checkpoint_folders(path):
        found = last_complete_checkpoint(path)  # a run's folder: its newest complete checkpoint
        if found is not None:
            return _finite_checkpoint(found)
    reason = incomplete_reason(path)
    if reason is not None:
        raise CheckpointError(f"resume_from_checkpoint: {value} is not a complete checkpoint ({reason})")
    return _finite_checkpoint(path)


def _finite_checkpoint(folder: Path) -> str:
    """A checkpoint saved from a diverged run is refused here, naming the tensor, not blamed on the next batch."""
    nonfinite = nonfinite_safetensors(folder)
    if nonfinite:
        raise CheckpointError(
            f"resume_from_checkpoint: {folder} holds NaN or infinite weights ({nonfinite}); resume from an earlier "
            "checkpoint (give its path)"
        )
    logger.info("resuming from %s", folder)
    return str(folder)


# --- the output folder ----------------------------------------------------------------------------------------------


def check_writable(output_dir: Path) -> None:
    """The folder can be created and written to; folders made only for the test are removed again, so a run failing
    later leaves nothing behind."""
    created = []
    folder = output_dir.absolute()
    while not folder.exists() and folder != folder.parent:
        created.append(folder)
        folder = folder.parent
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise CheckpointError(
            f"output_dir {output_dir} is not writable ({error.strerror or type(error).__name__}); choose another"
        ) from None
    finally:
        for made in created:  # deepest first
            with contextlib.suppress(OSError):
                made.rmdir()


def check_output_dir(output_dir: str | os.PathLike, *, overwrite: bool = False, resuming: bool = False) -> None:
    """Before anything loads: the folder is writable, and a new run never overwrites a saved one by accident.

    Nothing is deleted here: with `overwrite`, the old run's checkpoints go only once the new run has loaded its
    model and data (`clear_previous_run`), so a typo in the recipe never costs them."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise CheckpointError(f"output_dir {output_dir} exists and is not a folder")
    if int(os.environ.get("RANK", "0")) == 0:  # one process probes: another's clean-up would race its folder
        check_writable(output_dir)
    if resuming:
        return
    saved = [p.name for p in checkpoint_folders(output_dir)[::-1]]
    saved += [name for name in MODEL_FILES if (output_dir / name).exists()]
    if not saved:
        return
    if not overwrite:
        shown = ", ".join(saved[:4]) + (", ..." if len(saved) > 4 else "")
        raise CheckpointError(
            f"output_dir {output_dir} already holds a saved run ({shown}); resume it with "
            "--resume_from_checkpoint=true, choose another output_dir, or set overwrite_output_dir to replace it"
        )


def clear_previous_run(output_dir: str | os.PathLike) -> None:
    """`overwrite_output_dir`: remove the old run's checkpoint and staging folders (else a later
    `resume_from_checkpoint=true` would pick the old run's newest one). Called by one process, just before the new
    run trains; the old final files are replaced when the new run saves its own."""
    output_dir = Path(output_dir)
    stale = checkpoint_folders(output_dir) + [p for p in output_dir.glob(f"{STAGING_PREFIX}*") if p.is_dir()]
    if stale:
        logger.warning(
            "overwrite_output_dir: removing %d checkpoint folders of the previous run in %s", len(stale), output_dir
        )
    for folder in stale:
        shutil.rmtree(folder)


# --- writing checkpoints atomically ---------------------------------------------------------------------------------


def _fsync(path: Path) -> None:
    """Flush one file's (or folder's) bytes to disk; best effort, as not every file system allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Put the files' bytes on disk before the rename makes the checkpoint visible (matters on power loss)."""
    for path in sorted(folder.rglob("*"), reverse=True):
        _fsync(path)


def publish(staged: Path, final: Path) -> None:
    """Rename a fully written checkpoint into place; an existing one of the same step is replaced only afterwards."""
    _fsync_tree(staged)
    old = None
    if final.exists():  # the same step saved again (a resumed run): move the old one aside first
        old = final.with_name(f"{STAGING_PREFIX}old-{final.name}-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(staged, final)
    _fsync(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class AtomicCheckpointsMixin:
    """A Trainer mixin: `checkpoint-N` appears only complete (written under a staging name, then renamed).

    transformers' `_save_checkpoint` writes into `<run dir>/checkpoint-N`; while it runs, the run dir is replaced by
    `<run dir>/.partial-checkpoint-N`, and afterwards the finished folder is renamed into place (by the main process,
    once every process has written its part), then old checkpoints are rotated as transformers would have.
    """

    _staging_run_dir: str | None = None
    checkpoint_files: dict[str, str] | None = None  # name -> text written into every checkpoint (the run's recipe)

    def _get_output_dir(self, trial: Any) -> str:
        if self._staging_run_dir is not None:
            return self._staging_run_dir
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = run_dir / f"{STAGING_PREFIX}{name}"
        if self.args.should_save and staging.exists():  # left by a run killed while saving this step
            shutil.rmtree(staging)
        self.accelerator.wait_for_everyone()
        self._staging_run_dir = str(staging)
        card = run_dir / "README.md"  # TRL rewrites the run's card at every save: a finished run's card stays
        kept_card = card.read_bytes() if self.args.should_save and card.is_file() else None
        try:
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._staging_run_dir = None
                if kept_card is not None:
                    card.write_bytes(kept_card)
            self.accelerator.wait_for_everyone()  # every process has written its files (rng states, shards)
            if self.args.should_save:
                self._finish_checkpoint(run_dir, name, staging)
        except OSError as error:  # a full disk, most often: the partial copy goes, the complete checkpoints stay
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            last = last_complete_checkpoint(run_dir, warn=False)
            kept = f"{last.name} is the last complete checkpoint" if last else "no checkpoint was saved before"
            raise CheckpointError(
                f"could not save {name} in {run_dir} ({error.strerror or error}); its partial copy was removed and "
                f"{kept}: free some space, then resume with --resume_from_checkpoint=true"
            ) from error
        self.accelerator.wait_for_everyone()

    def save_trainer_extras(self, checkpoint: Path) -> None:
        """Main process, into the staged checkpoint: state a trainer keeps beyond the Trainer's (TR-DPO's
        reference); published with the rest, so a checkpoint never has half of it."""

    def _finish_checkpoint(self, run_dir: Path, name: str, staging: Path) -> None:
        """Main process: add our files to the staged checkpoint, rename it into place, rotate old ones."""
        final = run_dir / name
        staged = staging / name
        for file_name, text in (self.checkpoint_files or {}).items():
            (staged / file_name).write_text(text, encoding="utf-8")
        counters = {"num_tokens": getattr(self, "_total_train_tokens", None)}  # TRL's running total
        (staged / COUNTERS_FILE).write_text(json.dumps(counters), encoding="utf-8")
        self.save_trainer_extras(staged)
        if self.state.best_model_checkpoint and Path(self.state.best_model_checkpoint) == staged:
            self.state.best_model_checkpoint = str(final)
            self.state.save_to_json(str(staged / TRAINER_STATE))
        publish(staged, final)
        shutil.rmtree(staging, ignore_errors=True)
        rotate_checkpoints(
            output_dir=str(run_dir),
            save_total_limit=self.args.save_total_limit,
            best_model_checkpoint=self.state.best_model_checkpoint,
            use_mtime=True,
        )

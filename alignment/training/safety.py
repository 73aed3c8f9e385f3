"""What keeps a training run safe to stop and honest about failures, built into the trainers themselves.

* `GracefulInterrupt`: Ctrl-C (SIGINT) or SIGTERM asks for a checkpoint and a clean stop at the end of the current
  optimizer step; `train()` then raises `TrainingInterrupted` and the scripts exit with 128 + the signal number (130 for Ctrl-C) and one line saying where the
  checkpoint is. A second Ctrl-C stops at once.
* `NonFiniteLossGuard`: a NaN or infinite loss stops training *before* the optimizer step
  it would poison, so no checkpoint with broken weights is ever written and the last good one stays as it is. The
  message names the step and the training rows of the batch, which are also written to
  `<output_dir>/nonfinite-step-N.jsonl`.
* `SafeTrainingMixin` puts both, and atomic checkpoints, into every trainer of this package at `__init__`.

How the rows are known: the trainer adds a `source_row` column (the row's index in the training split) before TRL
prepares the data. TRL's DPO preparation keeps extra columns, the mixin keeps the column through
transformers' unused-column removal, takes it out of each example before the trainer's own collator runs, and out of
the batch before the trainer's training step, so no trainer code ever sees it. SFT's packing keeps only token ids
(a packed row mixes documents), so there the documents of the batch are found by their text.
"""

from __future__ import annotations

import inspect
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from ..common.files import nonfinite_parameter, nonfinite_safetensors
from .checkpoints import COUNTERS_FILE, AtomicCheckpointsMixin, last_complete_checkpoint

logger = logging.getLogger(__name__)

SOURCE_ROW = "source_row"
MAX_ROWS_SHOWN = 16


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal after saving a checkpoint; `exit_code` is 128 + the signal number."""

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class NonFiniteLossError(RuntimeError):
    """A NaN or infinite training loss; the message names the step, the rows and the last good checkpoint."""


def distributed_any(flag: bool, device: Any) -> bool:
    """Whether `flag` is set on any process (all processes must call this together)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    if torch.distributed.get_world_size() == 1:
        return flag
    value = torch.tensor([1 if flag else 0], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


# --- Ctrl-C --------------------------------------------------------------------------------------------------------


class GracefulInterrupt(TrainerCallback):
    """Turn SIGINT / SIGTERM into `should_save` + `should_training_stop` at the end of the current step."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    # A launcher passes the terminal's Ctrl-C on to its workers, which got it already: a second signal this soon
    # after the first is that copy, not a second Ctrl-C.
    SAME_SIGNAL_WINDOW_S = 3.0

    def __init__(self) -> None:
        self.signal_received: int | None = None
        self.stopped_at_step: int | None = None
        self.is_main_process = True
        self._received_at = 0.0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_received is not None:
            if time.monotonic() - self._received_at < self.SAME_SIGNAL_WINDOW_S:
                return
            self.restore()  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal_received, self._received_at = signum, time.monotonic()
        if self.is_main_process:  # one line, however many processes
            print(
                f"{signal.Signals(signum).name} received: saving a checkpoint at the end of this step, then "
                "stopping (Ctrl-C again to stop at once, without one)",
                file=sys.stderr,
                flush=True,
            )

    def restore(self) -> None:
        """Put back the handlers that were there before training (also after training failed)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def on_train_begin(self, args, state, control, **kwargs):
        self.is_main_process = state.is_world_process_zero
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        if distributed_any(self.signal_received is not None, args.device):
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at_step = state.global_step
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signal_received or signal.SIGINT)


# --- non-finite losses ---------------------------------------------------------------------------------------------


class NonFiniteLossGuard(TrainerCallback):
    """Check the losses of an optimizer step's micro-batches just before the step (one device sync per step)."""

    def __init__(
        self,
        locate_rows: Callable[[dict[str, Any]], list[int]] | None = None,
        describe_rows: Callable[[list[int]], list[dict[str, Any]]] | None = None,
    ) -> None:
        self.locate_rows = locate_rows
        self.describe_rows = describe_rows
        self._pending: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def record(self, loss: torch.Tensor, batch: dict[str, Any]) -> None:
        """Called by the training step: the micro-batch's loss and what identifies its rows."""
        self._pending.append((loss.detach().reshape(-1)[:1], batch))

    def on_step_begin(self, args, state, control, **kwargs):
        self._pending.clear()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        pending, self._pending = self._pending, []
        if not pending:
            return
        finite = torch.isfinite(torch.cat([loss.float() for loss, _ in pending]))
        local_bad = not bool(finite.all())
        if not distributed_any(local_bad, args.device):
            return
        step = state.global_step + 1  # the update the loss belongs to, as the logs number it
        bad = [i for i, ok in enumerate(finite.tolist()) if not ok]
        values = sorted({str(float(pending[i][0].item())) for i in bad}) if bad else []
        rows: list[int] = []
        for i in bad:
            rows += self._rows(pending[i][1])
        message = f"non-finite loss ({', '.join(values) or 'on another process'}) at step {step}"
        if rows:
            shown = ", ".join(map(str, rows[:MAX_ROWS_SHOWN])) + (", ..." if len(rows) > MAX_ROWS_SHOWN else "")
            message += f", batch from training rows [{shown}]"
            written = self._write_rows(Path(args.output_dir), step, rows) if args.should_save else None
            if written is not None:
                message += f" (written to {written})"
        elif bad:
            message += ", batch rows unknown"
        broken = nonfinite_parameter(kwargs.get("model"))
        if broken:
            message += (
                f"; the weights were already non-finite before this step ({broken}), so the rows are not to blame"
            )
        last = last_complete_checkpoint(args.output_dir, warn=False)
        if last is None:
            where = "no checkpoint had been saved yet"
        elif nonfinite_safetensors(last):
            where = f"the last checkpoint, {last}, holds non-finite weights too: resume from an earlier one"
        else:
            where = f"the last good checkpoint, {last}, is intact"
        raise NonFiniteLossError(
            f"{message}; training stopped before that update, {where}; lower the learning rate, check those rows, "
            "or resume with --resume_from_checkpoint=true"
        )

    def _rows(self, batch: dict[str, Any]) -> list[int]:
        if self.locate_rows is None:
            return []
        try:
            return sorted(set(self.locate_rows(batch)))
        except Exception as error:  # naming the rows must never hide the real failure
            logger.warning("could not find the rows of the failing batch: %s", error)
            return []

    def _write_rows(self, output_dir: Path, step: int, rows: list[int]) -> Path | None:
        if self.describe_rows is None:
            return None
        path = output_dir / f"nonfinite-step-{step}.jsonl"
        try:
            records = self.describe_rows(rows)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        except Exception as error:
            logger.warning("could not write the rows of the failing batch: %s", error)
            return None
        return path


def rows_by_text(input_ids: torch.Tensor, tokenizer: Any, texts: Sequence[str], max_candidates: int = 3) -> list[int]:
    """The rows whose text holds the documents of a packed batch (split at end-of-text), for error messages only."""
    eos = tokenizer.eos_token_id
    found: set[int] = set()
    for sequence in input_ids.tolist():
        pieces, current = [], []
        for token in sequence:
            if token == eos:
                pieces.append(current)
                current = []
            else:
                current.append(token)
        pieces.append(current)
        for piece in pieces:
            text = tokenizer.decode(piece).strip()
            if len(text) < 8:  # too short to say which row it came from
                continue
            matches = [i for i, row in enumerate(texts) if text in row]
            if 0 < len(matches) <= max_candidates:
                found.update(matches)
    return sorted(found)


# --- the trainer side ----------------------------------------------------------------------------------------------


class _RowTaggingCollator:
    """Take `source_row` out of each example before the trainer's collator, and put it into the batch."""

    def __init__(self, collator: Callable) -> None:
        self.collator = collator

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [example.pop(SOURCE_ROW) for example in examples if isinstance(example, dict) and SOURCE_ROW in example]
        batch = self.collator(examples)
        if rows and isinstance(batch, dict):
            batch[SOURCE_ROW] = torch.tensor(rows, dtype=torch.long)
        return batch

    def __getattr__(self, name: str) -> Any:  # the wrapped collator's settings stay reachable
        if name == "collator":
            raise AttributeError(name)
        return getattr(self.collator, name)


class SafeTrainingMixin(AtomicCheckpointsMixin):
    """What every trainer of this package is: safe to stop and honest about failures, from Python as from the CLI.

    Mixed in before TRL's trainer class, its `__init__` numbers the training rows (a `source_row` column, for a
    `Dataset`; an iterable one is left as it is), then installs the non-finite-loss guard and the Ctrl-C/SIGTERM
    handler as callbacks. Checkpoints are written atomically (`AtomicCheckpointsMixin`). `train()` raises
    `TrainingInterrupted` (exit code 128 + the signal) after a signal made it save and stop.
    """

    loss_guard: NonFiniteLossGuard | None = None
    interrupt: GracefulInterrupt | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        parent_init = super().__init__
        bound = inspect.signature(parent_init).bind_partial(*args, **kwargs)
        train_rows = bound.arguments.get("train_dataset")
        if isinstance(train_rows, Dataset) and SOURCE_ROW not in train_rows.column_names:
            bound.arguments["train_dataset"] = train_rows.add_column(SOURCE_ROW, list(range(len(train_rows))))
        parent_init(*bound.args, **bound.kwargs)
        rows = train_rows if isinstance(train_rows, Dataset) else None
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        self.loss_guard = NonFiniteLossGuard(*_row_finders(rows, tokenizer))
        self.add_callback(self.loss_guard)
        self.interrupt = GracefulInterrupt()
        self.add_callback(self.interrupt)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        self._restore_counters(resume_from_checkpoint)
        try:
            result = super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            if self.interrupt is not None:
                self.interrupt.restore()  # on_train_end does it too, but not when training failed
        if self.interrupt is not None and self.interrupt.stopped_at_step is not None:
            self.accelerator.wait_for_everyone()
            checkpoint = last_complete_checkpoint(self.args.output_dir, warn=False)
            raise TrainingInterrupted(
                f"training stopped at step {self.interrupt.stopped_at_step}; checkpoint saved in {checkpoint}; "
                "resume with --resume_from_checkpoint=true",
                exit_code=self.interrupt.exit_code,
            )
        return result

    def _restore_counters(self, resume_from_checkpoint: str | bool | None) -> None:
        """A resumed run's logged `num_tokens` continues from the checkpoint's instead of restarting at 0."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        if not resume_from_checkpoint:
            return
        path = Path(resume_from_checkpoint) / COUNTERS_FILE
        if path.is_file() and hasattr(self, "_total_train_tokens"):
            saved = json.loads(path.read_text(encoding="utf-8")).get("num_tokens")
            if saved is not None:
                self._total_train_tokens = saved

    # --- carrying `source_row` from the dataset to the loss check --------------------------------------------------

    def get_train_dataloader(self):
        collator = self.data_collator  # wrapped for the training batches only: evaluation never sees the column
        self.data_collator = _RowTaggingCollator(collator)
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = collator

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None and SOURCE_ROW not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, SOURCE_ROW]

    def training_step(self, model, inputs, num_items_in_batch=None):
        rows = inputs.pop(SOURCE_ROW, None)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.loss_guard is not None:
            identity = {SOURCE_ROW: rows} if rows is not None else {"input_ids": inputs.get("input_ids")}
            self.loss_guard.record(loss, identity)
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs.pop(SOURCE_ROW, None)
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)


def _row_finders(train_rows: Dataset | None, tokenizer: Any) -> tuple[Callable, Callable]:
    """How the guard finds a failing batch's training rows (by `source_row`, else by text) and describes them."""

    def locate(batch: dict[str, Any]) -> list[int]:
        if batch.get(SOURCE_ROW) is not None:
            return [int(i) for i in batch[SOURCE_ROW].tolist()]
        if batch.get("input_ids") is None or train_rows is None or tokenizer is None:
            return []
        columns = train_rows.column_names
        if "text" in columns:
            texts = train_rows["text"]
        elif "prompt" in columns and "completion" in columns:
            texts = [p + c for p, c in zip(train_rows["prompt"], train_rows["completion"])]
        else:
            return []
        return rows_by_text(batch["input_ids"], tokenizer, texts)

    def describe(rows: list[int]) -> list[dict[str, Any]]:
        if train_rows is None:
            return [{"row": i} for i in rows]
        return [{"row": i, **{k: v for k, v in train_rows[i].items() if k != SOURCE_ROW}} for i in rows]

    return locate, describe

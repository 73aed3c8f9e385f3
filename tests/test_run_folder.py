"""A run's folder is never lost or mixed: `overwrite_output_dir` deletes nothing until the new run has its model and
data; one run at a time holds the folder (a lock naming its holder; a stale lock is taken over with a warning)."""

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from alignment.run.cli import run_cli
from alignment.run.folder_lock import LOCK_NAME, RunFolderLock
from alignment.run.pipeline import run_sft
from tests.test_bad_input import recipe, write_jsonl


def folder_hash(folder):
    """Every file's path and bytes: equal before and after means nothing saved changed."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def quiet(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.delenv("ALIGNMENT_DEBUG", raising=False)


@pytest.fixture
def sft_data(tmp_path):
    return write_jsonl(tmp_path / "sft.jsonl", [{"text": f"Human: {i}?\n\nAssistant: {i}"} for i in range(8)])


def saved_run(tmp_path, sft_data):
    """A finished run with a checkpoint, to be overwritten."""
    out = tmp_path / "out"
    run_sft([recipe(tmp_path, "sft", dataset_name=sft_data, save_strategy="steps", save_steps=1)])
    assert (out / "checkpoint-1").is_dir()
    return out


def error_line(capsys, argv):
    with pytest.raises(SystemExit) as failed:
        run_cli(run_sft, argv)
    assert failed.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error:"), lines[-3:]
    return lines[-1]


def test_overwrite_with_a_typo_in_the_data_costs_nothing(tmp_path, sft_data, capsys, quiet):
    out = saved_run(tmp_path, sft_data)
    before = folder_hash(out)
    line = error_line(capsys, [recipe(tmp_path, "sft", dataset_name=str(tmp_path / "sft.jsonll"),
                                      overwrite_output_dir=True)])
    assert "no such file" in line
    assert folder_hash(out) == before and not (out / LOCK_NAME).exists()


def test_overwrite_replaces_the_old_run_once_the_new_one_has_loaded(tmp_path, sft_data, quiet):
    out = saved_run(tmp_path, sft_data)
    run_sft([recipe(tmp_path, "sft", dataset_name=sft_data, overwrite_output_dir=True, max_steps=2)])
    assert not (out / "checkpoint-1").exists()  # the old run's checkpoint: gone, so no resume can pick it
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    assert not (out / LOCK_NAME).exists()


def test_a_second_run_into_a_busy_folder_stops_naming_the_holder(tmp_path, sft_data, capsys, quiet):
    out = tmp_path / "out"
    with RunFolderLock(out):  # this test process holds the folder, as a running run would
        before = folder_hash(out)
        line = error_line(capsys, [recipe(tmp_path, "sft", dataset_name=sft_data)])
        assert f"output_dir {out} is in use by another run (pid {os.getpid()} on {socket.gethostname()}" in line
        assert folder_hash(out) == before
    assert not (out / LOCK_NAME).exists()


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, sft_data, caplog, quiet):
    out = tmp_path / "out"
    out.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(gone.stdout)  # a process that has exited
    (out / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "earlier"}))
    with caplog.at_level(logging.WARNING, logger="alignment.run.folder_lock"):
        run_sft([recipe(tmp_path, "sft", dataset_name=sft_data)])
    assert any(f"taking over the lock of a run that is gone (pid {pid}" in r.getMessage() for r in caplog.records)
    assert (out / "model.safetensors").exists() and not (out / LOCK_NAME).exists()


def test_a_lock_from_another_host_is_not_taken_over(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "earlier"}))
    with pytest.raises(ValueError, match=r"in use by another run \(pid 1 on elsewhere.*if that run is gone, delete"):
        RunFolderLock(out).acquire()
    assert (out / LOCK_NAME).exists()


def test_a_failed_run_leaves_no_folder_it_created(tmp_path, capsys, quiet):
    out = tmp_path / "new" / "out"
    error_line(capsys, [recipe(tmp_path, "sft", dataset_name=str(tmp_path / "missing.jsonl"), output_dir=str(out))])
    assert not (tmp_path / "new").exists()

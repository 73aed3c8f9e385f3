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
    line = error_line(
        capsys, [recipe(tmp_path, "sft", dataset_name=str(tmp_path / "sft.jsonll"), overwrite_output_dir=True)]
    )
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


def test_resume_refuses_a_checkpoint_saved_weights_only(tmp_path, sft_data, capsys, quiet):
    """`save_only_model: true` leaves no optimizer, scheduler or RNG state: resuming from it would drift silently."""
    out = tmp_path / "out"
    run_sft(
        [
            recipe(
                tmp_path,
                "sft",
                dataset_name=sft_data,
                save_strategy="steps",
                save_steps=1,
                save_only_model=True,
                max_steps=2,
            )
        ]
    )
    before = folder_hash(out)
    line = error_line(
        capsys,
        [
            recipe(tmp_path, "sft", dataset_name=sft_data, max_steps=3),
            "--resume_from_checkpoint",
            str(out / "checkpoint-1"),
        ],
    )
    assert "checkpoint-1 is not a complete checkpoint (no optimizer state (saved with save_only_model?)" in line
    line = error_line(
        capsys, [recipe(tmp_path, "sft", dataset_name=sft_data, max_steps=3), "--resume_from_checkpoint=true"]
    )
    assert "holds no complete checkpoint-N folder to resume from" in line
    assert folder_hash(out) == before


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_steps": -1, "num_train_epochs": 0}, "nothing to train: max_steps is -1 and num_train_epochs 0"),
        ({"max_steps": 0, "num_train_epochs": 0}, "nothing to train"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be at least 1, got 0"),
        ({"max_length": 1}, "max_length 1 leaves no token to predict"),
        ({"test_size": 1.5}, "test_size 1.5: a share of the rows is below 1"),
        ({"test_size": -0.1}, "test_size -0.1"),
        ({"output_dir": " "}, "output_dir is empty"),
    ],
)
def test_settings_that_cannot_train_stop_before_anything_loads(
    settings, message, tmp_path, sft_data, capsys, quiet, monkeypatch
):
    import alignment.run.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("the model was loaded"))
    line = error_line(capsys, [recipe(tmp_path, "sft", dataset_name=sft_data, **settings)])
    assert message in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("beta: 0.1\nlearning_rate: 1e-6\nbeta: 0.2\n", "line 3, column 1: key 'beta' is given twice (lines 1 and 3)"),
        ("beta: 0.1\n\tlearning_rate: 1\n", "line 2, column 1: found character '\\t' that cannot start any token"),
        ('hub_model_id: "unclosed\nbeta: 1\n', "found unexpected end of stream (while scanning a quoted scalar)"),
    ],
)
def test_yaml_mistakes_name_the_line_and_the_problem(text, message, tmp_path, capsys, quiet):
    path = tmp_path / "broken.yaml"
    path.write_text(text, encoding="utf-8")
    line = error_line(capsys, [str(path)])
    assert f"{path} is not valid YAML: " in line and message in line, line


def test_a_data_folder_of_mixed_file_kinds_is_refused(tmp_path, capsys, quiet):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"text": f"Human: {i}?\n\nAssistant: {i}"} for i in range(4)])
    (folder / "b.csv").write_text("text\nHuman: 1?\n", encoding="utf-8")
    line = error_line(capsys, [recipe(tmp_path, "sft", dataset_name=str(folder))])
    assert "holds data files of several kinds (csv: b.csv; json: a.jsonl), of which only one kind would be read" in line


# --- resume continues the same run -----------------------------------------------------------------------------------


def checkpointed_run(tmp_path, sft_data, **settings):
    out = tmp_path / "out"
    run_sft(
        [
            recipe(
                tmp_path,
                "sft",
                dataset_name=sft_data,
                save_strategy="steps",
                save_steps=1,
                max_steps=2,
                learning_rate=1e-3,
                **settings,
            )
        ]
    )
    return out


def test_every_checkpoint_holds_its_recipe(tmp_path, sft_data, quiet):
    import yaml

    out = checkpointed_run(tmp_path, sft_data)
    for checkpoint in ("checkpoint-1", "checkpoint-2"):
        saved = yaml.safe_load((out / checkpoint / "recipe.yaml").read_text())
        assert saved["learning_rate"] == 1e-3 and saved["dataset_name"] == sft_data


def resume_argv(tmp_path, sft_data, checkpoint, allow_recipe_change=True, **settings):
    """A command line resuming `checkpoint` with the checkpointed run's settings, `settings` over them."""
    values = dict(dataset_name=sft_data, save_strategy="steps", save_steps=1, max_steps=4, learning_rate=1e-3)
    argv = [recipe(tmp_path, "sft", **{**values, **settings}), "--resume_from_checkpoint", str(checkpoint)]
    return argv + ["--allow_recipe_change=true"] * allow_recipe_change


def test_resume_with_changed_settings_stops_listing_them(tmp_path, sft_data, capsys, quiet):
    out = checkpointed_run(tmp_path, sft_data)
    before = folder_hash(out)
    argv = resume_argv(
        tmp_path, sft_data, out / "checkpoint-1", False, max_steps=2, learning_rate=2e-3, per_device_train_batch_size=4
    )
    line = error_line(capsys, argv)
    assert "settings that change the result: learning_rate: 0.001 -> 0.002, per_device_train_batch_size: 2 -> 4" in line
    assert "--allow_recipe_change=true" in line
    assert folder_hash(out) == before


def test_resume_with_harmless_changes_or_when_allowed(tmp_path, sft_data, caplog, quiet):
    import yaml

    out = checkpointed_run(tmp_path, sft_data)
    with caplog.at_level(logging.INFO, logger="alignment.run.resume_check"):
        run_sft(resume_argv(tmp_path, sft_data, out / "checkpoint-1", False, max_steps=2, logging_steps=2))
    assert any("other logging/saving settings: logging_steps: 10 -> 2" in r.getMessage() for r in caplog.records), [
        r.getMessage() for r in caplog.records
    ]
    assert not (out / "recipe-changes.yaml").exists()
    run_sft(resume_argv(tmp_path, sft_data, out / "checkpoint-2", max_steps=3))
    changes = yaml.safe_load((out / "recipe-changes.yaml").read_text())
    assert changes[-1]["resumed"] == str(out / "checkpoint-2")
    assert changes[-1]["changes"] == {"max_steps": {"was": 2, "now": 3}}
    assert yaml.safe_load((out / "recipe.yaml").read_text())["max_steps"] == 3


def test_a_failed_resume_of_a_finished_run_keeps_its_card_and_recipe(tmp_path, sft_data, capsys, quiet, monkeypatch):
    from alignment.training import SFTTrainer

    out = checkpointed_run(tmp_path, sft_data)
    card, saved_recipe = (out / "README.md").read_bytes(), (out / "recipe.yaml").read_bytes()
    compute_loss = SFTTrainer.compute_loss

    def poisoned(self, model, inputs, *args, **kwargs):
        loss = compute_loss(self, model, inputs, *args, **kwargs)
        return loss * float("nan") if self.state.global_step == 2 else loss

    monkeypatch.setattr(SFTTrainer, "compute_loss", poisoned)
    line = error_line(capsys, resume_argv(tmp_path, sft_data, out / "checkpoint-1"))
    assert "non-finite loss" in line
    assert (out / "README.md").read_bytes() == card and (out / "recipe.yaml").read_bytes() == saved_recipe


@pytest.mark.parametrize(("name", "content"), [("empty.jsonl", ""), ("empty.json", "[]"), ("blank.txt", "\n\n")])
def test_generate_refuses_an_empty_prompts_file(name, content, tmp_path):
    from alignment.evaluation.sampling import read_prompts

    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=f"{name} holds no prompts"):
        read_prompts(str(path))


def checkpoint_hashes(out):
    return {p.name: folder_hash(p) for p in out.glob("checkpoint-*")}


def poison_weights(checkpoint):
    """Write NaN into one tensor of a checkpoint's weights, as a diverged run would have saved them."""
    from safetensors.torch import load_file, save_file

    path = checkpoint / "model.safetensors"
    tensors = load_file(path)
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = tensors[name].clone().fill_(float("nan"))
    save_file(tensors, path, metadata={"format": "pt"})
    return name


def test_a_full_disk_while_saving_removes_the_partial_copy_and_says_so(tmp_path, sft_data, capsys, quiet, monkeypatch):
    import errno

    import torch

    out = checkpointed_run(tmp_path, sft_data)
    before = checkpoint_hashes(out)
    save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "checkpoint-3" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    line = error_line(capsys, resume_argv(tmp_path, sft_data, out / "checkpoint-2"))
    assert "could not save checkpoint-3" in line and "No space left on device" in line
    assert "partial copy was removed" in line and "checkpoint-2 is the last complete checkpoint" in line
    assert not list(out.glob(".partial-*"))
    assert checkpoint_hashes(out) == before


def test_a_checkpoint_with_nan_weights_is_refused_when_resuming(tmp_path, sft_data, capsys, quiet):
    out = checkpointed_run(tmp_path, sft_data)
    tensor = poison_weights(out / "checkpoint-2")
    before = folder_hash(out)
    line = error_line(capsys, resume_argv(tmp_path, sft_data, "true"))
    assert "checkpoint-2 holds NaN or infinite weights" in line and tensor in line and "earlier checkpoint" in line
    assert folder_hash(out) == before


def test_the_loss_guard_never_calls_a_nan_checkpoint_good(tmp_path, sft_data, capsys, quiet, monkeypatch):
    from alignment.training import SFTTrainer

    out = checkpointed_run(tmp_path, sft_data)
    poison_weights(out / "checkpoint-2")
    before = checkpoint_hashes(out)
    compute_loss = SFTTrainer.compute_loss

    def poisoned(self, model, inputs, *args, **kwargs):
        loss = compute_loss(self, model, inputs, *args, **kwargs)
        return loss * float("nan") if self.state.global_step == 1 else loss

    monkeypatch.setattr(SFTTrainer, "compute_loss", poisoned)
    line = error_line(capsys, resume_argv(tmp_path, sft_data, out / "checkpoint-1", save_steps=10))
    assert "non-finite loss" in line and "at step 2" in line
    assert "checkpoint-2, holds non-finite weights too" in line and "last good" not in line
    assert checkpoint_hashes(out) == before

"""Crash and resume, Ctrl-C, non-finite losses, reproducibility and secrets, on a one-layer GPT-2 and a few rows.

* SIGKILL in the middle of training (SFT and DPO), then `--resume_from_checkpoint=true`: the logged losses and the
  final weights equal an uninterrupted run's with the same seed (within 1e-6). The SFT model has dropout, and both
  runs cross an epoch boundary after the resume, so RNG state and data order must be restored too.
* A checkpoint appears only complete (a crash while writing one leaves a hidden staging folder), and resuming skips
  incomplete `checkpoint-N` folders (from older tools, or damaged) with a warning.
* Ctrl-C saves a checkpoint and exits with 130 and one line saying where it is.
* A NaN / infinite loss stops training before that update, naming the step and the batch's rows.
* The same recipe and seed give the same losses and weights twice; secrets appear in no file and no log.
"""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from alignment.run.cli import run_cli
from alignment.run.pipeline import run_dpo, run_sft
from alignment.training.checkpoints import (
    STAGING_PREFIX,
    incomplete_reason,
    last_complete_checkpoint,
    resume_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {"n_layer": 1, "n_head": 2, "n_embd": 16, "n_positions": 64}
COMMON = {
    "model_config": "gpt2/dropout",  # dropout 0.2: a resume must restore the RNG state
    "model_config_overrides": TINY_MODEL,
    "max_length": 32,
    "max_steps": 8,
    "per_device_train_batch_size": 2,
    "activation_checkpointing": False,
    "report_to": "none",
    "save_strategy": "steps",
    "save_steps": 2,
    "logging_steps": 1,
    "learning_rate": 1e-3,
    "test_size": 0,
    "eval_strategy": "no",
    "seed": 0,
}
RUN = {"sft": run_sft, "dpo": run_dpo}
SCRIPT = {"sft": "scripts/run_sft.py", "dpo": "scripts/run_dpo.py"}
# Runs a script with every optimizer step slowed down, so that a signal lands in the middle of training.
SLOW_WRAPPER = """
import os, runpy, sys, time
from transformers.trainer_callback import DefaultFlowCallback

step_end = DefaultFlowCallback.on_step_end

def slow_step_end(self, args, state, control, **kwargs):
    time.sleep(float(os.environ.get("SLOW_STEP_S", "0.4")))
    return step_end(self, args, state, control, **kwargs)

DefaultFlowCallback.on_step_end = slow_step_end
script = sys.argv.pop(1)
runpy.run_path(script, run_name="__main__")
"""


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def make_recipes(folder):
    """12 rows each: SFT packs them into 4 steps per epoch, DPO has 6, so 8 steps cross an epoch boundary."""
    sft = [{"text": f"\n\nHuman: What is {i % 7} + {i % 5}?\n\nAssistant: {i % 7 + i % 5}"} for i in range(12)]
    dpo = []
    for i in range(12):
        a, b = i % 7, (3 * i) % 5
        dpo.append(
            {
                "prompt": f"\n\nHuman: What is {a} + {b}?\n\nAssistant:",
                "chosen": f" {a + b}",
                "rejected": f" It is {a + b + 1}, I think.",
            }
        )
    recipes = {}
    for stage, rows in (("sft", sft), ("dpo", dpo)):
        settings = {**COMMON, "dataset_name": write_jsonl(folder / f"{stage}.jsonl", rows)}
        if stage == "dpo":
            settings["beta"] = 0.1
        recipes[stage] = folder / f"{stage}.yaml"
        recipes[stage].write_text(yaml.safe_dump(settings), encoding="utf-8")
    return {stage: str(path) for stage, path in recipes.items()}


def subprocess_env():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("ALIGNMENT_DEBUG", None)
    return env


@pytest.fixture
def offline(monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.delenv("ALIGNMENT_DEBUG", raising=False)


def losses(run_dir):
    history = json.loads((Path(run_dir) / "trainer_state.json").read_text())["log_history"]
    return [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]


def weights(path):
    return load_file(str(Path(path) / "model.safetensors"))


def assert_same_run(run, reference, atol=1e-6):
    got, expected = losses(run), losses(reference)
    assert [step for step, _ in got] == [step for step, _ in expected]
    for (step, a), (_, b) in zip(got, expected):
        assert abs(a - b) <= atol, (step, a, b)
    a, b = weights(run), weights(reference)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


# --- SIGKILL and Ctrl-C in real processes, then resume ---------------------------------------------------------------


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """Five processes at once: an uninterrupted run of each stage; each stage killed (SIGKILL) once checkpoint-4
    exists; SFT sent SIGINT once checkpoint-2 exists."""
    folder = tmp_path_factory.mktemp("crash")
    recipes = make_recipes(folder)
    wrapper = folder / "slow.py"
    wrapper.write_text(SLOW_WRAPPER, encoding="utf-8")
    plans = {  # name: (stage, slowed, checkpoint to wait for, signal)
        "sft-reference": ("sft", False, None, None),
        "dpo-reference": ("dpo", False, None, None),
        "sft-killed": ("sft", True, "checkpoint-4", signal.SIGKILL),
        "dpo-killed": ("dpo", True, "checkpoint-4", signal.SIGKILL),
        "sft-interrupted": ("sft", True, "checkpoint-2", signal.SIGINT),
    }
    processes = {}
    for name, (stage, slowed, _, _) in plans.items():
        command = (
            [sys.executable]
            + ([str(wrapper)] if slowed else [])
            + [SCRIPT[stage], recipes[stage], "--output_dir", str(folder / name)]
        )
        processes[name] = subprocess.Popen(
            command, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    deadline = time.time() + 400
    waiting = {name for name, plan in plans.items() if plan[3] is not None}
    finished_early = []
    while waiting and time.time() < deadline:
        for name in sorted(waiting):
            _, _, checkpoint, signum = plans[name]
            if (folder / name / checkpoint).is_dir():
                processes[name].send_signal(signum)
                waiting.discard(name)
            elif processes[name].poll() is not None:
                finished_early.append(name)
                waiting.discard(name)
        time.sleep(0.05)
    results = {}
    for name, process in processes.items():
        out, err = process.communicate(timeout=max(1, deadline - time.time()))
        results[name] = SimpleNamespace(dir=folder / name, returncode=process.returncode, out=out, err=err)
    assert not finished_early, {name: results[name].err[-3000:] for name in finished_early}
    for name in ("sft-reference", "dpo-reference"):
        assert results[name].returncode == 0, results[name].err[-3000:]
    return SimpleNamespace(folder=folder, recipes=recipes, runs=results)


def resume(stage, recipe, out, caplog, *extra, checkpoint="true"):
    caplog.set_level(logging.INFO, logger="alignment.training.checkpoints")
    run_cli(RUN[stage], [recipe, "--output_dir", str(out), f"--resume_from_checkpoint={checkpoint}", *extra])
    messages = [r.getMessage() for r in caplog.records if r.name == "alignment.training.checkpoints"]
    resumed = [m for m in messages if m.startswith("resuming from")]
    assert len(resumed) == 1, messages
    return int(re.search(r"checkpoint-(\d+)$", resumed[0]).group(1))


@pytest.mark.parametrize(("stage", "how"), [("sft", "true"), ("dpo", "a path")])
def test_sigkill_then_resume_equals_an_uninterrupted_run(crashed, stage, how, caplog, offline):
    killed = crashed.runs[f"{stage}-killed"]
    assert killed.returncode == -signal.SIGKILL
    assert not (killed.dir / "model.safetensors").exists()  # it never finished
    assert not list(killed.dir.glob("checkpoint-8"))
    newest = last_complete_checkpoint(killed.dir)
    step = resume(
        stage, crashed.recipes[stage], killed.dir, caplog, checkpoint="true" if how == "true" else str(newest)
    )
    assert 4 <= step < 8 and newest.name == f"checkpoint-{step}"
    assert_same_run(killed.dir, crashed.runs[f"{stage}-reference"].dir)


def test_ctrl_c_saves_a_checkpoint_and_exits_130(crashed, caplog, offline):
    run = crashed.runs["sft-interrupted"]
    assert run.returncode == 130, run.err[-3000:]
    assert "Traceback" not in run.err + run.out
    last = run.err.strip().splitlines()[-1]
    match = re.fullmatch(
        r"interrupted: training stopped at step (\d+); checkpoint saved in (\S+); "
        r"resume with --resume_from_checkpoint=true",
        last,
    )
    assert match, last
    step, checkpoint = int(match.group(1)), Path(match.group(2))
    assert checkpoint == run.dir / f"checkpoint-{step}" and incomplete_reason(checkpoint) is None
    assert 2 <= step < 8 and not (run.dir / "model.safetensors").exists()
    assert "SIGINT received: saving a checkpoint" in run.err
    assert resume("sft", crashed.recipes["sft"], run.dir, caplog) == step
    assert_same_run(run.dir, crashed.runs["sft-reference"].dir)


# --- checkpoints that are complete or not there at all ---------------------------------------------------------------


def test_crash_while_writing_a_checkpoint_and_damaged_checkpoints(tmp_path, caplog, monkeypatch, offline):
    """A crash in the middle of writing checkpoint-4 leaves no checkpoint-4 (only the staging folder), and the
    resume continues from checkpoint-2; damaged checkpoint-N folders (no trainer state, truncated weights) are
    skipped with a warning. Both end with the uninterrupted run's weights and losses."""
    import transformers

    recipes = make_recipes(tmp_path)
    args = ["--max_steps", "6"]
    reference = tmp_path / "reference"
    run_cli(run_sft, [recipes["sft"], "--output_dir", str(reference), *args])

    crashed = tmp_path / "crashed"
    save_rng_state = transformers.Trainer._save_rng_state

    def crash_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            raise RuntimeError("simulated crash while writing a checkpoint")
        return save_rng_state(self, output_dir)

    with monkeypatch.context() as patch:
        patch.setattr(transformers.Trainer, "_save_rng_state", crash_at_step_4)
        with pytest.raises(SystemExit) as failed:
            run_cli(run_sft, [recipes["sft"], "--output_dir", str(crashed), *args])
    assert failed.value.code == 1
    staging = crashed / f"{STAGING_PREFIX}checkpoint-4"
    assert (staging / "checkpoint-4" / "model.safetensors").is_file()  # half written, under the staging name
    assert not (crashed / "checkpoint-4").exists()
    assert last_complete_checkpoint(crashed) == crashed / "checkpoint-2"
    assert resume("sft", recipes["sft"], crashed, caplog, *args) == 2
    assert not staging.exists()
    assert_same_run(crashed, reference)

    damaged = tmp_path / "damaged"
    shutil.copytree(reference, damaged)
    (damaged / "checkpoint-6" / "trainer_state.json").unlink()
    weights_file = damaged / "checkpoint-4" / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:-100])
    caplog.clear()
    caplog.set_level(logging.WARNING, logger="alignment.training.checkpoints")
    assert resume("sft", recipes["sft"], damaged, caplog, *args) == 2
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name == "alignment.training.checkpoints"
    ]
    assert warnings == [
        f"skipping incomplete checkpoint {damaged / 'checkpoint-6'} (no trainer_state.json)",
        f"skipping incomplete checkpoint {damaged / 'checkpoint-4'} (model.safetensors is truncated)",
    ]
    assert_same_run(damaged, reference)
    assert incomplete_reason(damaged / "checkpoint-6") is None  # written again, complete


def make_checkpoint(folder, **files):
    folder.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file({"w": torch.ones(4)}, str(folder / "model.safetensors"))
    torch.save({"state": 1}, folder / "optimizer.pt")
    torch.save({"last_epoch": 2}, folder / "scheduler.pt")
    torch.save({"python": 1}, folder / "rng_state.pth")
    (folder / "trainer_state.json").write_text('{"global_step": 2}')
    for name, content in files.items():
        path = folder / name.replace("__", ".")
        if content is None:
            path.unlink()
        else:
            path.write_bytes(content)
    return folder


@pytest.mark.parametrize(
    ("files", "reason"),
    [
        ({}, None),
        ({"trainer_state__json": None}, "no trainer_state.json"),
        ({"trainer_state__json": b'{"global_st'}, "trainer_state.json is truncated or not JSON"),
        ({"model__safetensors": None}, "no model weights"),
        ({"model__safetensors": b"\x10\x00"}, "model.safetensors is truncated or not a safetensors file"),
        ({"optimizer__pt": b"PK\x03\x04 cut short"}, "optimizer.pt is truncated"),
        (
            {"optimizer__pt": None},
            "no optimizer state (saved with save_only_model?); to start a new run from its "
            "weights, set model_name_or_path to it",
        ),
        ({"scheduler__pt": None}, "no scheduler.pt (learning-rate schedule)"),
        ({"rng_state__pth": None}, "no RNG state (rng_state.pth)"),
        ({"trainer_state__json": b"{}"}, "trainer_state.json has no global_step"),
        (
            {"model__safetensors__index__json": b'{"weight_map": {"w": "model-00002.safetensors"}}'},
            "weight shards missing: model-00002.safetensors",
        ),
    ],
)
def test_what_counts_as_a_complete_checkpoint(tmp_path, files, reason):
    assert incomplete_reason(make_checkpoint(tmp_path / "checkpoint-2", **files)) == reason


def test_resume_argument_resolution(tmp_path):
    run = tmp_path / "run"
    make_checkpoint(run / "checkpoint-2")
    make_checkpoint(run / "checkpoint-10")
    make_checkpoint(run / "checkpoint-12", trainer_state__json=None)
    (run / f"{STAGING_PREFIX}checkpoint-14").mkdir()  # a crash while writing: never considered
    assert resume_checkpoint(None, run) is None
    assert resume_checkpoint(True, run) == str(run / "checkpoint-10")  # by number, not by name
    assert resume_checkpoint(str(run), run) == str(run / "checkpoint-10")  # a run folder: its newest complete one
    assert resume_checkpoint(str(run / "checkpoint-2"), tmp_path) == str(run / "checkpoint-2")
    with pytest.raises(ValueError, match="checkpoint-12 is not a complete checkpoint"):
        resume_checkpoint(str(run / "checkpoint-12"), run)


# --- non-finite losses ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("stage", "poison"), [("sft", float("nan")), ("dpo", float("inf"))])
def test_non_finite_loss_stops_before_the_update_and_names_the_rows(
    stage, poison, tmp_path, capsys, monkeypatch, offline
):
    from alignment.modeling.tokenizer import load_tokenizer
    from alignment.training import DPOTrainer, SFTTrainer

    trainer_class = SFTTrainer if stage == "sft" else DPOTrainer
    compute_loss = trainer_class.compute_loss
    poisoned_batches = []

    def poisoned(self, model, inputs, *args, **kwargs):
        loss = compute_loss(self, model, inputs, *args, **kwargs)
        if self.state.global_step != 4:  # the 5th update
            return loss
        poisoned_batches.append(inputs["input_ids"].cpu())
        return loss * poison

    monkeypatch.setattr(trainer_class, "compute_loss", poisoned)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    recipes = make_recipes(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as failed:
        run_cli(RUN[stage], [recipes[stage], "--output_dir", str(out)])
    assert failed.value.code == 1
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # Ctrl-C handler put back
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error:"), lines[-3:]  # on a line of its own, after the progress bar
    line = lines[-1]
    value = "nan" if poison != poison else "inf"
    match = re.fullmatch(
        rf"error: non-finite loss \({value}\) at step 5, batch from training rows \[([\d, ]+)\] \(written to (\S+)\); "
        rf"training stopped before that update, the last good checkpoint, (\S+), is intact; .* \(run with --debug "
        r"for the traceback\)",
        line,
    )
    assert match, line
    rows = [int(i) for i in match.group(1).split(", ")]
    assert Path(match.group(2)) == out / "nonfinite-step-5.jsonl"
    assert Path(match.group(3)) == out / "checkpoint-4"

    # the rows are the batch's: each one's text is in the poisoned batch
    written = [json.loads(line) for line in (out / "nonfinite-step-5.jsonl").read_text().splitlines()]
    assert [record["row"] for record in written] == rows and rows
    batch_text = load_tokenizer("gpt2").decode(torch.cat([ids.flatten() for ids in poisoned_batches]))
    for record in written:
        text = record["text"] if stage == "sft" else record["prompt"] + record["chosen"]
        assert text.strip() in batch_text
    if stage == "dpo":
        assert len(rows) == COMMON["per_device_train_batch_size"]

    # nothing after the last good checkpoint was written, and it is intact
    assert incomplete_reason(out / "checkpoint-4") is None
    assert last_complete_checkpoint(out) == out / "checkpoint-4"
    assert not (out / "model.safetensors").exists() and not list(out.glob(f"{STAGING_PREFIX}*"))
    assert all(torch.isfinite(t).all() for t in weights(out / "checkpoint-4").values())


# --- the same twice, and secrets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_same_recipe_and_seed_give_the_same_run_twice(crashed, stage, tmp_path, offline):
    """Here, and in the reference run (another process): the same losses and weights (to 1e-6: float sums depend on
    the number of torch threads, which other code in this process may have set)."""
    again = tmp_path / "again"
    run_cli(RUN[stage], [crashed.recipes[stage], "--output_dir", str(again)])
    reference = crashed.runs[f"{stage}-reference"].dir
    assert_same_run(again, reference)
    assert len({loss for _, loss in losses(again)}) > 1
    assert sorted(p.name for p in again.rglob("*.bin")) == ["training_args.bin"] * 5  # weights: safetensors only


FAKE_HUB_TOKEN = "hf_FakeHubTokenDoNotLeak0123456789"
FAKE_WANDB_KEY = "0123456789abcdef0123456789abcdefFAKEWANDB"


def test_secrets_never_reach_files_or_logs(tmp_path, capsys, caplog, monkeypatch, offline):
    """A Hub token on the command line (as users type it) and a wandb key in the recipe's `env`, wandb logging
    offline: neither value appears in any file of the run, of wandb's folder, or in the logs."""
    import wandb

    wandb.teardown()  # an earlier test's wandb settings (its folder) would otherwise stay
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", "placeholder")  # the recipe's env sets the fake one
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.chdir(tmp_path)
    recipe = yaml.safe_load(Path(make_recipes(tmp_path)["sft"]).read_text())
    recipe |= {
        "env": {"WANDB_API_KEY": FAKE_WANDB_KEY},
        "report_to": "wandb",
        "max_steps": 2,
        "push_to_hub": True,
        "hub_model_id": "someone/model",
    }
    (tmp_path / "secret.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    monkeypatch.setattr(
        sys,
        "argv",
        ["run_sft.py", str(tmp_path / "secret.yaml"), "--output_dir", str(out), "--hub_token", FAKE_HUB_TOKEN],
    )
    try:
        run_cli(run_sft)
    finally:
        if wandb.run is not None:
            wandb.finish()
        wandb.teardown()
    assert (out / "model.safetensors").is_file() and (out / "checkpoint-2" / "training_args.bin").is_file()
    assert "<redacted>" in sys.argv  # what wandb recorded as the command line
    captured = capsys.readouterr()
    logs = captured.out + captured.err + caplog.text
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "secret.yaml"]
    assert any("wandb" in p.parts for p in files) and len(files) > 20
    for secret in (FAKE_HUB_TOKEN, FAKE_WANDB_KEY):
        assert secret not in logs
        leaking = [p for p in files if secret.encode() in p.read_bytes()]
        assert not leaking, (secret, leaking)
    assert os.environ.get("HF_TOKEN") != FAKE_HUB_TOKEN


def test_no_unsafe_unpickling_in_the_package():
    """Weights load through safetensors; `torch.load` only with `weights_only=True`; no pickle."""
    sources = sorted((REPO / "alignment").rglob("*.py")) + sorted((REPO / "scripts").glob("*.py"))
    for path in sources:
        text = path.read_text(encoding="utf-8")
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in call.group(1), (path, call.group(0))
        assert not re.search(r"^\s*(import pickle|from pickle|import dill|import cloudpickle)", text, re.M), path
        assert "pickle.load" not in text, path

"""Figures of a run from synthetic trainer_state.json files: the right PNGs, valid, and clear errors."""

import json
import math
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from alignment.evaluation.plotting import load_log_history, main, plot_run

PLOT_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "plot.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SFT_FILES = {"sft_loss.png", "learning_rate.png"}
DPO_FILES = {"dpo_loss.png", "dpo_accuracy.png", "dpo_rewards.png", "learning_rate.png"}


def sft_history(steps=40, eval_every=10):
    """Like the HF Trainer's: train logs, eval logs, one summary; some values as strings, as older versions wrote."""
    history = []
    for step in range(1, steps + 1):
        loss = 2.0 + 2.0 * math.exp(-step / 10) + 0.1 * math.sin(step)
        history.append(
            {
                "epoch": step / steps,
                "step": step,
                "loss": str(loss) if step % 3 else loss,
                "learning_rate": f"{2e-5 * (1 - step / steps):.3e}",
                "grad_norm": 1.5,
                "entropy": 2.0,
                "mean_token_accuracy": 0.4,
                "num_tokens": 256.0 * step,
            }
        )
        if step % eval_every == 0:
            history.append(
                {"epoch": step / steps, "step": step, "eval_loss": 2.2 + math.exp(-step / 10), "eval_runtime": 1.0}
            )
    history.append({"epoch": 1.0, "step": steps, "train_runtime": 12.3, "train_loss": 2.5, "total_flos": 0.0})
    return history


def dpo_history(steps=40, eval_every=10):
    history = []
    for step in range(1, steps + 1):
        margin = 1.0 - math.exp(-step / 10) + 0.2 * math.sin(step)
        history.append(
            {
                "epoch": step / steps,
                "step": step,
                "loss": math.log(2) - 0.2 * margin,
                "learning_rate": 5e-6,
                "grad_norm": "3.5",
                "rewards/chosen": 0.1,
                "rewards/rejected": str(0.1 - margin),
                "rewards/margins": margin,
                "rewards/accuracies": min(1.0, 0.5 + 0.01 * step),
                "logps/chosen": -50.0,
                "logps/rejected": -60.0,
                "num_tokens": 512.0 * step,
            }
        )
        if step % eval_every == 0:
            history.append(
                {
                    "epoch": step / steps,
                    "step": step,
                    "eval_loss": str(0.6),
                    "eval_rewards/accuracies": 0.7,
                    "eval_rewards/margins": 0.5,
                    "eval_rewards/chosen": 0.0,
                    "eval_rewards/rejected": -0.5,
                }
            )
    history.append({"epoch": 1.0, "step": steps, "train_runtime": 30.0, "train_loss": 0.6})
    return history


def write_state(folder, history):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 0, "log_history": history}))
    return folder


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    height, width, channels = image.shape
    assert height >= 300 and width >= 500 and channels in (3, 4)
    assert image[..., :3].std() > 0.01  # something was drawn, not a blank canvas


def test_sft_run_writes_sft_figures(tmp_path):
    run = write_state(tmp_path / "sft-run", sft_history())
    paths = plot_run(run)
    assert {p.name for p in paths} == SFT_FILES
    assert all(p.parent == run / "plots" for p in paths)
    for path in paths:
        assert_png(path)


def test_dpo_run_writes_dpo_figures_into_out_dir(tmp_path):
    run = write_state(tmp_path / "dpo-run", dpo_history())
    paths = plot_run(run, out_dir=tmp_path / "figures")
    assert {p.name for p in paths} == DPO_FILES
    assert all(p.parent == tmp_path / "figures" for p in paths)
    assert not (run / "plots").exists()
    for path in paths:
        assert_png(path)


def test_strings_are_read_as_numbers_and_junk_is_skipped(tmp_path):
    history = sft_history(steps=6)
    for entry in history:
        if "learning_rate" in entry:
            entry["learning_rate"] = "n/a"  # no usable value anywhere: that figure is skipped, not drawn empty
    run = write_state(tmp_path / "run", history)
    assert [p.name for p in plot_run(run)] == ["sft_loss.png"]


def test_falls_back_to_newest_checkpoint(tmp_path):
    run = tmp_path / "run"
    write_state(run / "checkpoint-9", sft_history(steps=9))
    write_state(run / "checkpoint-10", dpo_history(steps=10))  # newest by number, though "10" < "9" as text
    (run / "checkpoint-11").mkdir()  # an interrupted save, without the file
    history = load_log_history(run)
    assert history[-1]["step"] == 10 and "rewards/margins" in history[0]
    assert {p.name for p in plot_run(run)} == DPO_FILES


def test_final_state_wins_over_checkpoints(tmp_path):
    run = write_state(tmp_path / "run", sft_history(steps=5))
    write_state(run / "checkpoint-3", dpo_history(steps=3))
    assert {p.name for p in plot_run(run)} == SFT_FILES


@pytest.mark.parametrize("make_history", [sft_history, dpo_history])
def test_single_logged_step_still_plots(tmp_path, make_history):
    run = write_state(tmp_path / "run", make_history(steps=1, eval_every=1))
    paths = plot_run(run)
    assert paths
    for path in paths:
        assert_png(path)


def test_empty_history_writes_nothing(tmp_path):
    run = write_state(tmp_path / "run", [])
    assert plot_run(run) == []
    assert not (run / "plots").exists()


def test_missing_state_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no trainer_state.json in .* checkpoint-N"):
        load_log_history(tmp_path)
    with pytest.raises(FileNotFoundError, match="run folder not found"):
        plot_run(tmp_path / "nope")


def test_script_fails_in_one_line_without_state_file(tmp_path):
    result = subprocess.run([sys.executable, str(PLOT_SCRIPT), str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "trainer_state.json" in result.stderr and str(tmp_path) in result.stderr


def test_script_fails_in_one_line_without_run_folder(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "nope" in err


def test_script_prints_one_line_per_file(tmp_path, capsys):
    run = write_state(tmp_path / "run", dpo_history())
    assert main([str(run), "--out", str(tmp_path / "out")]) == 0
    printed = [Path(line) for line in capsys.readouterr().out.splitlines()]
    assert {p.name for p in printed} == DPO_FILES
    assert all(p.is_file() and p.parent == tmp_path / "out" for p in printed)

"""examples/arithmetic/ablate_sft.py end to end with --quick (a tenth of the demo's data, a few steps per run; one
torch thread, on a busy 2-core machine much faster than two): the files it writes, one table row per SFT fraction, a
0% run that really had no SFT, accuracies that are shares, a valid PNG, and the full fine-tuning vs LoRA comparison."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import set_seed

from alignment import AlignmentGPT2ForCausalLM
from alignment.modeling.loading import load_model
from alignment.run.arguments import DataArguments, ModelArguments
from alignment.run.cli import run_cli
from alignment.run.pipeline import model_loading
from alignment.run.recipe import parse_recipe
from alignment.training.configs import SFTConfig
from examples.arithmetic import ablate_sft as ablate
from examples.arithmetic.studies import trainable_parameters

ACCURACIES = (
    "held_out_preference_accuracy",
    "held_out_reward_accuracy_vs_sft",
    "greedy_correct_train_problems",
    "greedy_correct_held_out_problems",
)
RUN_FOLDERS = (
    "sft-0",
    "sft-50",
    "sft-100",
    "dpo-from-sft-0",
    "dpo-from-sft-50",
    "dpo-from-sft-100",
    "dpo-lora-from-sft-100",
)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation")
    run_cli(ablate.main, ["--quick", "--threads", "1", "--output_dir", str(out), "--debug"])
    return out


def weights(folder):
    return AlignmentGPT2ForCausalLM.from_pretrained(folder).state_dict()


@pytest.mark.slow
def test_writes_every_file_and_run_folder(study):
    for name in ("results.json", "results.md", "sft_fraction.png", "lora.json", "lora.md"):
        assert (study / name).is_file() and (study / name).stat().st_size > 0, name
    for name in RUN_FOLDERS:
        assert (study / name / "train.log").is_file(), name
        assert (study / name / "recipe.yaml").is_file(), name
        assert (study / name / "trainer_state.json").is_file(), name
        weights_file = "adapter_model.safetensors" if "lora" in name else "model.safetensors"
        assert (study / name / weights_file).is_file(), name
    assert (study / "dpo-lora-from-sft-100" / "merged" / "model.safetensors").is_file()


@pytest.mark.slow
def test_one_row_per_fraction_with_growing_sft_budgets(study):
    results = json.loads((study / "results.json").read_text())
    rows = results["rows"]
    assert [row["sft_fraction"] for row in rows] == [0.0, 0.5, 1.0]
    steps = [row["sft_steps"] for row in rows]
    assert steps[0] == 0 and 0 < steps[1] < steps[2], steps
    assert [row["sft_epochs"] for row in rows] == [0.0, 0.5 * ablate.QUICK_SFT_EPOCHS, ablate.QUICK_SFT_EPOCHS]
    assert all(row["runs"]["dpo"]["global_step"] == ablate.QUICK_DPO_STEPS for row in rows)

    table = (study / "results.md").read_text().strip().splitlines()
    assert table[0].startswith("| SFT budget |") and set(table[1]) <= set("|-: ")
    assert len(table) == 2 + len(rows)
    for line, row, label in zip(table[2:], rows, ("0%", "50%", "100%")):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[0] == label and cells[1] == str(row["sft_steps"])
        assert len(cells) == len(table[0].strip("|").split("|"))
        assert (
            cells[2]
            == f"{row['sft']['held_out_preference_accuracy']:.1%} → {row['dpo']['held_out_preference_accuracy']:.1%}"
        )


@pytest.mark.slow
def test_zero_percent_run_had_no_sft(study):
    """The 0% start is exactly the random initialisation the SFT runs start from, and DPO started from it."""
    model_args, _, args = parse_recipe((ModelArguments, DataArguments, SFTConfig), [str(ablate.SFT_RECIPE)])
    set_seed(args.seed)
    fresh = load_model(model_args.model_name_or_path, **model_loading(model_args, args.trust_remote_code)).state_dict()
    saved = weights(study / "sft-0")
    assert saved.keys() == fresh.keys()
    for name, tensor in fresh.items():
        torch.testing.assert_close(saved[name], tensor, rtol=0, atol=0, msg=name)
    assert json.loads((study / "sft-0" / "trainer_state.json").read_text())["global_step"] == 0

    # the comparison can tell: the 50% run trained away from that same initialisation
    trained = weights(study / "sft-50")
    assert any(not torch.equal(trained[name], tensor) for name, tensor in fresh.items())

    dpo_recipe = yaml.safe_load((study / "dpo-from-sft-0" / "recipe.yaml").read_text())
    assert Path(dpo_recipe["model_name_or_path"]) == study / "sft-0"


@pytest.mark.slow
def test_accuracies_are_shares(study):
    results = json.loads((study / "results.json").read_text())
    for row in results["rows"]:
        assert row["sft"]["held_out_reward_accuracy_vs_sft"] is None  # the SFT model has no reference
        for model in ("sft", "dpo"):
            for key in ACCURACIES:
                value = row[model][key]
                assert value is None or 0.0 <= value <= 1.0, (row["sft_fraction"], model, key, value)
        assert row["dpo"]["held_out_reward_accuracy_vs_sft"] is not None
    for run in json.loads((study / "lora.json").read_text())["runs"]:
        for key in ACCURACIES:
            assert 0.0 <= run[key] <= 1.0, (run["method"], key)


@pytest.mark.slow
def test_plot_is_a_valid_png(study):
    from PIL import Image

    path = study / "sft_fraction.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
        assert width > 600 and height > 300
        assert len(set(image.convert("RGB").getdata())) > 10  # something was drawn


@pytest.mark.slow
def test_lora_comparison(study):
    comparison = json.loads((study / "lora.json").read_text())
    full, lora = comparison["runs"]
    assert full["method"] == "full fine-tuning" and lora["method"].startswith("LoRA r=8")
    # r=8 adapters on c_attn (64 -> 192), attn c_proj (64 -> 64), c_fc (64 -> 256), mlp c_proj (256 -> 64), 2 layers
    assert lora["trainable_parameters"] == 2 * 8 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))
    assert full["trainable_parameters"] == comparison["total_parameters"] > 3_000_000
    assert lora["trainable_parameters"] == trainable_parameters(study / "dpo-lora-from-sft-100")
    for run in (full, lora):
        assert run["peak_rss_mib"] > comparison["idle_worker_peak_rss_mib"] > 0
        assert run["wall_seconds"] > 0 and run["global_step"] == ablate.QUICK_DPO_STEPS
    assert full["learning_rate"] == 1e-3 and lora["learning_rate"] == ablate.LORA_LEARNING_RATE
    table = (study / "lora.md").read_text().strip().splitlines()
    assert len(table) == 4 and table[2].startswith("| full fine-tuning |") and table[3].startswith("| LoRA r=8, α=16 |")
    # the adapter really changed the model: merged weights differ from the SFT start
    start, merged = weights(study / "sft-100"), weights(study / "dpo-lora-from-sft-100" / "merged")
    assert any(not torch.equal(start[name], merged[name]) for name in start)


@pytest.mark.parametrize("fractions", ["0,1.5", "half", ""])
def test_bad_fractions_are_refused_before_anything_runs(fractions, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(ablate.main, ["--fractions", fractions, "--output_dir", str(tmp_path)])
    assert exit_info.value.code != 0
    assert "--fractions takes comma-separated numbers in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


@pytest.mark.slow
def test_fractions_skip_lora_and_a_second_study_into_the_same_folder(study, tmp_path):
    """A second study into a copy of the first one's folder: --fractions picks the rows, --skip_lora trains no 100%
    model it does not need and drops the first study's LoRA comparison (it would read as this one's), the runs it
    trains again replace theirs (the pipeline itself refuses to overwrite a saved run), and the runs it does not
    train are left as they were."""
    shutil.copytree(study, tmp_path, dirs_exist_ok=True)
    (tmp_path / "sft-0" / "stale-file").write_text("from the first study")
    untouched = {name: (tmp_path / name / "model.safetensors").read_bytes() for name in ("sft-50", "dpo-from-sft-100")}
    argv = ["--quick", "--threads", "1", "--fractions", "0", "--skip_lora", "--output_dir", str(tmp_path), "--debug"]
    run_cli(ablate.main, argv)
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [row["sft_fraction"] for row in rows] == [0.0]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == sorted(["data", "logs", *RUN_FOLDERS])
    assert not (tmp_path / "lora.json").exists() and not (tmp_path / "lora.md").exists()
    assert not (tmp_path / "sft-0" / "stale-file").exists()
    assert (tmp_path / "dpo-from-sft-0" / "train.log").stat().st_mtime > (study / "dpo-from-sft-0").stat().st_mtime
    for name, weights_bytes in untouched.items():
        assert (tmp_path / name / "model.safetensors").read_bytes() == weights_bytes, name
    assert len((tmp_path / "results.md").read_text().strip().splitlines()) == 3

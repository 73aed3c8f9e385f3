"""`global_batch_size`: the recipe's batch on any number of processes. gradient_accumulation_steps is derived from the
launch's WORLD_SIZE (simulated here: without LOCAL_RANK and with use_cpu off, accelerate forms no process group, so a
config can be built for 8 processes in this one); what does not divide, or disagrees with a
gradient_accumulation_steps the user gave, is refused in one line; a resume on another number of processes with
the same global batch is no recipe change. One real launch shows 1 and 2 processes train on the same rows per step.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alignment.run.arguments import DataArguments, ModelArguments
from alignment.run.recipe import RecipeError, parse_recipe, resolved_recipe
from alignment.run.resume_check import recipe_differences
from alignment.training.configs import DPOConfig, SFTConfig
from tests.distributed_runs import environment, free_port, write_recipe

REPO = Path(__file__).resolve().parents[1]
CPU_2PROC = REPO / "accelerate_configs" / "cpu_2proc.yaml"
QUIET = dict(bf16=False, report_to="none", use_cpu=False)  # use_cpu off: a simulated WORLD_SIZE forms no group


@pytest.fixture
def world(monkeypatch):
    """Set the launch's WORLD_SIZE as torchrun / accelerate launch would (no LOCAL_RANK: no process group here)."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)

    def set_world(n):
        monkeypatch.setenv("WORLD_SIZE", str(n))

    return set_world


@pytest.mark.parametrize("config_class", [DPOConfig, SFTConfig])
@pytest.mark.parametrize(("world_size", "accumulation"), [(1, 8), (2, 4), (8, 1)])
def test_accumulation_is_derived_for_the_world_size(tmp_path, world, config_class, world_size, accumulation):
    world(world_size)
    args = config_class(str(tmp_path), per_device_train_batch_size=8, global_batch_size=64, **QUIET)
    assert args.gradient_accumulation_steps == accumulation
    assert args.per_device_train_batch_size * world_size * args.gradient_accumulation_steps == 64


def test_without_global_batch_size_accumulation_is_as_given(tmp_path, world):
    world(2)
    assert DPOConfig(str(tmp_path), gradient_accumulation_steps=3, **QUIET).gradient_accumulation_steps == 3


def test_the_derivation_is_logged_in_one_line(tmp_path, world, caplog):
    world(2)
    caplog.set_level("INFO", logger="alignment.training.configs")
    DPOConfig(str(tmp_path), per_device_train_batch_size=8, global_batch_size=64, **QUIET)
    assert [r.getMessage() for r in caplog.records] == [
        "global_batch_size 64 = 8 per device × 2 processes × 4 gradient accumulation steps"
    ]


REFUSED = [
    (2, {"global_batch_size": 6, "per_device_train_batch_size": 2}, "global_batch_size 6 is not a multiple of "
     "per_device_train_batch_size 2 × 2 processes = 4; choose a per_device_train_batch_size that divides 3"),
    (2, {"global_batch_size": 63}, "global_batch_size 63 cannot be split over 2 processes; use a multiple of 2"),
    (1, {"global_batch_size": 0}, "global_batch_size must be at least 1, got 0"),
    (1, {"global_batch_size": 64, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 4},
     "gradient_accumulation_steps 4 disagrees with global_batch_size 64 = 8 per device × 1 process × 8 accumulation"),
    (1, {"global_batch_size": 16, "auto_find_batch_size": True}, "global_batch_size: auto_find_batch_size halves"),
    (1, {"global_batch_size": 16, "accelerator_config": {"split_batches": True}},
     "global_batch_size: accelerator_config.split_batches divides"),
]  # fmt: skip


@pytest.mark.parametrize(("world_size", "settings", "line"), REFUSED, ids=lambda x: str(x)[:50])
def test_refused_in_one_line(tmp_path, world, world_size, settings, line):
    world(world_size)
    with pytest.raises(ValueError) as error:
        DPOConfig(str(tmp_path), **QUIET, **settings)
    assert str(error.value).startswith(line) and "\n" not in str(error.value)


def parse(tmp_path, recipe, *overrides):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    argv = [str(path), f"--output_dir={tmp_path / 'out'}", "--use_cpu=false", "--report_to=none", *overrides]
    return parse_recipe((ModelArguments, DataArguments, DPOConfig), argv)


RECIPE = {"model_config": "gpt2", "dataset_name": "pairs.jsonl", "per_device_train_batch_size": 8}


def test_the_recipe_parser_refuses_an_explicit_accumulation_of_one(tmp_path, world):
    """A config alone cannot tell gradient_accumulation_steps: 1 from its default; the parser knows it was given."""
    world(1)
    with pytest.raises(RecipeError, match="^gradient_accumulation_steps 1 disagrees with global_batch_size 64 = 8 per"):
        parse(tmp_path, {**RECIPE, "global_batch_size": 64, "gradient_accumulation_steps": 1})
    with pytest.raises(RecipeError, match="^gradient_accumulation_steps 1 disagrees"):
        parse(tmp_path, {**RECIPE, "global_batch_size": 64}, "--gradient_accumulation_steps=1")
    assert parse(tmp_path, {**RECIPE, "global_batch_size": 8, "gradient_accumulation_steps": 1})[2].global_batch_size
    # agreeing values, and a resolved recipe parsed back as a recipe, pass
    *_, args = parse(tmp_path, {**RECIPE, "global_batch_size": 64, "gradient_accumulation_steps": 8})
    assert args.gradient_accumulation_steps == 8
    again = parse(tmp_path, resolved_recipe(*parse(tmp_path, {**RECIPE, "global_batch_size": 64})))
    assert again[2].gradient_accumulation_steps == 8 and again[2].global_batch_size == 64


def test_a_resume_on_another_world_size_with_the_same_global_batch_is_no_change(tmp_path, world):
    recipe = {**RECIPE, "global_batch_size": 64}
    world(1)
    on_one = resolved_recipe(*parse(tmp_path, recipe))
    world(2)
    on_two = resolved_recipe(*parse(tmp_path, recipe))
    assert (on_one["gradient_accumulation_steps"], on_two["gradient_accumulation_steps"]) == (8, 4)
    assert recipe_differences(on_one, on_two) == {}
    # another global batch, or a run without one resumed with one, is still a change
    other = resolved_recipe(*parse(tmp_path, {**recipe, "global_batch_size": 128}))
    assert set(recipe_differences(on_two, other)) == {"global_batch_size"}
    world(1)
    plain = resolved_recipe(*parse(tmp_path, {**RECIPE, "gradient_accumulation_steps": 8}))
    assert set(recipe_differences(plain, on_two)) == {"global_batch_size", "gradient_accumulation_steps"}


# --- one real launch: 1 and 2 processes, the same global batch ------------------------------------------------------

GLOBAL_BATCH, PER_DEVICE, STEPS, PAIRS = 4, 2, 2, 16


def step_logs(output_dir: Path) -> list[dict]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "loss" in entry]


@pytest.mark.slow
def test_one_and_two_processes_train_on_the_same_rows_per_step(tmp_path, gpt2_tokenizer, monkeypatch, caplog):
    """The same recipe (global_batch_size 4, 2 per device) on 1 process (2 accumulation steps) and on 2 (1 each):
    the same pairs per step (tokens seen, epoch) and, with plain SGD and the same data order, the same losses after
    the first update (at step 0 both are ln 2). The first line of training states the derivation."""
    recipe_path = write_recipe(
        tmp_path,
        pairs=PAIRS,
        test_size=0,
        beta=0.1,
        optim="sgd",  # linear in the gradient: Adam's first step, lr·sign(g), would amplify rounding noise
        learning_rate=0.5,
        lr_scheduler_type="constant",
        per_device_train_batch_size=PER_DEVICE,
        global_batch_size=GLOBAL_BATCH,
        max_steps=STEPS,
    )
    env = environment(tmp_path)
    two = tmp_path / "two"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC),
        "--main_process_port", str(free_port()), str(REPO / "scripts" / "run_dpo.py"), str(recipe_path),
        f"--output_dir={two}",
    ]  # fmt: skip
    launch = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    from alignment.run.pipeline import run_dpo  # the one-process run, in this process meanwhile

    one = tmp_path / "one"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets-1"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    caplog.set_level("INFO", logger="alignment.run.pipeline")
    run_dpo([str(recipe_path), f"--output_dir={one}"])
    out, err = launch.communicate(timeout=600)
    assert launch.returncode == 0, f"launch failed ({launch.returncode}):\n{out[-3000:]}\n{err[-6000:]}"

    batch = "precision fp32 · effective batch 4 = 2 per device × {} accumulation (from global_batch_size)"
    one_line = "engine single process (cpu) · " + batch.format("1 process × 2")
    two_line = "engine DDP (2 processes, gloo, cpu) · " + batch.format("2 processes × 1")
    assert one_line in [r.getMessage() for r in caplog.records]
    assert err.count(two_line) == 1, err[-3000:]  # the main process's only

    single, double = step_logs(one), step_logs(two)
    assert len(single) == len(double) == STEPS
    steps_per_epoch = math.ceil(PAIRS / GLOBAL_BATCH)
    for step, (a, b) in enumerate(zip(single, double, strict=True), start=1):
        assert a["epoch"] == b["epoch"] == pytest.approx(step / steps_per_epoch)
        assert a["num_tokens"] == b["num_tokens"]  # the same pairs, counted over both processes
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)  # the same mean gradient
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-5)
    assert single[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(single[1]["loss"] - math.log(2)) > 1e-3  # the update moved the policy: step 2 compares something

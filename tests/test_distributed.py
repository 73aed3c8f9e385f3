"""DPO data-parallel over two CPU processes, launched the way users launch it:

    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml scripts/run_dpo.py RECIPE.yaml

A tiny random GPT-2 trains for a few steps on a preference file written here. The checkpoint is rank 0's alone, so
the launched script is a small wrapper (written into tmp_path, the package needs no test-only code) that runs
`alignment.run.pipeline.run_dpo` as `scripts/run_dpo.py` does and then has every rank write its own weights, before
and after training, and what it saw of the process group. Both ranks must end with the same weights.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed_runs import environment, free_port, write_recipe  # noqa: F401  (free_port: test_launch)

REPO = Path(__file__).resolve().parents[1]
CPU_CONFIG = REPO / "accelerate_configs" / "cpu_2proc.yaml"
PAIRS = 32
PER_DEVICE_BATCH = 2
STEPS = 3
PROCESSES = 2

# Runs `run_dpo` like scripts/run_dpo.py; grabs the trainer on its way into `train_and_save` (the weights before
# training), then each rank writes rank{N}_initial.safetensors, rank{N}.safetensors and rank{N}.json.
WRAPPER = """
import json, os, sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

import alignment.run.pipeline as pipeline

seen = {}
train_and_save = pipeline.train_and_save


def weights(trainer):
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {name: tensor.detach().cpu().clone().contiguous() for name, tensor in model.state_dict().items()}


def capture(trainer, *args, **kwargs):
    seen["trainer"], seen["initial"] = trainer, weights(trainer)
    return train_and_save(trainer, *args, **kwargs)


pipeline.train_and_save = capture
output_dir = pipeline.run_dpo(sys.argv[1:])
trainer = seen["trainer"]
grouped = dist.is_available() and dist.is_initialized()
rank = dist.get_rank() if grouped else int(os.environ.get("RANK", 0))
save_file(seen["initial"], str(output_dir / f"rank{rank}_initial.safetensors"))
save_file(weights(trainer), str(output_dir / f"rank{rank}.safetensors"))
info = {
    "process_group": grouped,
    "backend": dist.get_backend() if grouped else None,
    "world_size": dist.get_world_size() if grouped else 1,
    "trainer_world_size": trainer.args.world_size,
    "accelerator_processes": trainer.accelerator.num_processes,
    "process_index": trainer.accelerator.process_index,
    "train_rows": len(trainer.train_dataset),
    "epoch": trainer.state.epoch,
    "log_history": trainer.state.log_history,
}
(output_dir / f"rank{rank}.json").write_text(json.dumps(info))
"""


def write_inputs(tmp_path: Path) -> tuple[Path, Path]:
    same = {"prompt": "Human: hi", "chosen": " same", "rejected": " same"}  # dropped
    recipe_path = write_recipe(
        tmp_path, pairs=PAIRS, extra_rows=(same,), beta=0.1, per_device_train_batch_size=PER_DEVICE_BATCH,
        max_steps=STEPS,
    )  # fmt: skip
    wrapper = tmp_path / "run_dpo_and_dump.py"
    wrapper.write_text(WRAPPER, encoding="utf-8")
    return recipe_path, wrapper


@pytest.mark.slow
def test_dpo_on_two_cpu_processes_keeps_the_ranks_in_step(tmp_path, gpt2_tokenizer):
    # gpt2_tokenizer builds the offline tokenizer cache first, so the two ranks only read it.
    recipe, wrapper = write_inputs(tmp_path)
    output_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(CPU_CONFIG),
        "--main_process_port", str(free_port()),
        str(wrapper), str(recipe),
        f"--output_dir={output_dir}",
    ]  # fmt: skip
    env = environment(tmp_path)
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"launch failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"

    # every rank filters the same rows; only the main one says so
    assert run.stderr.count(f"dropped 1 of {PAIRS + 1} rows") == 1, run.stderr[-3000:]

    infos = [json.loads((output_dir / f"rank{rank}.json").read_text()) for rank in range(PROCESSES)]
    for rank, info in enumerate(infos):
        assert info["process_group"] and info["backend"] == "gloo", info
        assert info["world_size"] == info["trainer_world_size"] == info["accelerator_processes"] == PROCESSES
        assert info["process_index"] == rank
        # each step consumed PROCESSES x PER_DEVICE_BATCH pairs: the data was sharded, not trained on twice
        steps_per_epoch = math.ceil(info["train_rows"] / (PROCESSES * PER_DEVICE_BATCH))
        assert info["epoch"] == pytest.approx(STEPS / steps_per_epoch)
        losses = [entry["loss"] for entry in info["log_history"] if "loss" in entry]
        assert len(losses) == STEPS and all(math.isfinite(loss) for loss in losses), losses
        assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 0
    step_logs = [[entry for entry in info["log_history"] if "loss" in entry] for info in infos]
    assert step_logs[0] == step_logs[1]  # loss and DPO metrics are averaged over both ranks before logging

    initial = [load_file(output_dir / f"rank{rank}_initial.safetensors") for rank in range(PROCESSES)]
    final = [load_file(output_dir / f"rank{rank}.safetensors") for rank in range(PROCESSES)]
    assert initial[0].keys() == initial[1].keys() == final[0].keys() == final[1].keys()
    for name in final[0]:
        assert torch.equal(initial[0][name], initial[1][name]), f"ranks started apart: {name}"
        assert torch.equal(final[0][name], final[1][name]), f"ranks drifted apart: {name}"
    moved = [name for name in final[0] if not torch.equal(initial[0][name], final[0][name])]
    assert len(moved) > len(final[0]) // 2, f"training changed only {moved}"

    from alignment import AlignmentGPT2ForCausalLM

    # rank 0's save, in the stock GPT-2 format (save_format's default), read back into ours: the common weights
    saved = AlignmentGPT2ForCausalLM.from_pretrained(output_dir).state_dict()
    assert all(torch.equal(saved[name], tensor) for name, tensor in final[0].items())
    assert (output_dir / "recipe.yaml").is_file() and (output_dir / "trainer_state.json").is_file()

"""Launching a training stage the way users launch it (`accelerate launch ... scripts/run_*.py RECIPE`) from tests,
and reading back what every process saw.

The launched script is a small wrapper (written into tmp_path; the package has no test-only code) that runs the
stage as `scripts/run_sft.py` / `scripts/run_dpo.py` do, then has every rank write `rank{N}.json`: the process group,
the engine accelerate ran, the logged losses, and how much of each parameter the rank holds (sharding); and
`rank{N}.safetensors`, the rank's parameters gathered whole.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import preference_rows

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "accelerate_configs"

WRAPPER = """
import json, os, sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import TrainerCallback

import alignment.run.pipeline as pipeline

seen = {}
train_and_save = pipeline.train_and_save


class CountSteps(TrainerCallback):
    steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        CountSteps.steps += 1


def capture(trainer, *args, **kwargs):
    seen["trainer"] = trainer
    trainer.add_callback(CountSteps())
    return train_and_save(trainer, *args, **kwargs)


def held(module):
    # elements of each parameter this rank holds, and the parameter's full size (a DTensor's shard under FSDP2)
    if module is None:
        return {}
    return {
        name: [p.to_local().numel() if hasattr(p, "to_local") else p.numel(), p.numel()]
        for name, p in module.named_parameters()
    }


def whole(module):
    # every parameter whole on this rank (a collective all-gather of each shard under FSDP2)
    tensors = {}
    for name, p in module.named_parameters():
        tensors[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone().contiguous()
    return tensors


pipeline.train_and_save = capture
stage = sys.argv[1]
output_dir = (pipeline.run_sft if stage == "sft" else pipeline.run_dpo)(sys.argv[2:])
trainer = seen["trainer"]
grouped = dist.is_available() and dist.is_initialized()
rank = dist.get_rank() if grouped else 0
info = {
    "process_group": grouped,
    "backend": dist.get_backend() if grouped else None,
    "world_size": dist.get_world_size() if grouped else 1,
    "distributed_type": str(trainer.accelerator.distributed_type),
    "is_fsdp2": trainer.accelerator.is_fsdp2,
    "policy": held(trainer.model_wrapped),
    "reference": held(getattr(trainer, "ref_model", None)),
    "log_history": trainer.state.log_history,
    "steps_run": CountSteps.steps,  # optimizer steps this launch ran (a resumed run skips the checkpoint's)
}
(output_dir / f"rank{rank}.json").write_text(json.dumps(info))
save_file(whole(trainer.model_wrapped), str(output_dir / f"rank{rank}.safetensors"))
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_recipe(tmp_path: Path, pairs: int = 32, extra_rows: tuple[dict, ...] = (), **overrides) -> Path:
    """A tiny DPO/SFT recipe over GPT-2's tokenizer and a file of `pairs` preference rows, then `extra_rows` (SFT
    trains on prompt + chosen); `overrides` set or replace recipe fields."""
    data = tmp_path / "pairs.jsonl"
    rows = [*preference_rows(pairs), *extra_rows]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    recipe = {
        "model_config": "gpt2",  # vocab stays 50257, GPT-2's tokenizer
        "model_config_overrides": {"n_layer": 2, "n_head": 4, "n_embd": 32, "n_positions": 64},
        "dataset_name": str(data),
        "max_length": 48,
        "learning_rate": 1.0e-3,
        "max_steps": 4,
        "logging_steps": 1,
        "activation_checkpointing": False,
        "eval_strategy": "no",
        "save_strategy": "no",
        "report_to": "none",
        "seed": 0,
        **overrides,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def environment(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets"),
        "ALIGNMENT_DEBUG": "1",  # a traceback, not one line, if a rank fails
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }


def wrapper_path(tmp_path: Path) -> Path:
    path = tmp_path / "run_and_dump.py"
    path.write_text(WRAPPER, encoding="utf-8")
    return path


def launch_command(tmp_path: Path, stage: str, recipe: Path, *args: str, launcher: list[str] | None) -> list[str]:
    """`accelerate launch LAUNCHER... wrapper STAGE RECIPE ARGS`, or the wrapper alone (one process) for None."""
    run = [str(wrapper_path(tmp_path)), stage, str(recipe), *args]
    if launcher is None:
        return [sys.executable, *run]
    return [sys.executable, "-m", "accelerate.commands.launch", *launcher, *run]


def run_stage(tmp_path: Path, stage: str, recipe: Path, *args: str, launcher: list[str] | None = None):
    """Run one launch to the end; fails the test with both streams' tails if it does not exit 0."""
    command = launch_command(tmp_path, stage, recipe, *args, launcher=launcher)
    run = subprocess.run(command, cwd=REPO, env=environment(tmp_path), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"launch failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    return run


def rank_infos(output_dir: Path, processes: int) -> list[dict]:
    return [json.loads((output_dir / f"rank{rank}.json").read_text()) for rank in range(processes)]


def losses(info: dict) -> list[float]:
    return [entry["loss"] for entry in info["log_history"] if "loss" in entry]
